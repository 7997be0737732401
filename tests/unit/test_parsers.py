"""Unit tests for the qwen3_coder, llama3_json, mistral and pythonic tool-call parsers.

Each parser gets format tests (content, several calls, one error per malformed call with
its neighbours kept, the `max_parallel_calls` limit), a seeded fuzz run asserting it never
raises, and an oracle test comparing calls with vLLM's own parser of the same format.
Run `python -m pytest tests/unit/test_parsers.py`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser
from toolrl.rollout.trajectory import ToolCall

Args = dict[str, object]


def qwen_call(name: str, args: Args) -> str:
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
        for k, v in args.items()
    )
    return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"


def llama_call(name: str, args: Args) -> str:
    return json.dumps({"name": name, "parameters": args})


def pythonic_call(name: str, args: Args) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in args.items())})"


def qwen_turn(calls: list[tuple[str, Args]]) -> str:
    return "\n".join(qwen_call(n, a) for n, a in calls) + "<|im_end|>"


def llama_turn(calls: list[tuple[str, Args]]) -> str:
    return "<|python_tag|>" + "; ".join(llama_call(n, a) for n, a in calls) + "<|eom_id|>"


def mistral_v11_turn(calls: list[tuple[str, Args]]) -> str:
    return "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls) + "</s>"


def mistral_array_turn(calls: list[tuple[str, Args]]) -> str:
    payload = [{"name": n, "arguments": a} for n, a in calls]
    return f"[TOOL_CALLS] {json.dumps(payload)}</s>"


def pythonic_turn(calls: list[tuple[str, Args]]) -> str:
    return "[" + ", ".join(pythonic_call(n, a) for n, a in calls) + "]"


# (parser, turn writer) per format; the writer turns [(name, args)] into a model's output.
FORMATS: dict[str, tuple[Callable[..., object], Callable[[list[tuple[str, Args]]], str]]] = {
    "qwen3_coder": (Qwen3CoderParser, qwen_turn),
    "llama3_json": (Llama3JsonParser, llama_turn),
    "mistral_v11": (MistralParser, mistral_v11_turn),
    "mistral_array": (MistralParser, mistral_array_turn),
    "pythonic": (PythonicParser, pythonic_turn),
}
CORPUS: list[list[tuple[str, Args]]] = [
    [("get_weather", {"city": "Paris", "days": 3})],
    [("calculator", {"expression": "2+2"}), ("search", {"q": "x, y]", "n": 1.5})],
    [("noop", {})],
    [("f", {"flag": True, "none": None, "xs": [1, "a", {"k": False}], "o": {"a": {"b": 2}}})],
    [("a", {"s": "ünïcödé \"quoted\" 'single'"}), ("b", {"t": "line1\nline2"}), ("c", {})],
]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("calls", CORPUS)
def test_valid_turns_round_trip(fmt: str, calls: list[tuple[str, Args]]) -> None:
    parser_cls, write = FORMATS[fmt]
    turn = parser_cls()(write(calls))
    assert turn == ParsedTurn("", [ToolCall(n, a) for n, a in calls], [])


@pytest.mark.parametrize("fmt", FORMATS)
def test_calls_beyond_limit_get_an_error_each(fmt: str) -> None:
    parser_cls, write = FORMATS[fmt]
    turn = parser_cls(max_parallel_calls=2)(write([(f"t{i}", {"i": i}) for i in range(4)]))
    assert [c.name for c in turn.calls] == ["t0", "t1"]
    assert turn.errors == [
        f"tool call {i}: not run: at most 2 tool calls are allowed in one turn" for i in (3, 4)
    ]


@pytest.mark.parametrize(
    "parser_cls", [Qwen3CoderParser, Llama3JsonParser, MistralParser, PythonicParser]
)
def test_max_parallel_calls_must_be_positive(parser_cls: Callable[..., object]) -> None:
    with pytest.raises(ValueError, match="max_parallel_calls"):
        parser_cls(max_parallel_calls=0)


@pytest.mark.parametrize("name", ["qwen3_coder", "llama3_json", "mistral", "pythonic"])
def test_yaml_config_instantiates(name: str) -> None:
    parser = instantiate(OmegaConf.load(f"conf/parser/{name}.yaml"))
    assert parser.max_parallel_calls == 4
    assert parser("just an answer") == ParsedTurn("just an answer")


# ---- qwen3_coder ----------------------------------------------------------------------


def test_qwen3_values_convert_only_when_json() -> None:
    body = "".join(
        f"<parameter={k}>\n{v}\n</parameter>\n"
        for k, v in [("i", "3"), ("f", "-2.5e3"), ("b", "true"), ("n", "null"), ("s", "Paris")]
    )
    body += '<parameter=q>\n"quoted"\n</parameter>\n<parameter=nan>\nNaN\n</parameter>\n'
    body += "<parameter=sp>\n  two spaces \n\n</parameter>\n"
    turn = Qwen3CoderParser()(f"<tool_call>\n<function=f>\n{body}</function>\n</tool_call>")
    assert turn.calls[0].arguments == {
        "i": 3,
        "f": -2500.0,
        "b": True,
        "n": None,
        "s": "Paris",
        "q": '"quoted"',
        "nan": "NaN",
        "sp": "  two spaces \n",
    }


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("<function=f>\n<parameter=a>\n1\n</function>", 'parameter "a" is not closed'),
        ("<function=f>\n<parameter=a>\n1\n</parameter>\n", "is not closed with </function>"),
        ('{"name": "f"}', "expected <function=NAME>"),
        ("<function=>\n</function>", "with a tool name"),
        ("<function=f>\nstray\n</function>", "unexpected text outside"),
        (
            "<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n"
            "</function>",
            'parameter "a" is given twice',
        ),
    ],
)
def test_qwen3_malformed_call_keeps_neighbours(bad: str, error: str) -> None:
    text = qwen_call("f", {"x": 1}) + f"<tool_call>\n{bad}\n</tool_call>" + qwen_call("g", {})
    turn = Qwen3CoderParser()("I will call.\n" + text)
    assert turn.content == "I will call."
    assert [c.name for c in turn.calls] == ["f", "g"]
    assert len(turn.errors) == 1 and turn.errors[0].startswith("tool call 2: ")
    assert error in turn.errors[0]


def test_qwen3_unclosed_block() -> None:
    turn = Qwen3CoderParser()(qwen_call("f", {}) + "<tool_call>\n<function=g>\n")
    assert [c.name for c in turn.calls] == ["f"]
    assert turn.errors == ["tool call 2: <tool_call> is not closed with </tool_call>"]


# ---- llama3_json ------------------------------------------------------------------------


def test_llama3_content_and_forms() -> None:
    parse = Llama3JsonParser()
    assert parse("The answer is {1, 2}.<|eot_id|>") == ParsedTurn("The answer is {1, 2}.")
    assert parse('{"name": "f", "arguments": {"a": 1}}').calls == [ToolCall("f", {"a": 1})]
    turn = parse('Let me look.<|python_tag|>{"name": "f", "parameters": {}}')
    assert turn == ParsedTurn("Let me look.", [ToolCall("f", {})], [])
    turn = parse('{"name": "f", "parameters": {}}\n{"name": "g", "parameters": {}} Done.')
    assert [c.name for c in turn.calls] == ["f", "g"] and turn.content == "Done."


def test_llama3_malformed_call_keeps_neighbours() -> None:
    text = "; ".join(
        [llama_call("f", {"a": 1}), '{"name": "bad" "parameters": {}}', llama_call("g", {})]
    )
    turn = Llama3JsonParser()(text)
    assert [c.name for c in turn.calls] == ["f", "g"]
    assert turn.errors == ["tool call 2: invalid JSON: Expecting ',' delimiter at char 15"]
    turn = Llama3JsonParser()('{"name": "f"}; {"parameters": {}}; {"name": 3, "parameters": {}}')
    assert turn.errors == [
        'tool call 1: missing "parameters" (use {} for a call without arguments)',
        'tool call 2: missing "name"',
        'tool call 3: "name" must be a non-empty string, got a number',
    ]


# ---- mistral ----------------------------------------------------------------------------


def test_mistral_content_before_marker_and_call_id() -> None:
    turn = MistralParser()('Sure.[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"a": 1}</s>')
    assert turn == ParsedTurn("Sure.", [ToolCall("f", {"a": 1}, id="a1b2c3d4e")], [])
    assert MistralParser()("Plain answer.</s>") == ParsedTurn("Plain answer.")


IDS = ["a1b2c3d4e", "Zyx987654", "000000007", "QqQqQqQqQ", "abcdefghi"]


def mistral_v11_id_turn(calls: list[tuple[str, Args]]) -> str:
    return (
        "".join(
            f"[TOOL_CALLS]{n}[CALL_ID]{i}[ARGS]{json.dumps(a)}"
            for (n, a), i in zip(calls, IDS, strict=False)
        )
        + "</s>"
    )


def mistral_array_id_turn(calls: list[tuple[str, Args]]) -> str:
    payload = [{"name": n, "arguments": a, "id": i} for (n, a), i in zip(calls, IDS, strict=False)]
    return f"[TOOL_CALLS]{json.dumps(payload)}</s>"


@pytest.mark.parametrize("write", [mistral_v11_id_turn, mistral_array_id_turn])
@pytest.mark.parametrize("calls", CORPUS)
def test_mistral_call_ids_round_trip(write, calls: list[tuple[str, Args]]) -> None:
    turn = MistralParser()(write(calls))
    expected = [ToolCall(n, a, id=i) for (n, a), i in zip(calls, IDS, strict=False)]
    assert turn == ParsedTurn("", expected, [])


def test_mistral_call_ids_missing_or_malformed() -> None:
    # v11: the id is the text between [CALL_ID] and [ARGS], stripped; none without [CALL_ID]
    text = "[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]g[CALL_ID] a1b2c3d4e [ARGS]{}"
    text += "[TOOL_CALLS]h[CALL_ID][ARGS]{}[TOOL_CALLS]k[CALL_ID]Zyx987654[ARGS]{"
    turn = MistralParser()(text)
    assert [(c.name, c.id) for c in turn.calls] == [("f", None), ("g", "a1b2c3d4e"), ("h", None)]
    assert turn.errors == [
        "tool call 4: invalid JSON: Expecting property name enclosed in double quotes at char 1"
    ]
    # v3: a string "id" is kept; a missing, empty or non-string one gives None; a malformed
    # call between two others leaves their ids alone
    turn = MistralParser(max_parallel_calls=8)(
        '[TOOL_CALLS][{"name": "f", "arguments": {}, "id": "a1b2c3d4e"}, '
        '{"name": "g", "arguments": {}}, {"name": "bad" "arguments": {}, "id": "Zyx987654"}, '
        '{"name": "h", "arguments": {}, "id": 123456789}, {"name": "k", "arguments": {}, '
        '"id": ""}, {"name": "m", "arguments": {}, "id": "QqQqQqQqQ"}]'
    )
    assert [(c.name, c.id) for c in turn.calls] == [
        ("f", "a1b2c3d4e"),
        ("g", None),
        ("h", None),
        ("k", None),
        ("m", "QqQqQqQqQ"),
    ]
    assert turn.errors == ["tool call 3: invalid JSON: Expecting ',' delimiter at char 15"]


def test_mistral_malformed_calls_keep_neighbours() -> None:
    text = '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{"a": }[TOOL_CALLS]h[ARGS]{}'
    turn = MistralParser()(text)
    assert [c.name for c in turn.calls] == ["f", "h"]
    assert turn.errors == ["tool call 2: invalid JSON: Expecting value at char 6"]
    text = (
        '[TOOL_CALLS] [{"name": "f", "arguments": {}}, 3, {"name": "g" "arguments": {}}, '
        '{"name": "h", "arguments": {}}]'
    )
    turn = MistralParser()(text)
    assert [c.name for c in turn.calls] == ["f", "h"]
    assert turn.errors == [
        "tool call 2: expected a JSON object "
        '{"name": "<tool name>", "arguments": {...}}, got a number',
        "tool call 3: invalid JSON: Expecting ',' delimiter at char 13",
    ]
    turn = MistralParser()('[TOOL_CALLS]no args here[TOOL_CALLS]g[ARGS]{"a": [1]}')
    assert turn.calls == [ToolCall("g", {"a": [1]})] and len(turn.errors) == 1


# ---- pythonic ---------------------------------------------------------------------------


def test_pythonic_content_and_literals() -> None:
    parse = PythonicParser()
    assert parse("[1, 2] is the list.") == ParsedTurn("[1, 2] is the list.")
    turn = parse("<|python_tag|>[f(t=(1, 2), neg=-3, s='a' 'b')]<|eot_id|>")
    assert turn == ParsedTurn("", [ToolCall("f", {"t": [1, 2], "neg": -3, "s": "ab"})], [])


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("bad(1)", "positional arguments are not allowed"),
        ("bad(x=open('f'))", "must be a literal"),
        ("bad(**kw)", "**arguments are not allowed"),
        ("bad(x={1, 2})", "set is not a JSON value"),
        ("bad(x=1e999)", "not a finite number"),
        ("obj.bad(x=1)", "expected a call"),
        ("bad(x=)", "invalid Python call"),
        ("__import__('os').system('echo pwned')", "expected a call"),
    ],
)
def test_pythonic_malformed_element_keeps_neighbours(bad: str, error: str) -> None:
    turn = PythonicParser()(f"[f(a=1), {bad}, g()]")
    assert [c.name for c in turn.calls] == ["f", "g"]
    assert len(turn.errors) == 1 and turn.errors[0].startswith("tool call 2: ")
    assert error in turn.errors[0]


def test_pythonic_unclosed_list() -> None:
    assert PythonicParser()("[f(a=1), g(b=2)").errors == [
        "tool call 3: the tool call list is not closed with ]"
    ]
    turn = PythonicParser()("[f(a=1), g(b='unterminated")
    assert turn.calls == [ToolCall("f", {"a": 1})] and len(turn.errors) == 1


# ---- fuzz -------------------------------------------------------------------------------

_ALPHABET = list("{}[]()<>=,;:\"'\\ \nabcxyz019.-_") + [
    "<tool_call>",
    "</tool_call>",
    "<function=",
    "</function>",
    "<parameter=",
    "</parameter>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "[CALL_ID]",
    "<|python_tag|>",
    '"name"',
    '"arguments"',
    '"parameters"',
    "True",
    "1e999",
    "NaN",
    "</s>",
    "<|im_end|>",
]


def _mutate(rng: random.Random, text: str) -> str:
    for _ in range(rng.randint(1, 4)):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        op = rng.randrange(4)
        if op == 0:
            text = text[:i] + text[j:]
        elif op == 1:
            text = text[:i] + rng.choice(_ALPHABET) + text[i:]
        elif op == 2:
            text = text[:i]
        else:
            text = text[:i] + text[i:j] * rng.randint(2, 3) + text[j:]
    return text


@pytest.mark.parametrize("fmt", FORMATS)
def test_fuzz_never_raises(fmt: str) -> None:
    parser_cls, write = FORMATS[fmt]
    parser = parser_cls(max_parallel_calls=2)
    rng = random.Random(f"toolrl-{fmt}")
    valid = [write(calls) for calls in CORPUS]
    for _ in range(1500):
        text = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 60)))
        assert isinstance(parser(text), ParsedTurn)
        assert isinstance(parser(_mutate(rng, rng.choice(valid))), ParsedTurn)
    for deep in ("[" * 5000, "{" * 5000, "[f(x=" + "[" * 5000 + "]" * 5000 + ")]"):
        assert isinstance(parser(deep), ParsedTurn)


# ---- oracle: vLLM's own parsers ---------------------------------------------------------


class _Vocab:
    """The only tokenizer surface vLLM's parsers read when built: the special-token vocab."""

    def get_vocab(self) -> dict[str, int]:
        names = ["<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<tool_call>"]
        return {name: i for i, name in enumerate(names + ["</tool_call>"])}


# vLLM's qwen3_coder keeps every value a string unless a tool schema says otherwise, so its
# corpus uses string values only; our parser converts JSON-looking values (tested above).
_ORACLE = {
    "qwen3_coder": (
        "qwen3_coder",
        lambda c: all(isinstance(v, str) for _, a in c for v in a.values()),
    ),
    "llama3_json": ("llama3_json", lambda c: True),
    "mistral_v11": ("mistral", lambda c: True),
    "pythonic": ("pythonic", lambda c: True),
}


@pytest.mark.parametrize("fmt", _ORACLE)
def test_calls_agree_with_vllm(fmt: str) -> None:
    tool_parsers = pytest.importorskip("vllm.tool_parsers")
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    name, usable = _ORACLE[fmt]
    oracle = tool_parsers.ToolParserManager.get_tool_parser(name)(_Vocab())
    request = protocol.ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "q"}])
    parser_cls, write = FORMATS[fmt]
    corpus = [calls for calls in CORPUS if usable(calls)]
    corpus += [[("lookup", {"key": "a b", "note": "x=1, y=[2]"}), ("ping", {"host": "h"})]]
    for calls in corpus:
        text = write(calls)
        theirs = oracle.extract_tool_calls(text, request).tool_calls
        ours = parser_cls()(text)
        assert ours.errors == []
        expected = [(c.function.name, json.loads(c.function.arguments)) for c in theirs]
        assert [(c.name, c.arguments) for c in ours.calls] == expected
        assert len(expected) == len(calls)
