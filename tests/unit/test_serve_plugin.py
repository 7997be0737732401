"""The vLLM tool-parser plugin (toolrl/serve/vllm_plugin.py) returns what training parses.

Every text is read three ways and must agree: by toolrl's own parser after its reasoning
step (the oracle, built here from the parser classes), through vLLM's own composite parser
in one piece (`Parser.parse`, what a non-streaming response holds), and streamed through
`Parser.parse_delta` in random-size chunks and token by token as vLLM's detokenizer cuts
them (the embedded tokenizer, `tokenizers.decoders.DecodeStream`): the content deltas joined
and the tool-call deltas merged by index must equal the non-streaming response. Texts: the
parser corpora of tests/unit/test_parsers.py (markup inside strings), with prose, a reasoning
block holding a call, and cut short; the real-template round trips of
tests/unit/test_parser_roundtrip.py; and a seeded fuzz run of mutated turns.

    python -m pytest tests/unit/test_serve_plugin.py
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm.tool_parsers")

from tokenizers.decoders import DecodeStream  # noqa: E402
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest  # noqa: E402
from vllm.parser.parser_manager import ParserManager  # noqa: E402
from vllm.tool_parsers import ToolParserManager  # noqa: E402

from tests.unit import test_parser_roundtrip as roundtrip  # noqa: E402
from tests.unit.test_parser_edges import _mutate  # noqa: E402
from tests.unit.test_parsers import CORPUS, FORMATS, HOSTILE_CORPUS, schemas_for  # noqa: E402
from toolrl.config import ConfigError  # noqa: E402
from toolrl.rollout.parsers.base import ParsedTurn  # noqa: E402
from toolrl.rollout.parsers.hermes import HermesParser  # noqa: E402
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser  # noqa: E402
from toolrl.rollout.parsers.mistral import MistralParser  # noqa: E402
from toolrl.rollout.parsers.pythonic import PythonicParser  # noqa: E402
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser  # noqa: E402
from toolrl.rollout.parsers.reasoning import NoReasoning, TagReasoning  # noqa: E402
from toolrl.serve import vllm_plugin  # noqa: E402
from toolrl.serve.__main__ import command  # noqa: E402

QWEN3, MISTRAL_THINK = TagReasoning("<think>", "</think>"), TagReasoning("[THINK]", "[/THINK]")
# Each registered name: the oracle parser (given the request's tool schemas) and the reasoning
# step its conf/parser/<name>.yaml picks.
ORACLES: dict[str, tuple[Callable[[list[dict]], Any], TagReasoning]] = {
    "toolrl-hermes": (lambda s: HermesParser(), QWEN3),
    "toolrl-qwen3_coder": (lambda s: Qwen3CoderParser(tool_schemas=s), QWEN3),
    "toolrl-llama3_json": (lambda s: Llama3JsonParser(), QWEN3),
    "toolrl-mistral": (lambda s: MistralParser(), MISTRAL_THINK),
    "toolrl-pythonic": (lambda s: PythonicParser(), QWEN3),
}
# The corpus formats of tests/unit/test_parsers.py and the name that serves each.
SERVED_AS = {"hermes": "toolrl-hermes", "qwen3_coder": "toolrl-qwen3_coder"}
SERVED_AS |= {"llama3_json": "toolrl-llama3_json", "pythonic": "toolrl-pythonic"}
SERVED_AS |= {"mistral_v11": "toolrl-mistral", "mistral_array": "toolrl-mistral"}
ALL_SCHEMAS = schemas_for(CORPUS + HOSTILE_CORPUS)
# (name, decoded arguments, call id) per call
Calls = list[tuple[str, Any, str | None]]


@pytest.fixture(scope="module")
def tok(embedded_base: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_base)


def request(tools: list[dict] | None, tool_choice: Any = "auto", **extra: Any):
    messages = [{"role": "user", "content": "Use the tools."}]
    if tools is None:
        return ChatCompletionRequest(model="m", messages=messages, **extra)
    return ChatCompletionRequest(
        model="m", messages=messages, tools=tools, tool_choice=tool_choice, **extra
    )


def oracle(name: str, text: str, schemas: list[dict], opened: bool = False) -> ParsedTurn:
    make, reasoning = ORACLES[name]
    return make(schemas)(reasoning(text, opened).text)


def served(name: str, tok: Any, req: Any, text: str) -> tuple[str | None, Calls]:
    """(content, calls) of a non-streaming response: vLLM's composite parser in one piece."""
    parser = ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True)(tok, req.tools)
    _, content, calls = parser.parse(text, req, enable_auto_tools=True)
    return content, [(c.name, json.loads(c.arguments), c.id) for c in calls or []]


def streamed(name: str, tok: Any, req: Any, pieces: list[str]) -> tuple[str, Calls]:
    """(content, calls) of a stream of `pieces` through vLLM's composite parser: content
    deltas joined, tool-call deltas merged by index (as an OpenAI client merges them)."""
    parser = ParserManager.get_parser(tool_parser_name=name, enable_auto_tools=True)(tok, req.tools)
    content, merged = "", {}
    pieces = pieces or [""]
    for i, piece in enumerate(pieces):
        delta = parser.parse_delta(piece, [], req, [0], finished=i == len(pieces) - 1)
        content += (delta.content or "") if delta else ""
        for tc in delta.tool_calls if delta else []:
            call = merged.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
    calls = [merged[i] for i in sorted(merged)]
    assert sorted(merged) == list(range(len(merged)))
    return content, [(c["name"], json.loads(c["arguments"]), c["id"]) for c in calls]


def random_pieces(text: str, rng: random.Random) -> list[str]:
    cuts = sorted({rng.randrange(len(text) + 1) for _ in range(len(text) // 3)})
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def token_pieces(tok: Any, text: str) -> list[str]:
    """The text deltas vLLM's detokenizer makes of the text's tokens (None: bytes held)."""
    stream = DecodeStream(skip_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    return [piece or "" for piece in (stream.step(tok._tokenizer, i) for i in ids)]


def check(name: str, tok: Any, text: str, schemas: list[dict], rng: random.Random) -> ParsedTurn:
    """Assert the three readings agree on `text`; return the oracle's."""
    want = oracle(name, text, schemas)
    req = request(schemas)
    expected = [(c.name, c.arguments, c.id) for c in want.calls]
    content, calls = served(name, tok, req, text)
    assert content == (want.content or None), text
    assert sampled_ids(calls) == expected, text
    for pieces in (random_pieces(text, rng), token_pieces(tok, text), [text]):
        got_content, got_calls = streamed(name, tok, req, pieces)
        assert got_content == want.content, (text, pieces)
        assert sampled_ids(got_calls) == expected, pieces
        assert all(i for _, _, i in got_calls)  # every streamed call has an id
    return want


def sampled_ids(calls: Calls) -> Calls:
    """The calls with only the ids the model wrote (Mistral's); vLLM makes up the others."""
    return [(n, a, None if i.startswith("chatcmpl-tool-") else i) for n, a, i in calls]


def variants(fmt: str, calls: list[tuple[str, dict]]) -> list[str]:
    """A corpus turn as written, after prose, after a reasoning block holding a call, cut."""
    write = FORMATS[fmt][1]
    text = write(calls)
    think = ("[THINK]", "[/THINK]") if fmt.startswith("mistral") else ("<think>", "</think>")
    out = [text, "Sure, one moment.\n" + text]
    out.append(f"\n{think[0]}plan: {write(calls[:1])}{think[1]}\n" + text)
    out += [text[: len(text) * k // 5] for k in (1, 2, 3, 4)]
    return out


@pytest.mark.parametrize("fmt", list(SERVED_AS))
def test_corpus_turns_served_as_training_reads_them(fmt: str, tok: Any) -> None:
    rng, name, read = random.Random(fmt), SERVED_AS[fmt], 0
    for calls in CORPUS + HOSTILE_CORPUS:
        for text in variants(fmt, calls):
            read += len(check(name, tok, text, ALL_SCHEMAS, rng).calls)
    assert read > 40  # not vacuous: most texts hold calls


@pytest.mark.parametrize("family", list(roundtrip.FAMILIES))
def test_real_template_turns_served_as_training_reads_them(family: str, tok: Any) -> None:
    named = {HermesParser: "toolrl-hermes", Llama3JsonParser: "toolrl-llama3_json"}
    named |= {MistralParser: "toolrl-mistral", PythonicParser: "toolrl-pythonic"}
    name = named.get(roundtrip.FAMILIES[family].parser, "toolrl-qwen3_coder")
    rng, read = random.Random(family), 0
    for _, text, _, _ in roundtrip.turns(family)[:25]:
        read += len(check(name, tok, text, roundtrip.TOOLS, rng).calls)
    assert read >= 25


@pytest.mark.parametrize("name", list(ORACLES))
def test_fuzzed_turns_stream_like_they_parse(name: str, tok: Any) -> None:
    # Mutated turns (cut, duplicated spans, stray markers): where a streamed prefix of the
    # content could be wrong, the joined stream would differ from the whole-text parse.
    fmts = [f for f, n in SERVED_AS.items() if n == name]
    valid = [FORMATS[f][1](calls) for f in fmts for calls in CORPUS + HOSTILE_CORPUS]
    valid += ["Plain prose answer.  ", "  <think>x</think> {a} [b] <|im_end|> tail \n"]
    rng = random.Random(f"serve-{name}")
    for _ in range(150):
        text = _mutate(rng, rng.choice(valid))
        if rng.random() < 0.3:
            text = rng.choice(("<think>", "[THINK]", " ")) + text
        check(name, tok, text, ALL_SCHEMAS, rng)


def test_a_call_inside_reasoning_is_not_returned(tok: Any) -> None:
    call = '<tool_call>\n{"name": "rm", "arguments": {"path": "/"}}\n</tool_call>'
    good = '<tool_call>\n{"name": "f", "arguments": {"x": "</think>"}}\n</tool_call>'
    text = f"<think>should I {call}?</think>Answer: {good}"
    want = check("toolrl-hermes", tok, text, ALL_SCHEMAS, random.Random(0))
    assert [c.name for c in want.calls] == ["f"] and want.content == "Answer:"
    # never closed: all reasoning, so no call and no content
    unclosed = check("toolrl-hermes", tok, f"<think>{call}", ALL_SCHEMAS, random.Random(1))
    assert unclosed == ParsedTurn("")


def test_a_prompt_that_opens_reasoning_starts_the_turn_inside_it(tok: Any) -> None:
    # The request's template ends its generation prompt with <think>: as in training, the
    # turn up to the first </think> is reasoning even without a <think> of its own.
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
    )
    call = '<tool_call>\n{"name": "%s", "arguments": {}}\n</tool_call>'
    text = f"plan {call % 'a'}\n</think>\n\nNow {call % 'b'}"
    req = request(ALL_SCHEMAS, chat_template=template)
    assert oracle("toolrl-hermes", text, [], opened=True).content == "Now"
    content, calls = served("toolrl-hermes", tok, req, text)
    assert content == "Now" and [c[0] for c in calls] == ["b"]
    content, calls = streamed("toolrl-hermes", tok, req, token_pieces(tok, text))
    assert content == "Now" and [c[0] for c in calls] == ["b"]
    # the same text without that prompt: no leading <think>, so everything is read
    content, calls = served("toolrl-hermes", tok, request(ALL_SCHEMAS), text)
    assert [c[0] for c in calls] == ["a", "b"]


@pytest.mark.parametrize("tools", [ALL_SCHEMAS, None])
def test_tool_choice_none_returns_the_text_after_reasoning_and_no_calls(
    tok: Any, tools: list | None
) -> None:
    text = '<think>hm</think>Text <tool_call>{"name": "f", "arguments": {}}</tool_call> end '
    rest = text.split("</think>")[1]  # as written: the call's markup stays, nothing is stripped
    req = request(tools, "none")
    assert served("toolrl-hermes", tok, req, text) == (rest, [])
    for pieces in (token_pieces(tok, text), [text]):
        assert streamed("toolrl-hermes", tok, req, pieces) == (rest, [])


def test_mistral_call_ids_are_kept(tok: Any) -> None:
    text = '[TOOL_CALLS]f[CALL_ID]a1b2c3d4e[ARGS]{"x": 1}[TOOL_CALLS]g[ARGS]{}</s>'
    req = request(ALL_SCHEMAS)
    _, calls = served("toolrl-mistral", tok, req, text)
    assert calls[0] == ("f", {"x": 1}, "a1b2c3d4e") and calls[1][2].startswith("chatcmpl-tool")
    _, calls = streamed("toolrl-mistral", tok, req, token_pieces(tok, text))
    assert calls[0] == ("f", {"x": 1}, "a1b2c3d4e") and calls[1][:2] == ("g", {})


def test_content_streams_before_a_call_opens(tok: Any) -> None:
    # Correctness before latency, but prose before any call is not held back.
    parser = ToolParserManager.get_tool_parser("toolrl-hermes")(tok)
    req = request(ALL_SCHEMAS)
    got = [
        parser.extract_tool_calls_streaming("", "", piece, [], [], [], req)
        for piece in (
            "The answer ",
            "is 4",
            ". <tool",
            '_call>{"name": "f", "arguments": {}}</tool_call>',
        )
    ]
    assert [d.content if d else None for d in got] == ["The answer", " is 4", ".", None]
    end = parser.finish_streaming()
    assert end.content is None and [c.function.name for c in end.tool_calls] == ["f"]


def test_every_name_is_registered_with_its_configs_reasoning(tok: Any) -> None:
    for name, (make, reasoning) in ORACLES.items():
        reader = ToolParserManager.get_tool_parser(name)(tok).reader
        assert type(reader.parser) is type(make([])) and reader.reasoning == reasoning
        assert reader.parser.max_parallel_calls == 4  # conf/parser/*.yaml


def test_the_toolrl_name_reads_the_run_config(tok: Any, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    spec = "parser:\n  _target_: toolrl.rollout.parsers.pythonic.PythonicParser\n"
    spec += "  max_parallel_calls: 1\n  reasoning:\n"
    spec += "    _target_: toolrl.rollout.parsers.reasoning.NoReasoning\n"
    (run / ".hydra" / "config.yaml").write_text(spec)
    (run / "checkpoint").mkdir()
    cls = ToolParserManager.get_tool_parser("toolrl")
    for source in (run, run / "checkpoint", run / ".hydra" / "config.yaml"):
        monkeypatch.setenv("TOOLRL_PARSER", str(source))
        reader = cls(tok).reader
        assert reader.parser == PythonicParser(max_parallel_calls=1)
        assert reader.reasoning == NoReasoning()
    monkeypatch.setenv("TOOLRL_PARSER", "parser=qwen3_coder parser/reasoning=none")
    reader = cls(tok, request(ALL_SCHEMAS).tools).reader
    assert isinstance(reader.parser, Qwen3CoderParser) and reader.reasoning == NoReasoning()
    assert reader.parser.tool_schemas  # the request's tools type the XML values
    monkeypatch.setenv("TOOLRL_PARSER", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError):
        cls(tok)
    monkeypatch.delenv("TOOLRL_PARSER")
    with pytest.raises(ValueError, match="TOOLRL_PARSER"):
        cls(tok)


NAMED = {"type": "function", "function": {"name": "get_weather"}}


def test_adjust_request_sets_vllms_constraints(tok: Any) -> None:
    parser = ToolParserManager.get_tool_parser("toolrl-hermes")(tok)
    auto = parser.adjust_request(request(ALL_SCHEMAS))
    assert auto.skip_special_tokens is False and auto.structured_outputs is None
    assert parser.adjust_request(request(ALL_SCHEMAS, "none")).skip_special_tokens is True
    # required / named: the JSON schemas vLLM's own parsers are constrained with
    required = parser.adjust_request(request(ALL_SCHEMAS, "required")).structured_outputs.json
    assert required["type"] == "array" and len(required["items"]["anyOf"]) == len(ALL_SCHEMAS)
    named = parser.adjust_request(request(ALL_SCHEMAS, NAMED)).structured_outputs.json
    assert named == {"properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}


@pytest.mark.parametrize(
    ("choice", "text", "want"),
    [
        ("required", '[{"name": "f", "parameters": {"x": "[<tool_call>]"}}, {"name": "g", '
         '"parameters": {}}]', [("f", {"x": "[<tool_call>]"}), ("g", {})]),
        ("required", '[{"name": "f", "parameters": {"x": 1', []),  # cut short: no call
        (NAMED, '{"city": "Paris", "days": 3}', [("get_weather", {"city": "Paris", "days": 3})]),
    ],
)  # fmt: skip
def test_required_and_named_read_the_json_they_are_constrained_to(
    tok: Any, choice: Any, text: str, want: list
) -> None:
    req = request(ALL_SCHEMAS, choice)
    content, calls = served("toolrl-hermes", tok, req, text)
    assert [(n, a) for n, a, _ in calls] == want and content == (None if want else text)
    for pieces in (token_pieces(tok, text), [text]):
        content, calls = streamed("toolrl-hermes", tok, req, pieces)
        assert [(n, a) for n, a, _ in calls] == want and content == ("" if want else text)


def test_the_serve_command_fills_in_the_plugin(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("parser: {}\n")
    cmd, env = command([str(run / "checkpoint"), "--dtype", "float32"])
    assert str(run / "checkpoint") in cmd[1:5] and cmd[-2:] == ["--dtype", "float32"]
    assert cmd[cmd.index("--tool-parser-plugin") + 1] == vllm_plugin.__file__
    assert (
        cmd[cmd.index("--tool-call-parser") + 1] == "toolrl" and "--enable-auto-tool-choice" in cmd
    )
    assert env == {"TOOLRL_PARSER": str(run.resolve())}
    cmd, env = command(["/ckpt", "--parser=pythonic"])
    assert cmd[-1] == "toolrl-pythonic" and env == {}
    cmd, env = command(["/ckpt", "--parser", "parser=hermes parser/reasoning=none"])
    assert cmd[-1] == "toolrl" and env == {"TOOLRL_PARSER": "parser=hermes parser/reasoning=none"}
    assert command(["/ckpt"])[0][-1] == "toolrl-hermes"
