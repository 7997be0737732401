"""The reasoning step that runs before call parsing (toolrl/rollout/parsers/reasoning.py).

Run `python -m pytest tests/unit/test_reasoning.py`.
"""

from __future__ import annotations

import pytest

from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.reasoning import NoReasoning, Reasoned, TagReasoning

QWEN3 = TagReasoning("<think>", "</think>")
MISTRAL = TagReasoning("[THINK]", "[/THINK]")
CALL = '<tool_call>\n{"name": "rm", "arguments": {"path": "/"}}\n</tool_call>'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>\nplan\n</think>\n\nanswer", Reasoned("\nplan\n", "\n\nanswer")),
        ("  \n<think>plan</think>answer", Reasoned("plan", "answer")),
        ("<think></think>answer", Reasoned("", "answer")),
        ("no reasoning here", Reasoned("", "no reasoning here")),
        # only a leading block is reasoning: later tags are text (e.g. in a string argument)
        ("answer <think>x</think> more", Reasoned("", "answer <think>x</think> more")),
        # unclosed: the rest of the turn is reasoning
        ("<think>still thinking " + CALL, Reasoned("still thinking " + CALL, "")),
        # the first end tag closes the block
        ("<think>a</think>b</think>c", Reasoned("a", "b</think>c")),
        ("", Reasoned("", "")),
    ],
)
def test_qwen3_leading_block(text: str, expected: Reasoned) -> None:
    assert QWEN3(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("plan\n</think>\n\nanswer", Reasoned("plan\n", "\n\nanswer")),
        ("plan without an end " + CALL, Reasoned("plan without an end " + CALL, "")),
        ("</think>answer", Reasoned("", "answer")),
    ],
)
def test_a_block_the_prompt_opened(text: str, expected: Reasoned) -> None:
    assert QWEN3(text, opened=True) == expected


@pytest.mark.parametrize(
    ("prompt", "opened"),
    [
        ("<|im_start|>assistant\n", False),
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),  # thinking switched off
        ("<think>old</think> ... <|im_start|>assistant\n<think>", True),
        ("<think>old</think> ... <|im_start|>assistant\n", False),
    ],
)
def test_opened_by_reads_the_last_tag_of_the_prompt(prompt: str, opened: bool) -> None:
    assert QWEN3.opened_by(prompt) is opened and NoReasoning().opened_by(prompt) is False


def test_calls_in_reasoning_never_reach_the_parser() -> None:
    split = QWEN3("<think>should I " + CALL + "?</think>No, I will answer: 4.")
    assert HermesParser()(split.text).calls == [] and CALL in split.reasoning
    text = "[THINK]maybe [TOOL_CALLS]rm[ARGS]{}[/THINK]Answer."
    assert MistralParser()(MISTRAL(text).text).calls == []
    assert MistralParser()(text).calls != []  # without the step the call would run


def test_no_reasoning_passes_everything_on() -> None:
    assert NoReasoning()("<think>x</think>y", opened=True) == Reasoned("", "<think>x</think>y")


def test_empty_tags_are_refused() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        TagReasoning("", "</think>")
