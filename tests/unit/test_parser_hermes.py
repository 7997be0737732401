"""Unit tests for the Hermes / Qwen2.5 tool-call parser.

Run `python -m pytest tests/unit/test_parser_hermes.py`.
"""

from __future__ import annotations

import json
import random

import pytest

from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.rollout.parsers.hermes import CLOSE, END_OF_TURN, OPEN, HermesParser
from toolrl.rollout.trajectory import ToolCall


def block(payload: str, sep: str = "\n") -> str:
    return f"{OPEN}{sep}{payload}{sep}{CLOSE}"


def call_json(name: str = "calculator", **arguments: object) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def test_single_call_with_content_and_end_marker() -> None:
    text = f"Let me compute.\n{block(call_json(expression='2+2'))}{END_OF_TURN}"
    turn = HermesParser()(text)
    assert turn == ParsedTurn(
        "Let me compute.", [ToolCall("calculator", {"expression": "2+2"})], []
    )


def test_plain_answer_without_calls() -> None:
    assert HermesParser()("  The answer is 4.  \n<|im_end|>\n") == ParsedTurn("The answer is 4.")
    assert HermesParser()("The answer is 4.") == ParsedTurn("The answer is 4.")
    assert HermesParser()("") == ParsedTurn("")


@pytest.mark.parametrize("sep", ["", " ", "\n", "\n\n  ", "\t\r\n"])
def test_whitespace_around_json_varies(sep: str) -> None:
    turn = HermesParser()(block(call_json(expression="1"), sep=sep))
    assert turn.calls == [ToolCall("calculator", {"expression": "1"})]
    assert turn.errors == [] and turn.content == ""


def test_several_calls_in_order_and_content_between() -> None:
    text = "a " + block(call_json("f", x=1)) + " b " + block(call_json("g")) + " c"
    turn = HermesParser()(text)
    assert [c.name for c in turn.calls] == ["f", "g"]
    assert turn.calls[0].arguments == {"x": 1} and turn.calls[1].arguments == {}
    assert turn.content == "a  b  c"


def test_invalid_json_gives_one_error_and_keeps_other_calls() -> None:
    bad = '{"name": "calculator" "arguments": {}}'
    text = block(call_json("f")) + block(bad) + block(call_json("g"))
    turn = HermesParser()(text)
    assert [c.name for c in turn.calls] == ["f", "g"]
    assert turn.errors == ["tool call 2: invalid JSON: Expecting ',' delimiter at char 22"]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ("[1, 2]", "expected a JSON object"),
        ('"calculator"', "got a string"),
        ('{"arguments": {}}', 'missing "name"'),
        (
            '{"name": 3, "arguments": {}}',
            '"name" must be a non-empty string, got a number',
        ),
        ('{"name": "", "arguments": {}}', '"name" must be a non-empty string'),
        ('{"name": null, "arguments": {}}', "got null"),
        ('{"name": "f"}', 'missing "arguments"'),
        (
            '{"name": "f", "arguments": [1]}',
            '"arguments" must be a JSON object, got an array',
        ),
        ('{"name": "f", "arguments": 7}', "got a number"),
        ('{"name": "f", "arguments": "[1]"}', "got a string that is not one"),
        ('{"name": "f", "arguments": "not json"}', "got a string that is not one"),
        (
            '{"name": "f", "arguments": {"x": NaN}}',
            "invalid JSON: NaN is not valid JSON",
        ),
        ('{"name": "f", "arguments": {}} trailing', "invalid JSON: Extra data at char 31"),
        ('{"name": "f", "arguments": {"a": 1, "a": 2}}', 'key "a" is given twice'),
        ('{"name": "f", "name": "g", "arguments": {}}', 'key "name" is given twice'),
        ("", "empty tool call"),
        ("   \n ", "empty tool call"),
        ("[" * 100_000, "invalid JSON"),
        ('{"name": "f", "arguments": {"n": ' + "9" * 5000 + "}}", "invalid JSON"),
    ],
)
def test_each_malformed_shape_gives_one_error(payload: str, message: str) -> None:
    text = block(call_json("ok")) + block(payload)
    turn = HermesParser()(text)
    assert turn.calls == [ToolCall("ok", {})]
    assert len(turn.errors) == 1
    assert turn.errors[0].startswith("tool call 2: ")
    assert message in turn.errors[0]


def test_arguments_encoded_as_json_string_are_accepted() -> None:
    payload = json.dumps({"name": "f", "arguments": json.dumps({"x": [1, 2]})})
    assert HermesParser()(block(payload)).calls == [ToolCall("f", {"x": [1, 2]})]


def test_extra_keys_are_ignored() -> None:
    payload = '{"name": "f", "arguments": {}, "id": "abc"}'
    assert HermesParser()(block(payload)).calls == [ToolCall("f", {})]


def test_unclosed_call_at_end() -> None:
    text = (
        "hi " + block(call_json("f")) + f' {OPEN}\n{{"name": "g", "arguments": {{}}}}{END_OF_TURN}'
    )
    turn = HermesParser()(text)
    assert turn.calls == [ToolCall("f", {})]
    assert turn.errors == [f"tool call 2: {OPEN} is not closed with {CLOSE}"]
    assert turn.content == "hi"  # the unclosed body is neither content nor a call


def test_unclosed_call_followed_by_another_call() -> None:
    text = OPEN + call_json("f") + "\n" + block(call_json("g"))
    turn = HermesParser()(text)
    assert turn.calls == [ToolCall("g", {})]
    assert turn.errors == [f"tool call 1: {OPEN} is not closed with {CLOSE}"]


def test_calls_beyond_the_limit_are_reported_not_dropped() -> None:
    text = "".join(block(call_json(f"t{i}")) for i in range(6))
    turn = HermesParser(max_parallel_calls=4)(text)
    assert [c.name for c in turn.calls] == ["t0", "t1", "t2", "t3"]
    assert len(turn.errors) == 2
    assert turn.errors[0].startswith("tool call 5: not run: at most 4 tool calls")
    assert turn.errors[1].startswith("tool call 6: ")


def test_malformed_calls_do_not_use_up_the_limit() -> None:
    text = block("{bad") + block(call_json("a")) + block(call_json("b"))
    turn = HermesParser(max_parallel_calls=2)(text)
    assert [c.name for c in turn.calls] == ["a", "b"]
    expected = "tool call 1: invalid JSON: Expecting property name enclosed in double quotes"
    assert turn.errors == [expected + " at char 1"]


def test_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_parallel_calls"):
        HermesParser(max_parallel_calls=0)


# --- fuzzing: the parser must return a well-typed ParsedTurn for any string ---------------

_ATOMS = [
    OPEN,
    CLOSE,
    END_OF_TURN,
    "{",
    "}",
    "[",
    "]",
    '"',
    ":",
    ",",
    "\\",
    "\n",
    " ",
    '"name"',
    '"arguments"',
    "null",
    "NaN",
    "1e999",
    "-",
    "0",
    "é",
    "\x00",
    "\ud800",
    "<tool_call",
    "tool_call>",
    "</",
    "<|im_end|",
]


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 40)):
        if rng.random() < 0.7:
            parts.append(rng.choice(_ATOMS))
        else:
            parts.append("".join(chr(rng.randint(0, 0x2FF)) for _ in range(rng.randint(1, 5))))
    return "".join(parts)


def _valid_output(rng: random.Random) -> str:
    calls = [
        block(call_json(rng.choice("fgh"), x=rng.randint(-9, 9), s="<a>"))
        for _ in range(rng.randint(0, 6))
    ]
    return "thinking " + " ".join(calls) + rng.choice(["", END_OF_TURN, END_OF_TURN + "\n"])


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        i = rng.randint(0, len(chars))
        kind = rng.randrange(4)
        if kind == 0 and chars:
            del chars[min(i, len(chars) - 1)]
        elif kind == 1:
            chars.insert(i, rng.choice(_ATOMS))
        elif kind == 2 and chars:
            chars[min(i, len(chars) - 1)] = chr(rng.randint(0, 0x7F))
        else:
            chars = chars[:i]  # truncation, as when generation hits the length limit
    return "".join(chars)


def test_fuzz_never_raises_and_accounts_for_blocks() -> None:
    rng = random.Random(1234)
    parser = HermesParser(max_parallel_calls=3)
    for n in range(4000):
        text = _random_text(rng) if n % 2 else _mutate(rng, _valid_output(rng))
        turn = parser(text)
        assert isinstance(turn, ParsedTurn)
        assert isinstance(turn.content, str) and turn.content == turn.content.strip()
        assert len(turn.calls) <= 3
        for call in turn.calls:
            assert isinstance(call, ToolCall)
            assert isinstance(call.name, str) and call.name
            assert isinstance(call.arguments, dict)
        assert all(isinstance(e, str) and e.startswith("tool call ") for e in turn.errors)
        # An opening tag inside a JSON string is data, so blocks can be fewer than tags; but
        # a turn with a tag never loses every block silently, and without one has none.
        blocks = len(turn.calls) + len(turn.errors)
        assert (blocks >= 1 if OPEN in text else blocks == 0) and blocks <= text.count(OPEN)
