"""Append-only token builder: the ids that go after an assistant turn, from the model's own template.

The trajectory already holds the ids the engine sampled, ending with the end-of-turn id
(e.g. `<|im_end|>`). The template would render more after it: glue the model never
emitted (the "\\n" after `<|im_end|>`), the tool answers in their wrapping, and the next
assistant header. We find that text by rendering a probe conversation (the prompt, an
assistant turn calling the tools, their answers, the next header), check that it starts
with the prompt as rendered for generation (or with the header the template writes for an
earlier turn in its place; see reasoning below), and encode what follows the assistant
turn's end-of-turn token. Nothing already in the trajectory is decoded or re-encoded.

Each tool turn is encoded as one text: the glue after the end-of-turn token, every tool
answer and the template text between them, and the next assistant header. Real byte-level
BPE vocabularies merge across the edges of tool text (in Qwen's, an answer ending in `.` or
`}` merges with the template's "\\n" into `.\\n` or `"}\\n`, an empty answer leaves "\\n\\n"
as one token, and in Qwen2.5 `<tool_response>\\n` ends in the token `>\\n`), so encoding the
glue and the answers apart would give ids other than those of the same conversation when the
model is served. Only the template's own control tokens (the added tokens in its text, like
`<|im_end|>`) become their ids; the text between two of them is encoded as one run by the
tokenizer's own normalizer, pre-tokenizer and model, as the tokenizer encodes the text
between two added tokens of a whole render. Tool output is plain text: a tool that prints
`<|im_end|>` gets the ids of those characters, never the control token, and the ids decode
back to exactly its text. (A served tokenizer would make the control token of it: there
the builder keeps the text and not the served ids, on purpose.) The tool text is first put
in the form the template writes it in (`CONTENT_FORMS`: as is for Qwen, a JSON string for
Llama 3.1, stripped for templates that `|trim` it, and for Mistral v3 a JSON string or, for
text that Jinja's `|int`/`|float` reads back unchanged such as "2146", the JSON number its
`tojson` writes).

Templates that write call ids into the tool turn (Mistral's: `[TOOL_RESULTS]id[TOOL_CONTENT]`
in v11, `{"content": ..., "call_id": "id"}` in v3) get their glue rendered on every tool
turn with the ids of the calls (`ToolResult.call_id`, from `ToolCall.id` as the parser
read it from the sampled turn). An id is written as the model sampled it when it is 9 ASCII
letters or digits: Mistral's form, the templates refuse other lengths, and the id is
template text, where `[INST]` would become a control token. An answer whose id is missing
(a parse error's answer, or a call sampled without one) or not of that form gets a
generated id instead: the first 9 hex digits of the SHA-256 of its place in the turn, its
name and its text, so the same tool turn always gets the same ids. Other templates' glue
text is rendered once per shape of tool turn (the tools' names) and cached.

User turns (`user_turn_ids(text)`, for an environment's observation after a turn without
tool calls) are built the same way: a probe conversation (the prompt, an assistant reply, a
user message, the next header) gives the glue after the end-of-turn token, the template text
around the user's text and the next assistant header, and the whole is encoded as one text in
which the user's text stays plain. The user's text is first put in the template's form for it
(as is; stripped for Llama 3.1's `|trim`). The glue is checked on a render with three user
turns whose texts are empty or meet the template text with whitespace or punctuation. A
template that cannot add user turns append-only still serves tool turns: `user_turn_ids`
(and `check_user_turns`, for a protocol to call when it is built) raises `TemplateError`
with the reason. Mistral's v3, v7 and v11 templates are such: with tools, they write the
tools' schemas before the last user message, so a new user message re-renders the prompt.

Template control: `ChatBuilder(tok, tools, chat_template=TEXT, template_kwargs={...})` renders
every prompt, tool turn, user turn and probe with the Jinja text TEXT in place of the
tokenizer's template (`read_chat_template(path)` reads `model.chat_template`'s file) and
passes `template_kwargs` (`model.chat_template_kwargs`, e.g. Qwen3's `enable_thinking:
false`) to the template. `render_chat` is that one call, for code without a builder.

A template is refused with `TemplateError` when the builder cannot reproduce its tool
turn: it re-renders the prompt, it ends tool-calling turns with something other than the
eos token, it drops or reorders tool answers, or it changes them in a way no content form
matches. `python -m toolrl.check_template DIR` says which, for a model folder.

Reasoning is kept as sampled. Some templates drop or normalise `<think>...</think>` of
earlier assistant turns when they render a whole conversation (Qwen3 drops it from turns
before the last user message and drops empty think blocks). The trajectory keeps the
reasoning ids exactly as sampled instead: the trainer must score the ids the policy
sampled, with their rollout logprobs, in the context it sampled them in; re-rendering
history without the reasoning would train on a context the model never saw. So where the
template renders an earlier assistant turn with a part of it left out (`history_drops`: Qwen3
renders a turn before a user message without the "<think>\\n\\n</think>\\n\\n" it writes on
the last turn, or in the generation prompt with `enable_thinking: false`), the trajectory
keeps that part; an earlier turn rendered otherwise is refused for user turns. Tool probes
may show the turn's header as it renders in history (`history_header`), as Qwen3 with
`enable_thinking: false` does.
Run `python -m pytest tests/unit/test_real_templates.py` for this on real templates, and
tests/unit/test_real_vocab.py for token-exact tool turns on real vocabularies.

    python -m pytest tests/unit/test_chat.py tests/unit/test_real_templates.py \
        tests/unit/test_user_turns.py
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from jinja2.filters import do_float, do_int

from toolrl.rollout.text import PlainText
from toolrl.rollout.trajectory import ToolResult

_PROMPT = [{"role": "user", "content": "?"}]
# Stand-in for tool output while we render glue: a unique core with the characters that the
# templates' content transforms change (edge whitespace for `trim`, quote, backslash and
# newline for `tojson`), so the rendered probe tells which transform the template applies.
_PROBE_CONTENT = ' \ntoolrl-probe-{}"\\\n '
# Answers that read as numbers, which a template may write as JSON numbers (Mistral v3).
_NUMBER_PROBES = ("2146", "-0.5", "nan")
_PROBE_NAMES = ("probe", "probe")
# Two sets of 9-character call ids (Mistral's length): a template whose render changes with
# them writes ids into the tool turn.
_IDS = ("probe{:04d}", "other{:04d}")
_CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
# The assistant text of each round of the user-turn probe, and the observations it checks
# the glue on after finding it (an empty one, edge whitespace, a number, a final ".").
_REPLY = "toolrl-probe-reply-{}"
_USER_CHECKS = ("", " 2146.\n", "\tx")


def _tojson(text: str) -> str:
    """What HF's `tojson` filter makes of a string (json.dumps, ensure_ascii=False)."""
    return json.dumps(text, ensure_ascii=False)


def _json_number_or_string(text: str) -> str:
    """Mistral v3's tool content: the template sets it to `content|int` when that prints back
    as the text, else to `content|float` when that does, else keeps the string, and writes it
    with `tojson`. So "2146" -> 2146, "-0.5" -> -0.5, "nan" -> NaN, "inf" -> Infinity, and
    "2.50", " 7" or "1e3" stay JSON strings. Jinja's own filters decide, as in the template."""
    for value in (do_int(text), do_float(text)):
        if str(value) == text:
            return json.dumps(value)
    return _tojson(text)


# How templates render a tool message's string content, most literal first: Qwen2.5/Qwen3
# as is, Llama 3.1 through `tojson` (a string is `iterable` in Jinja), Qwen3.5 `|trim`,
# Mistral v3 re-typed into a number where it reads as one, then through `tojson`.
CONTENT_FORMS: dict[str, Callable[[str], str]] = {
    "as is": lambda t: t,
    "JSON string": _tojson,
    "stripped": str.strip,
    "stripped JSON string": lambda t: _tojson(t.strip()),
    "JSON string or number": _json_number_or_string,
}


def _probe_ids(which: int, n: int) -> tuple[str, ...]:
    return tuple(_IDS[which].format(i) for i in range(n))


def _call_id(result: ToolResult, k: int) -> str:
    """The id written for the k-th answer of a tool turn: its call's, when that has Mistral's
    form, else 9 hex digits hashed from the answer and its place (see the module doc)."""
    if result.call_id is not None and _CALL_ID.fullmatch(result.call_id):
        return result.call_id
    key = f"{k}\0{result.name}\0{result.content}".encode()
    return hashlib.sha256(key).hexdigest()[:9]


class TemplateError(ValueError):
    """The model's chat template cannot be used append-only for tool or user turns."""


def read_chat_template(path: str | os.PathLike[str] | None) -> str | None:
    """The Jinja text of a chat template file (`model.chat_template`), or None for None: the
    tokenizer's own template."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def render_chat(
    tok: Any,
    messages: list[dict[str, Any]],
    generation_prompt: bool,
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The text of `messages` as `tok`'s chat template renders it, or `chat_template` (Jinja
    text) in its place, with `template_kwargs` (e.g. `enable_thinking: false`) passed to the
    template: the one call every render of a run goes through."""
    return tok.apply_chat_template(
        messages,
        tools=tools,
        add_generation_prompt=generation_prompt,
        tokenize=False,
        chat_template=chat_template,
        **(template_kwargs or {}),
    )


class ChatBuilder:
    """Renders prompts and tool turns with a Hugging Face tokenizer's chat template."""

    def __init__(
        self,
        tokenizer: Any,
        tools: list[dict[str, Any]],
        chat_template: str | None = None,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tok = tokenizer
        self.tools = tools
        # Template control (`model.chat_template`'s text, `model.chat_template_kwargs`): every
        # render of this builder, probes included, goes through them.
        self.chat_template = chat_template
        self.template_kwargs = dict(template_kwargs or {})
        if tokenizer.eos_token is None:
            raise TemplateError("the tokenizer has no eos token to end an assistant turn")
        self.turn_end = tokenizer.eos_token  # e.g. "<|im_end|>"
        self.turn_end_id: int = tokenizer.convert_tokens_to_ids(self.turn_end)
        added = sorted(getattr(tokenizer, "get_added_vocab", dict)(), key=len, reverse=True)
        self._added = re.compile("|".join(map(re.escape, added))) if added else None
        self.plain = PlainText(tokenizer)
        # Template text before each tool answer and after the last one, per tools' names.
        self._glue_cache: dict[tuple[str, ...], list[str]] = {}
        # Fail when the worker is built, not at the first tool call of the first step.
        self._probe_head = self._render(_PROMPT, generation_prompt=False)
        self._probe_prompt = self._render(_PROMPT, generation_prompt=True)
        # User turns first: their probe shows the header the template writes for an earlier
        # assistant turn (`history_header`), which tool turns may show too. A template that
        # cannot add user turns still serves tool turns; `user_turn_ids` says why not.
        self.history_header = self.generation_prompt
        # What the template leaves out of an earlier turn (Qwen3: its think block); kept.
        self.history_drops = ""
        self._user_glue: tuple[str, str, str] | None = None  # (before, content form, after)
        self._user_error = ""
        try:
            self.history_header, self.history_drops, self._user_glue = self._find_user_turn()
        except TemplateError as e:
            self._user_error = str(e)
        full = self._render_probe(_PROBE_NAMES, _probe_ids(0, 2))
        self._content_start(full)
        # True when the tool turn shows the call ids (Mistral): rendered per turn, not cached.
        self.writes_ids: bool = full != self._render_probe(_PROBE_NAMES, _probe_ids(1, 2))
        # How the template writes a tool's text, a key of CONTENT_FORMS (e.g. "JSON string").
        self.content_form: str = self._find_content_form(full)
        self.tool_turn_ids([ToolResult("probe", "a"), ToolResult("probe", "b")])

    @property
    def stop_token_ids(self) -> list[int]:
        return [self.turn_end_id]

    @property
    def generation_prompt(self) -> str:
        """The text `add_generation_prompt` adds: the assistant header every turn continues
        (e.g. "<|im_start|>assistant\n", or with a "<think>\n" that opens reasoning). Only
        this part, so a `<think>` in a tool's description cannot count as opening a block."""
        without, head = self._probe_head, self._probe_prompt
        return head[len(without) :] if head.startswith(without) else head

    def render(
        self,
        messages: list[dict[str, Any]],
        generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """`messages` as text through this builder's template and template kwargs, with the
        schemas of `tools` or else of every configured tool."""
        return self._render(messages, generation_prompt, tools)

    def _render(
        self,
        messages: list[dict[str, Any]],
        generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        tools = self.tools if tools is None else tools
        return render_chat(
            self.tok, messages, generation_prompt, tools, self.chat_template, self.template_kwargs
        )

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def _encode_plain(self, text: str) -> list[int]:
        """Text as one run in which no added or special token can form (PlainText.encode)."""
        return self.plain.encode(text)

    def _encode_turn(self, parts: list[str]) -> list[int]:
        """Ids of the concatenated parts (template text, tool text, template text, ...) as the
        tokenizer encodes the whole text, except that only the template text forms added
        tokens: the text between two of those is encoded as one plain run."""
        ids: list[int] = []
        run = ""
        for k, part in enumerate(parts):
            pos = 0
            for m in self._added.finditer(part) if self._added and k % 2 == 0 else ():
                ids += self._encode_plain(run + part[pos : m.start()]) + self._encode(m.group())
                run, pos = "", m.end()
            run += part[pos:]
        return ids + self._encode_plain(run)

    def prompt_ids(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Ids of the prompt up to and including the assistant header the model continues,
        with the schemas of `tools` (a row's own subset) or else of every configured tool."""
        return self._encode(self._render(messages, generation_prompt=True, tools=tools))

    def truncate(self, text: str, max_tokens: int) -> str:
        return self.plain.truncate(text, max_tokens)

    def decode(self, ids: list[int]) -> str:
        """Text of sampled ids, for the parser only: it is never encoded back."""
        return self.plain.decode(ids)

    def tool_turn_ids(self, results: list[ToolResult]) -> list[int]:
        """Ids to append after a turn that ended with the end-of-turn id: glue, tool answers
        and the next header, encoded as one text (see the module doc)."""
        form = CONTENT_FORMS[self.content_form]
        names = tuple(r.name for r in results)
        if self.writes_ids:
            call_ids = tuple(_call_id(r, k) for k, r in enumerate(results))
            texts = self._glue_texts(self._render_probe(names, call_ids), len(names))
        else:
            texts = self._glue(names)
        parts = [p for t, r in zip(texts, results, strict=False) for p in (t, form(r.content))]
        return self._encode_turn(parts + texts[-1:])

    def user_turn_ids(self, text: str) -> list[int]:
        """Ids to append after a turn that ended with the end-of-turn id when a user message
        with `text` follows (an environment's observation): the glue after the end-of-turn
        token, the user message, and the next assistant header, encoded as one text in which
        `text` stays plain (see the module doc). Raises TemplateError where the template
        cannot add user turns append-only (`check_user_turns` says why)."""
        self.check_user_turns()
        assert self._user_glue is not None
        before, form, after = self._user_glue
        return self._encode_turn([before, CONTENT_FORMS[form](text), after])

    def check_user_turns(self) -> None:
        """Raise TemplateError, with the reason, when this template cannot add user turns
        append-only; a protocol that adds them calls it when it is built."""
        if self._user_glue is None:
            raise TemplateError(f"user turns are not append-only: {self._user_error}")

    def _user_probe(self, texts: tuple[str, ...]) -> str:
        """Render prompt + (assistant reply, user message) per text + the next header."""
        msgs = list(_PROMPT)
        for k, text in enumerate(texts):
            msgs += [{"role": "assistant", "content": _REPLY.format(k)}]
            msgs += [{"role": "user", "content": text}]
        try:
            return self._render(msgs, generation_prompt=True)
        except Exception as e:  # the template's raise_exception(), or a field it lacks
            raise TemplateError(f"the template cannot render a user turn: {e}") from e

    def _find_user_turn(self) -> tuple[str, str, tuple[str, str, str]]:
        """From a probe render with one user turn: the header of an earlier assistant turn,
        what the template leaves out of that turn (see `_earlier_turn`), and (the template
        text before the user's text, its content form, the text after it), checked on a
        render with several user turns whose texts meet the template's text at their edges."""
        probe = _PROBE_CONTENT.format("user")
        full = self._user_probe((probe,))
        header, drops = self._earlier_turn(full)
        end = len(self._probe_head + header + _REPLY.format(0))
        if not full.startswith(self.turn_end, end):
            raise TemplateError(f"assistant turns do not end with {self.turn_end!r}")
        rest = full[end + len(self.turn_end) :]
        form = _content_form(rest, 0, probe)
        before, _, after = rest.partition(CONTENT_FORMS[form](probe))
        if not after.endswith(self.generation_prompt):
            raise TemplateError("a user turn does not end with the generation prompt")
        mid = after[: len(after) - len(self.generation_prompt)]
        rounds = [
            header + _REPLY.format(k) + self.turn_end + before + CONTENT_FORMS[form](t) + mid
            for k, t in enumerate(_USER_CHECKS)
        ]
        expected = self._probe_head + "".join(rounds) + self.generation_prompt
        if self._user_probe(_USER_CHECKS) != expected:
            raise TemplateError(
                "the template renders user turns differently by their text or their place "
                f"(texts tried: {', '.join(map(repr, _USER_CHECKS))})"
            )
        return header, drops, (before, form, after)

    def _earlier_turn(self, full: str) -> tuple[str, str]:
        """From a user-turn probe render: the header the template writes for an assistant
        turn that a user message follows, and what it leaves out of that turn as it renders
        it last (where the model sampled it): "" for most, Qwen3's think block. The
        trajectory keeps the turn as sampled (see the module doc on reasoning); a turn that
        renders otherwise than with one part left out is refused."""
        head, reply = self._probe_head, _REPLY.format(0)
        if not full.startswith(head):
            raise TemplateError(
                "adding a user message re-renders the prompt (the template moves the tools' "
                "schemas or the system prompt to the last user message)"
            )
        at = full.find(reply, len(head))
        if at < 0:
            raise TemplateError("the template dropped an earlier assistant turn's text")
        turn = full[len(head) : at + len(reply)]
        try:
            last = self._render(_PROMPT + [{"role": "assistant", "content": reply}], False)
        except Exception as e:  # the template's raise_exception(), or a field it lacks
            raise TemplateError(f"the template cannot render a final assistant turn: {e}") from e
        at = last.find(reply, len(head))
        if not last.startswith(head) or at < 0:
            raise TemplateError("the template renders a final assistant turn otherwise")
        alone = last[len(head) : at + len(reply)]
        same = len(os.path.commonprefix([turn, alone]))
        if len(alone) < len(turn) or not alone.endswith(turn[same:]):
            raise TemplateError(
                f"an earlier assistant turn renders as {turn!r}, not as it rendered last "
                f"({alone!r}) with one part left out"
            )
        return turn[: -len(reply)], alone[same : len(alone) - len(turn) + same]

    def _glue(self, names: tuple[str, ...]) -> list[str]:
        """The template's text before each tool answer and after the last one.

        It depends only on the tools' names, not on what the tools said, so it is rendered
        once per shape of tool turn instead of once per tool turn. Only the text is cached:
        its ids depend on the answers next to it."""
        if names not in self._glue_cache:
            full = self._render_probe(names, _probe_ids(0, len(names)))
            self._glue_cache[names] = self._glue_texts(full, len(names))
        return self._glue_cache[names]

    def _content_start(self, full: str) -> int:
        """Where the assistant turn's own text starts in a tool probe render: after the prompt
        as rendered for generation, or after the prompt and the header the template writes
        for an earlier turn (`history_header`: Qwen3 with `enable_thinking: false` writes it
        without the generation prompt's empty think block)."""
        for head in (self._probe_prompt, self._probe_head + self.history_header):
            if full.startswith(head):
                return len(head)
        raise TemplateError(
            "adding a tool-calling turn and tool messages changed the prompt: not append-only"
        )

    def _glue_texts(self, full: str, n: int) -> list[str]:
        """From a probe render with n answers: the template's text before each answer, and the
        text after the last one."""
        start = self._content_start(full)
        form = CONTENT_FORMS[self.content_form]
        first = full.find(form(_PROBE_CONTENT.format(0)), start)
        if first < 0:
            raise TemplateError("the template dropped or altered a tool message's content")
        end = full.find(self.turn_end, start)
        if not 0 <= end < first:
            raise TemplateError(
                f"assistant turns with tool calls do not end with {self.turn_end!r}"
            )
        glue, texts = full[end + len(self.turn_end) :], []
        for i in range(n):
            before, sep, glue = glue.partition(form(_PROBE_CONTENT.format(i)))
            if not sep:
                raise TemplateError("the template dropped or reordered a tool message's content")
            texts.append(before)
        return texts + [glue]

    def _find_content_form(self, full: str) -> str:
        """The name of the form the template writes tool text in, from a probe render.

        The probe answer tells most forms apart; a number answer tells apart those that
        write it alike (Mistral v3 writes "2146" as the JSON number 2146, Llama 3.1 as
        the JSON string "2146")."""
        probe = _PROBE_CONTENT.format(0)
        written = CONTENT_FORMS[_content_form(full, self._content_start(full))](probe)
        alike = [name for name, form in CONTENT_FORMS.items() if form(probe) == written]
        for number in _NUMBER_PROBES:
            got = self._render_probe(_PROBE_NAMES, _probe_ids(0, 2), first=number)
            alike = [n for n in alike if got == full.replace(written, CONTENT_FORMS[n](number), 1)]
        if not alike:
            raise TemplateError(
                "the template writes a tool answer that reads as a number in a way toolrl "
                f"does not reproduce (answers tried: {', '.join(_NUMBER_PROBES)})"
            )
        return alike[0]

    def _render_probe(
        self, names: tuple[str, ...], ids: tuple[str, ...], first: str | None = None
    ) -> str:
        """Render prompt + an assistant turn calling the tools + their answers + next header.

        The answers are the probe contents (the first one `first` if given), with the call
        ids `ids`. One call per answer first; templates that allow one call per turn (Llama
        3.1 raises on more) get a single call, since the glue after the turn does not
        depend on it."""
        contents = [_PROBE_CONTENT.format(i) for i in range(len(names))]
        contents[:1] = [first] if first is not None else contents[:1]
        tool_msgs = [
            {"role": "tool", "name": n, "tool_call_id": i, "content": c}
            for n, i, c in zip(names, ids, contents, strict=True)
        ]
        error = ""
        for called in (names, names[:1]):
            calls = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": {}}}
                for n, i in zip(called, ids, strict=False)
            ]
            turn = {"role": "assistant", "content": "", "tool_calls": calls}
            try:
                return self._render(_PROMPT + [turn] + tool_msgs, generation_prompt=True)
            except Exception as e:  # the template's raise_exception(), or a field it lacks
                error = f"{type(e).__name__}: {e}"
        raise TemplateError(f"the template cannot render a tool turn: {error}")


def _content_form(full: str, start: int, probe: str = _PROBE_CONTENT.format(0)) -> str:
    """The first of `CONTENT_FORMS` that makes of the probe text (by default the first probe
    answer) what the template wrote in `full` after `start` (the end of the prompt)."""
    for name, form in CONTENT_FORMS.items():
        if full.find(form(probe), start) >= 0:
            return name
    raise TemplateError("the template dropped or altered a message's content")
