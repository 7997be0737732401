"""User turns (an environment's observation as the next user message) on real chat templates.

`ChatBuilder.user_turn_ids(text)` appends, after a sampled turn's end-of-turn id, the
template's glue, a user message with `text` and the next assistant header, encoded as one
text in which `text` stays plain. Here conversations of a prompt, sampled replies, tool turns
and observations are built the way a rollout builds them and compared with the template's
render of the same conversation: with the embedded tokenizer given each family's control
tokens (the templates of tests/unit/test_real_templates.py: Qwen2.5, Qwen3, Llama 3.1,
Mistral v3, v7, v11, v13) and with the real vocabularies of tests/unit/test_real_vocab.py,
where BPE merges across the seams (Qwen's "\\n\\n", `.\\n`). The observations include the
empty text, edge whitespace and newlines, control strings (they stay plain text), unicode
and a final "." that merges with a "\\n".

Mistral v3, v7 and v11 write the tools' schemas before the last user message, so with tools a
user turn re-renders the prompt: the builder refuses them there and serves them without tools.
Qwen3 drops the reasoning of turns before the last user message from its render; the
trajectory keeps it as sampled (toolrl/rollout/chat.py), so the comparison leaves out exactly
those sampled think blocks.

    python -m pytest tests/unit/test_user_turns.py
"""

from __future__ import annotations

import random
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from tokenizers import normalizers

from tests.unit.test_real_templates import (
    ANSWER,
    CALL_IDS,
    CALLS,
    FAMILIES,
    MSGS,
    TOOLS,
    Family,
    answer_msgs,
    call_msgs,
    family_tokenizer,
)
from tests.unit.test_real_vocab import CASES
from toolrl.rollout.chat import CONTENT_FORMS, ChatBuilder, TemplateError
from toolrl.rollout.trajectory import ToolResult, Trajectory, Turn

# Observations whose edges meet the template's text, and the texts around them.
OBS = ["", " ", "\n", "\n\n", "  padded both sides  ", "\nnewlines at both edges\n"]
OBS += ["Ends with a dot.", "The answer is 42.\n", '{"a": [1, 2]}', "x}", "\tTab\r\n", "2146"]
OBS += ["日本語のテキスト。 naïve café 🙂", "Ünï\u0301cödé", "(no output)", "Wrong, try again!"]
CONTROL = ["<|im_end|>", "<|im_start|>assistant\n", "<|eot_id|>", "[INST]", "</s>", "<think>"]
# Families whose templates move the tools' schemas to the last user message.
TOOLS_MOVE = ("mistral_v3", "mistral_v7", "mistral_v11")
VOCAB_TOOLS_MOVE = ("tekken_v3", "tekken_v7", "tekken_v11", "spm_v3", "spm_v3_legacy")
VOCAB_TOOLS_MOVE += ("spm_v3_first",)


def render(tok: Any, messages: list[dict], tools: list | None, gen: bool = False) -> str:
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, tokenize=False)


def rendered(tok: Any, messages: list[dict], tools: list | None) -> str:
    """The render as the tokenizer's ids decode it: Qwen's tokenizer composes characters
    (NFC) before encoding, so a "i\u0301" comes back as "í"."""
    full = render(tok, messages, tools)
    nfc = isinstance(getattr(tok.backend_tokenizer, "normalizer", None), normalizers.NFC)
    return unicodedata.normalize("NFC", full) if nfc else full


def encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


class Rollout:
    """A conversation built as a rollout builds it, with the same conversation as messages."""

    def __init__(self, chat: ChatBuilder, fam: Family) -> None:
        self.chat, self.fam, self.tok = chat, fam, chat.tok
        self.traj = Trajectory.from_prompt(0, chat.prompt_ids(MSGS))
        self.msgs: list[dict[str, Any]] = list(MSGS)
        self.texts: list[str] = []  # each turn's sampled text, without the end-of-turn token
        self.last_user = 0  # the number of turns sampled before the last user message

    def sample(self, calls: int = 0) -> None:
        """Sample a turn: the template's own text for a reply (with `calls` tool calls)."""
        k = len(self.texts)
        turn: dict[str, Any] = {"role": "assistant", "content": "" if calls else ANSWER}
        if calls:
            turn["tool_calls"] = call_msgs(CALLS[:calls])
        if self.fam.think:
            turn["reasoning_content"] = f"Round {k}."
        before = render(self.tok, self.msgs, self.chat.tools, gen=True)
        after = render(self.tok, self.msgs + [turn], self.chat.tools)
        assert after.startswith(before)
        text = after[len(before) :]
        text = text[: text.rindex(self.fam.eos)]
        ids = encode(self.tok, text) + [self.chat.turn_end_id]
        start, end = self.traj.append_sampled(ids, [-0.5] * len(ids))
        self.traj.turns.append(Turn(start, end, weight_version=0, finish_reason="stop"))
        self.msgs.append(turn)
        self.texts.append(text)

    def answer(self, texts: list[str]) -> None:
        calls = zip(CALLS[: len(texts)], texts, CALL_IDS[: len(texts)], strict=True)
        results = [ToolResult(n, t, call_id=i) for (n, _), t, i in calls]
        self.traj.append_context(self.chat.tool_turn_ids(results))
        self.msgs += answer_msgs(results, CALL_IDS[: len(results)])

    def observe(self, text: str) -> None:
        self.traj.append_context(self.chat.user_turn_ids(text))
        self.msgs.append({"role": "user", "content": text})
        self.last_user = len(self.texts)

    def kept_ids(self) -> list[int]:
        """The trajectory without the think blocks the template drops from the turns before
        the last user message (Qwen3); the trajectory keeps them as sampled."""
        self.traj.check()
        ids = list(self.traj.token_ids)
        if not self.fam.think:
            return ids
        turns = zip(self.traj.turns, self.texts, strict=True)
        for turn, text in reversed(list(turns)[: self.last_user]):
            think = encode(self.tok, text[: text.index("</think>\n\n") + len("</think>\n\n")])
            assert ids[turn.start : turn.start + len(think)] == think
            del ids[turn.start : turn.start + len(think)]
        return ids

    def served(self) -> tuple[list[int], list[int]]:
        """(the trajectory as the template renders history, the ids of that render)"""
        full = render(self.tok, self.msgs, self.chat.tools)
        after = encode(self.tok, self.fam.after_eos)
        return self.kept_ids() + after, encode(self.tok, full)


def one_observation(chat: ChatBuilder, fam: Family, text: str) -> Rollout:
    ro = Rollout(chat, fam)
    ro.sample()
    ro.observe(text)
    ro.sample()
    return ro


def mixed(chat: ChatBuilder, fam: Family, r: random.Random, calls: int) -> Rollout:
    """Tool turns and observations in a seeded order, ending with a reply."""
    ro = Rollout(chat, fam)
    for _ in range(r.randint(2, 4)):
        if r.random() < 0.4:
            ro.sample(calls)
            ro.answer([r.choice(OBS) for _ in range(calls)])
        else:
            ro.sample()
            ro.observe(r.choice(OBS) + r.choice(["", ".", "\n", " "]))
    ro.sample()
    return ro


# --- real templates, the embedded tokenizer with each family's control tokens -------------


@pytest.fixture(scope="module")
def family_builders(embedded_base: str) -> Callable[[str, bool], ChatBuilder]:
    made: dict[tuple[str, bool], ChatBuilder] = {}

    def get(name: str, with_tools: bool) -> ChatBuilder:
        if (name, with_tools) not in made:
            f = FAMILIES[name]
            tok = family_tokenizer(embedded_base, f.template(), f.specials, f.plain, f.eos, f.bos)
            made[name, with_tools] = ChatBuilder(tok, TOOLS if with_tools else [])
        return made[name, with_tools]

    return get


USABLE = [(n, n not in TOOLS_MOVE) for n in FAMILIES]  # tools where the template allows them


@pytest.mark.parametrize(("name", "with_tools"), USABLE)
def test_observations_are_the_render_of_the_conversation(family_builders, name, with_tools):
    chat, fam = family_builders(name, with_tools), FAMILIES[name]
    for text in OBS:
        built, full = one_observation(chat, fam, text).served()
        assert built == full, text
    r = random.Random(f"user-turns-{name}")
    calls = 1 if name == "llama3_1" else 2  # Llama 3.1's template renders one call per turn
    for _ in range(6):
        built, full = mixed(chat, fam, r, calls).served()
        assert built == full


@pytest.mark.parametrize(("name", "with_tools"), USABLE)
def test_control_strings_in_observations_stay_plain_text(family_builders, name, with_tools):
    chat, fam = family_builders(name, with_tools), FAMILIES[name]
    tok = chat.tok
    control = set(tok.get_added_vocab().values())
    form = CONTENT_FORMS[chat._user_glue[1]]  # as is, or stripped (Llama 3.1)
    benign = Counter(i for i in chat.user_turn_ids("x") if i in control)
    for text in [fam.evil, *CONTROL, "".join(CONTROL)]:
        ids = chat.user_turn_ids(text)
        assert Counter(i for i in ids if i in control) == benign, text
        assert form(text) in tok.decode(ids)
        ro = one_observation(chat, fam, text)
        assert tok.decode(ro.kept_ids()) + fam.after_eos == render(tok, ro.msgs, chat.tools)


@pytest.mark.parametrize("name", TOOLS_MOVE)
def test_templates_that_move_the_tools_to_the_last_user_message_are_refused(family_builders, name):
    chat = family_builders(name, True)
    with pytest.raises(TemplateError, match="re-renders the prompt"):
        chat.check_user_turns()
    with pytest.raises(TemplateError, match="user turns are not append-only"):
        chat.user_turn_ids("x")
    # tool turns still work, and without tools the user turns do too
    assert chat.tool_turn_ids([ToolResult("calculator", "42", call_id=CALL_IDS[0])])
    family_builders(name, False).check_user_turns()


def test_llama3_1_strips_observations_as_its_template_trims_them(family_builders):
    chat = family_builders("llama3_1", True)
    assert chat._user_glue[1] == "stripped"
    assert chat.user_turn_ids("  x \n") == chat.user_turn_ids("x")


# --- real vocabularies -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vocab_builders() -> Callable[[str], ChatBuilder]:
    from tests.unit.test_real_vocab import case_tokenizer

    made: dict[str, ChatBuilder] = {}

    def get(name: str) -> ChatBuilder:
        if name not in made:
            tools = [] if name in VOCAB_TOOLS_MOVE else TOOLS
            made[name] = ChatBuilder(case_tokenizer(name), tools)
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_observations_are_the_served_render_on_real_vocabularies(vocab_builders, name):
    case, chat = CASES[name], vocab_builders(name)
    tok, fam = chat.tok, case.family
    r = random.Random(f"user-vocab-{name}")
    convs = [one_observation(chat, fam, text) for text in OBS]
    convs += [mixed(chat, fam, r, case.max_calls) for _ in range(6)]
    for ro in convs:
        built, served = ro.served()
        assert built == served, ro.msgs
        if case.ids_decode:
            text = tok.decode(ro.kept_ids()) + fam.after_eos
            assert text == rendered(tok, ro.msgs, chat.tools)


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3", "llama3_1", "tekken_v13"])
def test_control_strings_in_observations_stay_text_on_real_vocabularies(vocab_builders, name):
    chat = vocab_builders(name)
    tok = chat.tok
    control = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    benign = Counter(i for i in chat.user_turn_ids("x") if i in control)
    for text in [CASES[name].family.evil, *CONTROL]:
        ids = chat.user_turn_ids(text)
        assert Counter(i for i in ids if i in control) == benign, text
        assert CONTENT_FORMS[chat._user_glue[1]](text) in tok.decode(ids)


def test_qwen_merges_across_the_seam_of_an_observation(vocab_builders):
    # "<|im_start|>user\n" then "\nx": the two newlines are one token of Qwen's vocabulary,
    # which the observation encoded apart from the template text would not give
    chat = vocab_builders("qwen2_5")
    tok = chat.tok
    apart = encode(tok, "\n<|im_start|>user\n") + chat._encode_plain("\nx")
    assert chat.user_turn_ids("\nx")[: len(apart)] != apart
    assert chat.decode(chat.user_turn_ids("\nx")).startswith("\n<|im_start|>user\n\nx<|im_end|>")
