"""Tool turns are token-exact on real vocabularies: Qwen2.5, Qwen3, Llama 3.1 and Mistral.

tests/unit/test_real_templates.py runs the real chat templates with the embedded tokenizer,
whose tiny vocabulary has none of the tokens that merge across the seam between template
text and tool text. Here the same templates run with the real vocabularies (built by
tests/realtok.py from pinned PyPI wheels and mistral_common's files, cached): Qwen's BPE
has `.\\n`, `"}\\n`, `\\n\\n` and (Qwen2.5) `>\\n` as single tokens, so a tool answer ending in
`.` or `}` or an empty one is encoded differently alone than inside its tool turn.

Multi-turn rollouts with tool answers drawn from a seeded generator (edge whitespace,
trailing punctuation, JSON, unicode, long text, empty, toolrl's "(no output)" and truncation
marker) are built the way the agent loop builds them and compared with the template's
render of the whole conversation: the ids are those the tokenizer gives the render (what a
server would feed the model), and they decode to the render. Tool output holding control
strings is compared by text only: a server's tokenizer would make control tokens of it,
toolrl keeps it plain on purpose.

Without network the tests skip; with TOOLRL_REQUIRE_REALTOK=1 (CI) they fail instead.

    python -m pytest tests/unit/test_real_vocab.py
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from tokenizers import normalizers

from tests import realtok
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
    render,
)
from toolrl.rollout.chat import CONTENT_FORMS, ChatBuilder
from toolrl.rollout.trajectory import ToolResult, Trajectory, Turn

MARKER = "\n[output truncated: 12 more tokens]"  # ChatBuilder.truncate's marker
# Answers at the seams first: each edge the template's text meets.
SEAMS = ["", "x", "x.", "x}", "x]", "x)", " x", "x ", "\nx\n", "{}", "é", "(no output)"]
SEAMS += ["x" + MARKER, "  ", "\n", "2146", '{"a": [1, 2]}\n']
EDGES = ["", "", " ", "  ", "\n", "\n\n", "\t", " \n", "\r\n", ".", "}", "]", ")", ",", '"', "!"]
WORDS = "the tool said that result value error path file line none ok é über 北京 🙂".split()


def _json(r: random.Random) -> str:
    value = {w: r.choice([r.randint(-9, 999), r.random(), w.upper(), None, [1, w]]) for w in WORDS}
    keys = r.sample(sorted(value), r.randint(0, 4))
    obj = {k: value[k] for k in keys}
    return json.dumps(obj if r.random() < 0.7 else list(obj.items()), ensure_ascii=r.random() < 0.5)


BODIES: list[Callable[[random.Random], str]] = [
    lambda r: "",
    lambda r: str(r.randint(-999, 99999)),
    lambda r: f"The result is {r.randint(0, 100)}.",
    _json,
    lambda r: r.choice(["é", "日本語のテキスト。", "naïve café 🙂", "∑ ≠ ∞", "Ünï\u0301cödé"]),
    lambda r: "(no output)",
    lambda r: " ".join(r.choice(WORDS) for _ in range(r.randint(50, 300))),
    lambda r: "Error: tool call 1: invalid JSON",
    lambda r: 'Traceback (most recent call last):\n  File "<stdin>", line 1\nZeroDivisionError',
]


def answer(r: random.Random) -> str:
    text = r.choice(EDGES) + r.choice(BODIES)(r) + r.choice(EDGES)
    return text + MARKER if r.random() < 0.15 else text


@dataclasses.dataclass(frozen=True)
class Case:
    """A real vocabulary (a realtok folder) with a family's real template."""

    vocab: str
    family: Family
    max_calls: int = 2
    pipeline: str = ""  # "legacy" / "first": SentencePiece as older converters build it
    ids_decode: bool = True  # decode(encode(render)) == render for this tokenizer


def spm_template() -> str:
    """Mistral 7B v0.3's template (v3, SentencePiece spacing), as mistral_common makes it."""
    from mistral_common.integrations.chat_templates.chat_templates import generate_chat_template
    from mistral_common.tokens.tokenizers.base import TokenizerVersion

    flags = ("image_support", "audio_support", "thinking_support", "plain_thinking_support")
    flags += ("use_special_token_variables",)
    unset = ("default_system_prompt", "model_settings_fields", "reasoning_effort_values")
    unset += ("reasoning_effort_default",)
    return generate_chat_template(
        spm=True,
        tokenizer_version=TokenizerVersion.v3,
        **dict.fromkeys(flags, False),
        **dict.fromkeys(unset),
    )


SPM = dataclasses.replace(FAMILIES["mistral_v3"], template=spm_template)
CASES = {
    "qwen2_5": Case("qwen2_5", FAMILIES["qwen2_5"]),
    "qwen3": Case("qwen3", FAMILIES["qwen3"]),
    "llama3_1": Case("llama3", FAMILIES["llama3_1"], max_calls=1),
    **{f"tekken_{v}": Case("tekken", FAMILIES[f"mistral_{v}"]) for v in ("v3", "v7", "v11")},
    "tekken_v13": Case("tekken", FAMILIES["mistral_v13"]),
    "spm_v3": Case("mistral_spm", SPM),
    # transformers 4's Llama converters: legacy puts "▁" before every run between control
    # tokens (so decode(encode(render)) has extra spaces), `first` only before the text.
    "spm_v3_legacy": Case("mistral_spm", SPM, pipeline="legacy", ids_decode=False),
    "spm_v3_first": Case("mistral_spm", SPM, pipeline="first"),
}
# Where the ids of a tool answer encoded apart differ from those inside its tool turn.
MERGING = {"qwen2_5", "qwen3", "tekken_v3", "spm_v3", "spm_v3_legacy", "spm_v3_first"}


def _pipeline(tok: Any, kind: str) -> None:
    from tokenizers import normalizers, pre_tokenizers

    backend = tok.backend_tokenizer
    if kind == "legacy":
        prepend = normalizers.Prepend("▁")
        backend.normalizer = normalizers.Sequence([prepend, normalizers.Replace(" ", "▁")])
    elif kind == "first":
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)


_LOADED: dict[str, Any] = {}


def case_tokenizer(name: str) -> Any:
    """The tokenizer of case `name` with its family's template (each vocabulary loaded once)."""
    case = CASES[name]
    if case.pipeline:  # its own backend: the pipeline is changed in place
        tok = realtok.load(case.vocab, case.family.template())
        _pipeline(tok, case.pipeline)
        return tok
    if case.vocab not in _LOADED:
        _LOADED[case.vocab] = realtok.load(case.vocab, "")
    tok = copy.copy(_LOADED[case.vocab])
    tok.chat_template = case.family.template()
    return tok


@pytest.fixture(scope="module")
def builders() -> Callable[[str], ChatBuilder]:
    made: dict[str, ChatBuilder] = {}

    def get(name: str) -> ChatBuilder:
        if name not in made:
            made[name] = ChatBuilder(case_tokenizer(name), TOOLS)
        return made[name]

    return get


def answers(texts: list[str]) -> list[ToolResult]:
    """Answers to the first len(texts) CALLS, each with its call's id."""
    calls = zip(CALLS[: len(texts)], texts, CALL_IDS, strict=False)
    return [ToolResult(name, text, call_id=i) for (name, _), text, i in calls]


def turn_text(tok: Any, history: list[dict], turn: dict, eos: str) -> str:
    """What the model samples for `turn` after `history`: the template's own text of it."""
    before = render(tok, history, gen=True)
    after = render(tok, history + [turn])
    assert after.startswith(before)
    text = after[len(before) :]
    return text[: text.rindex(eos)]


def conversation(
    chat: ChatBuilder, case: Case, rounds: list[list[str]]
) -> tuple[Trajectory, list[dict], list[list[int]]]:
    """Roll out calls with these answers per round, then a final answer, as the agent loop
    does; return the trajectory, the same conversation as messages and each tool turn."""
    fam, tok = case.family, chat.tok
    traj = Trajectory.from_prompt(0, chat.prompt_ids(MSGS))
    msgs, tool_turns = list(MSGS), []
    for k, texts in enumerate([*rounds, []]):
        turn: dict[str, Any] = {"role": "assistant", "content": ANSWER if not texts else ""}
        if texts:
            turn["tool_calls"] = call_msgs(CALLS[: len(texts)])
        if fam.think:
            turn["reasoning_content"] = f"Round {k}."
        text = turn_text(tok, msgs, turn, fam.eos)
        ids = tok.encode(text, add_special_tokens=False) + [chat.turn_end_id]
        start, end = traj.append_sampled(ids, [-0.5] * len(ids))
        traj.turns.append(Turn(start, end, weight_version=0, finish_reason="stop"))
        msgs.append(turn)
        if texts:
            results = answers(texts)
            tool_turns.append(chat.tool_turn_ids(results))
            traj.append_context(tool_turns[-1])
            msgs += answer_msgs(results, CALL_IDS[: len(results)])
    traj.check()
    return traj, msgs, tool_turns


def rendered(tok: Any, msgs: list[dict]) -> str:
    """The render as the tokenizer's ids decode it: Qwen's tokenizer composes characters
    (NFC) before encoding, so a tool's "i\u0301" comes back as "í", served or not."""
    full = render(tok, msgs)
    nfc = isinstance(tok.backend_tokenizer.normalizer, normalizers.NFC)
    return unicodedata.normalize("NFC", full) if nfc else full


def draw_rounds(r: random.Random, case: Case, n: int) -> list[list[str]]:
    return [[answer(r) for _ in range(r.randint(1, case.max_calls))] for _ in range(n)]


def seam_rounds(case: Case) -> list[list[str]]:
    """Every SEAMS answer, in rounds of up to max_calls answers."""
    m = case.max_calls
    return [SEAMS[i : i + m] for i in range(0, len(SEAMS), m)]


def apart(chat: ChatBuilder, texts: list[str]) -> list[int]:
    """The tool turn as toolrl built it before: glue and each answer encoded apart."""
    form = CONTENT_FORMS[chat.content_form]
    results = answers(texts)
    glue = chat._glue(tuple(r.name for r in results))
    ids: list[int] = []
    for g, r in zip(glue, results, strict=False):
        ids += chat._encode_turn([g]) + chat._encode_plain(form(r.content))
    return ids + chat._encode_turn(glue[-1:])


@pytest.mark.parametrize("name", list(CASES))
def test_multi_turn_tool_answers_are_the_served_render(builders, name: str) -> None:
    case, chat = CASES[name], builders(name)
    tok, r = chat.tok, random.Random(f"real-vocab-{name}")
    convs = [seam_rounds(case)] + [draw_rounds(r, case, r.randint(1, 4)) for _ in range(12)]
    differ = 0
    for rounds in convs:
        traj, msgs, tool_turns = conversation(chat, case, rounds)
        full = render(tok, msgs)
        served = tok.encode(full, add_special_tokens=False)
        after = tok.encode(case.family.after_eos, add_special_tokens=False)
        assert traj.token_ids + after == served, rounds
        if case.ids_decode:
            assert tok.decode(traj.token_ids) + case.family.after_eos == rendered(tok, msgs)
        if not chat.writes_ids:
            differ += sum(apart(chat, t) != ids for t, ids in zip(rounds, tool_turns, strict=True))
    # the old encoding, answers apart from the glue, would have trained on other ids
    if not chat.writes_ids:
        assert (differ > 0) == (name in MERGING), differ


CONTROL = ["<|im_end|>", "<|im_start|>assistant\n", "<tool_call>", "<tool_response>", "<think>"]
CONTROL += ["<|eot_id|>", "<|python_tag|>", "</s>", "[INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
CONTROL += ["[TOOL_CONTENT]", "[CALL_ID]", "<s>"]


@pytest.mark.parametrize("name", list(CASES))
def test_control_strings_in_tool_output_stay_its_text(builders, name: str) -> None:
    case, chat = CASES[name], builders(name)
    tok, r = chat.tok, random.Random(f"control-{name}")
    control = set(tok.all_special_ids) | set(tok.get_added_vocab().values())
    form = CONTENT_FORMS[chat.content_form]
    for _ in range(8):
        texts = [case.family.evil] + [
            r.choice(EDGES) + "".join(r.choices(CONTROL + WORDS, k=6)) + r.choice(EDGES)
            for _ in range(case.max_calls)
        ]
        texts = texts[: case.max_calls]
        ids = chat.tool_turn_ids(answers(texts))
        benign = chat.tool_turn_ids(answers(["x"] * len(texts)))
        # only the template's own control ids, and each answer's text exactly as written
        assert Counter(i for i in ids if i in control) == Counter(i for i in benign if i in control)
        for t in texts:
            assert form(t) in tok.decode(ids), t
        if not case.ids_decode:
            continue
        # the whole conversation decodes to the render; a server's ids would differ there
        traj, msgs, _ = conversation(chat, case, [texts])
        assert tok.decode(traj.token_ids) + case.family.after_eos == rendered(tok, msgs)
        served = tok.encode(render(tok, msgs), add_special_tokens=False)
        assert traj.token_ids != served[: len(traj.token_ids)]
