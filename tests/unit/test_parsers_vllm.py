"""The tool-call parsers against vLLM's own parsers of the same formats (the oracle).

They agree on a corpus of valid turns; the cases where toolrl reads a turn differently on
purpose are listed in DISAGREEMENTS, each with why, and each checks both sides, so a vLLM
release that changes its reading shows up here.

    python -m pytest tests/unit/test_parsers_vllm.py
"""

from __future__ import annotations

import json

import pytest

from tests.unit.test_parsers import CORPUS, FORMATS, Args, schemas_for


class _Vocab:
    """The only tokenizer surface vLLM's parsers read when built: the special-token vocab."""

    def get_vocab(self) -> dict[str, int]:
        names = ["<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "<tool_call>"]
        return {name: i for i, name in enumerate(names + ["</tool_call>"])}


def vllm_calls(fmt: str, text: str, schemas: list[dict[str, object]]) -> list[tuple[str, Args]]:
    """The (name, arguments) vLLM's own parser for the format reads from text."""
    tool_parsers = pytest.importorskip("vllm.tool_parsers")
    protocol = pytest.importorskip("vllm.entrypoints.openai.chat_completion.protocol")
    name = {"mistral_v11": "mistral", "mistral_array": "mistral"}.get(fmt, fmt)
    oracle = tool_parsers.ToolParserManager.get_tool_parser(name)(_Vocab())
    messages = [{"role": "user", "content": "q"}]
    request = protocol.ChatCompletionRequest(model="m", messages=messages, tools=schemas or None)
    found = oracle.extract_tool_calls(text, request)
    return [(c.function.name, _json_or_text(c.function.arguments)) for c in found.tool_calls]


def _json_or_text(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # vLLM returned a piece of a call, not JSON


@pytest.mark.parametrize("fmt", ["qwen3_coder", "llama3_json", "mistral_v11", "pythonic"])
def test_calls_agree_with_vllm(fmt: str) -> None:
    # vLLM's qwen3_coder types values by the request's tool schemas, as toolrl's does by its.
    parser_cls, write = FORMATS[fmt]
    corpus = CORPUS + [[("lookup", {"key": "a b", "note": "x=1, y=[2]"}), ("ping", {"host": "h"})]]
    schemas = schemas_for(corpus) if fmt == "qwen3_coder" else []
    for calls in corpus:
        text = write(calls)
        expected = vllm_calls(fmt, text, schemas)
        ours = parser_cls()(text)
        assert ours.errors == [] and len(expected) == len(calls)
        assert [(c.name, c.arguments) for c in ours.calls] == expected


# Where toolrl reads a turn differently from vLLM on purpose: (format, text, toolrl's calls).
# Each case checks both sides, so a vLLM release that changes its reading shows up here.
DISAGREEMENTS = {
    # vLLM cuts the block at the first </tool_call>, inside the string, and runs no call.
    "marker in a hermes string": (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"s": "a</tool_call>b"}}\n</tool_call>',
        [("f", {"s": "a</tool_call>b"})],
    ),
    # vLLM splits at the [TOOL_CALLS] inside the string and invents a call to g.
    "marker in a mistral string": (
        "mistral_v11",
        '[TOOL_CALLS]f[ARGS]{"s": "[TOOL_CALLS]g[ARGS]{}"}',
        [("f", {"s": "[TOOL_CALLS]g[ARGS]{}"})],
    ),
    "marker in a mistral array": (
        "mistral_array",
        '[TOOL_CALLS][{"name": "f", "arguments": {"s": "[TOOL_CALLS]"}}]',
        [("f", {"s": "[TOOL_CALLS]"})],
    ),
    # vLLM keeps the last of two values for one key; toolrl answers with an error, since
    # it cannot know which value the model meant.
    "a JSON key given twice": (
        "hermes",
        '<tool_call>\n{"name": "f", "arguments": {"s": 1, "s": 2}}\n</tool_call>',
        [],
    ),
    "a keyword given twice": ("pythonic", "[f(s=1, s=2)]", []),
    # vLLM finds a pythonic list only at the start of the turn.
    "a call list after prose": ("pythonic", 'Sure: [f(s="x")]', [("f", {"s": "x"})]),
}


@pytest.mark.parametrize("case", DISAGREEMENTS)
def test_where_toolrl_disagrees_with_vllm(case: str) -> None:
    fmt, text, ours = DISAGREEMENTS[case]
    assert [(c.name, c.arguments) for c in FORMATS[fmt][0]()(text).calls] == ours
    assert vllm_calls(fmt, text, []) != ours
