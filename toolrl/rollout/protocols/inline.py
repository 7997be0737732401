"""Inline tool tags: the model calls a tool inside its own text and reads the answer in place.

Search-R1 writes `<search>query</search>`; the rollout pauses where the close tag is
completed, runs the tool on the text between the tags, inserts `<information>…</information>`
as ids with mask 0, and the model continues the same message. ToRL/ReTool do the same with
code (`<code>…</code>` -> `<output>…</output>`, the python tool keeping its state across
blocks). Per segment:

    sample until a close tag (paused on the streamed ids), an end tag or the end-of-text id
        close tag of a tool ──► run it on the text since its open tag ──► insert the answer
        end tag (`</answer>`) or end-of-text ──► the end; the final text is all the model wrote

The engine has no tokenizer (ids in, ids out), so a tag is matched on the decoded ids as they
stream back (toolrl/rollout/pause.py); the kept ids are exactly the sampled ones, up to the
token that completes the tag, even when that token runs past it (`>\n`). Nothing sampled is
decoded and re-encoded: only the inserted answer is encoded, as plain text.

With `chat_template: true` the prompt is the chat template's render of the messages (no tool
schemas: the prompt itself says how to call, as in Search-R1) and everything happens inside
one assistant message; with `false` (base models, R1-Zero style) the prompt is the messages'
text joined by blank lines, encoded as the tokenizer encodes a document (BOS included).

    protocol:                                   # conf/protocol/inline.yaml
      _target_: toolrl.rollout.protocols.inline.InlineTags
      tags: [{open: <search>, close: </search>, tool: search,
              answer: "\n\n<information>{result}</information>\n\n"}]
      end_tags: [</answer>]

    python -m pytest tests/unit/test_protocols.py
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from toolrl.rollout.chat import render_chat
from toolrl.rollout.pause import StopAtTexts
from toolrl.rollout.protocols.base import Advance, ToolCaller
from toolrl.rollout.sampler import Pause
from toolrl.rollout.text import PlainText
from toolrl.rollout.trajectory import ToolCall, ToolResult, Turn

if TYPE_CHECKING:
    from toolrl.rollout.agent_loop import Episode


@dataclass(frozen=True)
class Tag:
    """One inline tool: `open`query`close` runs `tool` with {argument: query}; the model then
    reads `answer` with `{result}` filled in."""

    open: str
    close: str
    tool: str
    answer: str = "\n<result>\n{result}\n</result>\n"
    argument: str | None = None  # the tool's argument; None: its schema's first required one


def parse_tags(tags: Sequence[Mapping[str, Any]], end_tags: Sequence[str]) -> list[Tag]:
    """Typed tags; ValueError saying what is wrong (also run before Ray, by `preflight`)."""
    if not tags and not end_tags:
        raise ValueError("inline protocol: give at least one tag (or end tag)")
    out = []
    for i, spec in enumerate(tags):
        try:
            tag = Tag(**dict(spec))
        except TypeError as e:
            raise ValueError(
                f"inline protocol: tags[{i}]: {e}; keys: open, close, tool, answer, argument"
            ) from e
        if not tag.open or not tag.close or tag.open == tag.close:
            raise ValueError(
                f"inline protocol: tags[{i}]: open and close must differ and be non-empty"
            )
        if "{result}" not in tag.answer:
            raise ValueError(
                f"inline protocol: tags[{i}]: answer must hold {{result}}, got {tag.answer!r}"
            )
        out.append(tag)
    closes = [t.close for t in out] + list(end_tags)
    if len(set(closes)) != len(closes) or not all(closes):
        raise ValueError(
            f"inline protocol: close and end tags must be distinct and non-empty: {closes}"
        )
    return out


class InlineTags:
    """Tool calls as tags inside the model's text, answered in place (see the module doc)."""

    def __init__(
        self,
        tokenizer: Any,
        tool_schemas: list[dict[str, Any]],
        tags: Sequence[Mapping[str, Any]] = (),
        end_tags: Sequence[str] = ("</answer>",),
        chat_template: bool = True,
        render_tools: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.tags = parse_tags(tags, end_tags)
        self.end_tags = list(end_tags)
        self.tok, self.chat_template = tokenizer, chat_template
        self.template_kwargs = dict(template_kwargs or {})  # model.chat_template_kwargs
        # The tag tools' schemas rendered by the chat template (its tool description), for
        # models that learned tools that way; by default the prompt alone says how to call.
        used = {t.tool for t in self.tags}
        rendered = [s for s in tool_schemas if s["function"]["name"] in used]
        self.rendered = rendered if render_tools and rendered else None
        self.text = PlainText(tokenizer)
        if tokenizer.eos_token is None:
            raise ValueError("inline protocol: the tokenizer has no eos token to end the text")
        self.stop_token_ids = [tokenizer.convert_tokens_to_ids(tokenizer.eos_token)]
        schemas = {s["function"]["name"]: s["function"] for s in tool_schemas}
        self.arguments = {t.tool: _argument(t, schemas) for t in self.tags}
        self.closes = [t.close for t in self.tags] + self.end_tags
        self.stops = StopAtTexts(self.text.decode, self.closes)  # shared: it caches per id

    @staticmethod
    def preflight(
        tags: Sequence[Mapping[str, Any]] = (),
        end_tags: Sequence[str] = ("</answer>",),
        tool_names: Sequence[str] | None = None,
        **_: Any,
    ) -> None:
        """The constructor's checks that need no tokenizer, before Ray starts."""
        for tag in parse_tags(tags, end_tags):
            if tool_names is not None and tag.tool not in tool_names:
                names = ", ".join(tool_names) or "none"
                raise ValueError(
                    f"tag {tag.close} calls {tag.tool!r}, not configured (tools: {names})"
                )

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        if self.chat_template:
            text = render_chat(
                self.tok, messages, True, self.rendered, template_kwargs=self.template_kwargs
            )
            return self.tok.encode(text, add_special_tokens=False)
        return self.tok.encode("\n\n".join(str(m["content"]) for m in messages))

    def start(self, ep: Episode, tools: ToolCaller) -> InlineRun:
        return InlineRun(self, tools, self.prompt_ids(ep.messages))


class InlineRun:
    def __init__(self, protocol: InlineTags, tools: ToolCaller, prompt_ids: list[int]) -> None:
        self.p, self.tools, self.prompt_ids = protocol, tools, prompt_ids
        self.stop_token_ids = protocol.stop_token_ids
        self.written: list[str] = []  # the model's own text, segment by segment

    def pause(self) -> Pause | None:
        return self.p.stops.pause()  # a fresh one per request

    def read(self, turn: Turn, ids: list[int]) -> tuple[str, Tag | None, int]:
        """The segment's text, and the tool tag it paused at with where the tag ends (None
        at the end of the text or at an end tag)."""
        ended = bool(ids) and ids[-1] in self.stop_token_ids
        text = self.p.text.decode(ids[:-1] if ended else ids)
        self.written.append(text)
        turn.content = text
        return (text, *((None, -1) if ended else self._paused_at(text)))

    async def advance(self, turn: Turn, read: tuple[str, Tag | None, int], last: bool) -> Advance:
        text, tag, at = read
        if tag is None:  # end of text, or an end tag: the answer is everything written
            return Advance(final_text="".join(self.written))
        if last:
            return Advance()  # out of turns while still calling: no answer
        call, error = self._call_in(text[:at], tag)
        if call is None:
            turn.parse_errors = [error]
            result = ToolResult("error", f"Error: {error}", ok=False)
        else:
            turn.calls = [call]
            (result,) = await self.tools.run([call])
        turn.results = [result]
        return Advance(append=self.p.text.encode(tag.answer.format(result=result.content)))

    def _paused_at(self, text: str) -> tuple[Tag | None, int]:
        """The tag the segment paused at and where it ends in `text`: the close or end tag
        completed first (the pause cut the segment there, so no other one is complete
        before it; the last token may run past it). (None, -1) for an end tag."""
        ends = [(text.find(c) + len(c), c) for c in self.p.closes if c in text]
        if not ends:
            return None, -1  # cannot happen after a pause; read as the end, not a call
        at, close = min(ends)
        return next((t for t in self.p.tags if t.close == close), None), at

    def _call_in(self, text: str, tag: Tag) -> tuple[ToolCall | None, str]:
        body_end = len(text) - len(tag.close)
        start = text.rfind(tag.open, 0, body_end)
        if start < 0:
            return None, f"{tag.close} without {tag.open} before it"
        query = text[start + len(tag.open) : body_end].strip()
        return ToolCall(tag.tool, {self.p.arguments[tag.tool]: query}), ""

    async def close(self) -> None:
        return None


def _argument(tag: Tag, schemas: dict[str, dict[str, Any]]) -> str:
    """The argument the tag's text goes into: as configured, else the tool's first required
    (or first) parameter; ValueError when the tool is not configured or takes none."""
    if tag.tool not in schemas:
        raise ValueError(
            f"inline protocol: tag {tag.open}…{tag.close} calls {tag.tool!r}, which is not "
            f"configured (tools: {', '.join(schemas) or 'none'})"
        )
    if tag.argument is not None:
        return tag.argument
    params = schemas[tag.tool].get("parameters", {})
    names = list(params.get("required") or []) + list(params.get("properties") or {})
    if not names:
        raise ValueError(f"inline protocol: tool {tag.tool!r} takes no argument to put the text in")
    return names[0]
