"""Edge inputs for every tool-call parser: floods of broken calls, a missing quote, records
quoted in prose, numbers JSON allows but floats cannot hold, and a seeded fuzz run asserting
no parser raises on any string.

    python -m pytest tests/unit/test_parser_edges.py
"""

from __future__ import annotations

import random

import pytest

from tests.unit.test_parsers import CORPUS, FORMATS
from toolrl.rollout.parsers.base import MAX_CALLS_READ, ParsedTurn
from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.trajectory import ToolCall


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_flood_of_broken_calls_is_read_up_to_a_limit(fmt: str) -> None:
    # 1,000 malformed calls give 64 errors and one saying the rest was not read: a bounded
    # answer for the model, and bounded time (every JSON error counts lines from the start).
    broken = {
        "hermes": "<tool_call>{x}</tool_call>",
        "qwen3_coder": "<tool_call><function=f>x</function></tool_call>",
        "llama3_json": "{x}; ",
        "mistral_v11": "[TOOL_CALLS]f[ARGS]{x}",
        "mistral_array": "[TOOL_CALLS][" + "{x}, " * 999 + "{x}]",
        "pythonic": "[" + "f(1), " * 1000 + "]",
    }[fmt]
    text = broken if fmt in ("mistral_array", "pythonic") else broken * 1000
    turn = FORMATS[fmt][0]()(text)
    assert turn.calls == [] and len(turn.errors) == MAX_CALLS_READ + 1
    assert turn.errors[-1].startswith(f"tool call {MAX_CALLS_READ + 1}: not read")


def test_one_missing_quote_does_not_hide_the_calls_after_it() -> None:
    # A JSON string cannot hold a raw newline, so an unclosed one ends with its line.
    text = '<tool_call>\n{"name": "f", "arguments": {"x": "abc}}\n</tool_call>\n'
    text += '<tool_call>\n{"name": "g", "arguments": {}}\n</tool_call>'
    turn = HermesParser()(text)
    assert turn.calls == [ToolCall("g", {})] and len(turn.errors) == 1


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        ("hermes", '<tool_call>{"name": "f", "arguments": {"x": 1e400}}</tool_call>'),
        ("llama3_json", '{"name": "f", "parameters": {"x": -1e999}}'),
        ("mistral_v11", '[TOOL_CALLS]f[ARGS]{"x": 1e400}'),
    ],
)
def test_a_number_too_large_for_a_float_is_an_error(fmt: str, text: str) -> None:
    turn = FORMATS[fmt][0]()(text)
    assert turn.calls == [] and "too large for a number" in turn.errors[0]


def test_llama3_an_object_nested_in_a_quoted_record_is_not_a_call() -> None:
    text = 'The record: {"user": {"name": "get_weather", "parameters": {"city": "x"}}}'
    assert Llama3JsonParser()(text) == ParsedTurn(text)


def test_mistral_reads_on_after_a_malformed_call_and_after_prose() -> None:
    turn = MistralParser()("[TOOL_CALLS]f[ARGS]{x}g[ARGS]{}")
    assert turn.calls == [ToolCall("g", {})] and len(turn.errors) == 1
    turn = MistralParser()("[TOOL_CALLS]f[ARGS]{} Now also [TOOL_CALLS]g[ARGS]{}</s>")
    assert turn == ParsedTurn("Now also", [ToolCall("f", {}), ToolCall("g", {})], [])
    turn = MistralParser()('[TOOL_CALLS]{"name": "f", "arguments": {}}')  # no brackets
    assert turn.calls == [ToolCall("f", {})]


def test_pythonic_a_dict_key_given_twice_is_an_error() -> None:
    turn = PythonicParser()("[f(x={'a': 1, 'a': 2}), g()]")
    assert turn.calls == [ToolCall("g", {})] and "key 'a' is given twice" in turn.errors[0]


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
