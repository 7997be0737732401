"""A served turn read the way training reads it: which parser, the whole text, and streaming.

The vLLM plugin (`toolrl/serve/vllm_plugin.py`) wraps this module; nothing here imports vLLM.

- `parser_spec(source)`: the `parser` config (with its `reasoning` step) that a name, Hydra
  overrides, a run folder or a YAML file stands for, composed as `python -m toolrl.main` does.
- `TurnReader.read(text)`: what `ChatToolTurns.read` does with a sampled turn: the reasoning
  step first (a leading think block, or the rest of a block the prompt opened), then the call
  parser on the text after it.
- `TurnStream`: the same reading fed piece by piece. Correctness before latency: content is
  streamed only while no call can have started (before the format's first possible opener,
  e.g. `<tool_call>`, `[TOOL_CALLS]`, `{` for Llama 3 JSON, `[` for pythonic); from there on
  everything waits for the end of the turn, where the whole text is parsed once and the rest
  of the content and every call are emitted. So the streamed content joined is exactly the
  content of the non-streaming read, and the calls are exactly its calls. Reasoning is held
  until its block closes and is never emitted.

    python -m pytest tests/unit/test_serve_plugin.py
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolrl.rollout.parsers import hermes, llama3_json, mistral
from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser
from toolrl.rollout.parsers.reasoning import NoReasoning, Reasoned, ReasoningStep, TagReasoning

log = logging.getLogger(__name__)

# The shipped parser choices (conf/parser/<name>.yaml), one vLLM parser name each.
FORMATS = ("hermes", "llama3_json", "mistral", "pythonic", "qwen3_coder")
RUN_CONFIG = Path(".hydra") / "config.yaml"  # where Hydra writes a run's composed config

# What may open a call in each shipped format, and the end-of-turn markers its parser strips
# from the end of a turn. Content before the first opener is final once text follows it
# (checked by tests/unit/test_serve_plugin.py on the parser corpora and a fuzz run).
_HINTS: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {
    HermesParser: ((hermes.OPEN,), (hermes.END_OF_TURN,)),
    Qwen3CoderParser: ((hermes.OPEN,), (hermes.END_OF_TURN,)),
    MistralParser: ((mistral.TOOL_CALLS,), mistral.END_MARKERS),
    Llama3JsonParser: ((llama3_json.PYTHON_TAG, "{"), llama3_json.END_MARKERS),
    PythonicParser: ((llama3_json.PYTHON_TAG, "["), llama3_json.END_MARKERS),
}
_PROBE = [{"role": "user", "content": "?"}]


@functools.cache
def parser_spec(source: str) -> dict[str, Any]:
    """The parser config `source` stands for, as a dict with `_target_` (and `reasoning`).

    `source` is one of: a parser choice (`hermes`), Hydra overrides of the run config
    (`parser=pythonic parser/reasoning=none parser.max_parallel_calls=2`), a run folder or a
    folder inside one (its `checkpoint/`), or a YAML file: a run's `.hydra/config.yaml` (its
    `parser:` key) or a parser spec itself (a `_target_` at the top)."""
    from omegaconf import OmegaConf

    from toolrl.config import ConfigError

    path = Path(source).expanduser()
    if path.exists():
        cfg = OmegaConf.load(_config_file(path))
        if "parser" in cfg:
            return OmegaConf.to_container(cfg.parser, resolve=True)
        if "_target_" in cfg:
            return OmegaConf.to_container(cfg, resolve=True)
        raise ConfigError(f"{path}: holds neither a `parser:` key nor a `_target_`")
    overrides = [o if "=" in o else f"parser={o}" for o in source.split()]
    return _compose_parser(tuple(overrides))


def _config_file(path: Path) -> Path:
    """The YAML file a path names: itself, or a run's config beside or above a folder."""
    if path.is_file():
        return path
    for folder in (path, path.parent):
        if (folder / RUN_CONFIG).is_file():
            return folder / RUN_CONFIG
    from toolrl.config import ConfigError

    raise ConfigError(f"{path}: no {RUN_CONFIG} in it or its parent (is it a run folder?)")


def _compose_parser(overrides: tuple[str, ...]) -> dict[str, Any]:
    # Composed exactly as training composes it, so `toolrl-hermes` is conf/parser/hermes.yaml
    # with the reasoning step its defaults name.
    from omegaconf import OmegaConf

    from toolrl.config import CONF_DIR, ConfigError, composing

    try:
        with composing() as compose:
            cfg = compose(list(overrides))
    except Exception as e:  # Hydra's own errors say which override failed
        raise ConfigError(
            f"{' '.join(overrides)!r}: neither an existing path nor overrides of the run "
            f"config in {CONF_DIR}: {e}"
        ) from e
    return OmegaConf.to_container(cfg.parser, resolve=True)


def generation_prompt(
    tokenizer: Any,
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """What the template's generation prompt adds after a user turn (as ChatBuilder finds it):
    a reasoning block it opens there means every turn starts inside that block. "" when the
    tokenizer cannot render (no template)."""
    from toolrl.rollout.chat import render_chat

    try:
        head = render_chat(tokenizer, _PROBE, False, tools, chat_template, template_kwargs)
        full = render_chat(tokenizer, _PROBE, True, tools, chat_template, template_kwargs)
    except Exception as e:  # a tokenizer without a template, or a template that refuses
        log.info("no generation prompt to read reasoning from: %s", e)
        return ""
    return full[len(head) :] if full.startswith(head) else full


@dataclass
class TurnReader:
    """A call parser and its reasoning step; `factory(spec)` builds them for each request."""

    parser: Callable[[str], ParsedTurn]
    reasoning: ReasoningStep = field(default_factory=NoReasoning)

    @classmethod
    def factory(cls, spec: Mapping[str, Any]) -> Callable[[list[dict[str, Any]]], TurnReader]:
        """`make(tool_schemas) -> TurnReader` for a parser spec, checked now as training
        checks it (a bad spec raises ConfigError here, when vLLM starts). Hydra builds the
        spec once; each request's schemas go to the parser as plain Python objects, since
        instantiating through Hydra per request would convert every schema to a config."""
        from toolrl.config import build_parser, build_target, offered, parser_parts, resolve_target

        _, reasoning = build_parser(dict(spec), [])
        parser_spec = parser_parts(dict(spec))[0]
        make = build_target("parser", {**parser_spec, "_partial_": True})
        takes_schemas = bool(offered(resolve_target("parser", parser_spec), tool_schemas=[]))

        def build(tool_schemas: list[dict[str, Any]]) -> TurnReader:
            return cls(make(tool_schemas=tool_schemas) if takes_schemas else make(), reasoning)

        return build

    def read(self, text: str, opened: bool = False) -> tuple[Reasoned, ParsedTurn]:
        """The turn as training reads it: (reasoning split, parse of the text after it)."""
        split = self.reasoning(text, opened)
        return split, self.parser(split.text)

    def stream(self, opened: bool = False, calls: bool = True) -> TurnStream:
        return TurnStream(self, opened, calls)


class TurnStream:
    """One turn read as it streams in: `feed(delta) -> content to send now`, then `finish()`.

    With `calls=False` (tool_choice "none", or no tools) nothing is parsed for calls: the
    content is the text after the reasoning step, as written."""

    def __init__(self, reader: TurnReader, opened: bool = False, calls: bool = True) -> None:
        self.reader, self.opened, self.calls = reader, opened, calls
        self.text = ""  # everything fed so far
        self.sent = ""  # the content sent so far: always a prefix of the final content
        self.held = False  # a call may have started: nothing more is sent before the end
        self.start: int | None = None  # where the text after reasoning starts, once known
        self.hints = _HINTS.get(type(reader.parser))

    def feed(self, delta: str) -> str:
        """Add `delta` to the turn; return the content that is now final and not yet sent."""
        self.text += delta
        if self.held:
            return ""
        if self.start is None:  # once known it stays: later text cannot move it
            self.start = body_start(self.reader.reasoning, self.text, self.opened)
            if self.start is None:  # still inside (or maybe at the start of) a reasoning block
                return ""
        body = self.text[self.start :]
        if not self.calls:
            safe = body
        elif self.hints is None:  # a parser whose openers are unknown: wait for the end
            self.held = True
            return ""
        else:
            safe, self.held = stable_content(body, *self.hints)
        if len(safe) <= len(self.sent) or not safe.startswith(self.sent):
            return ""
        new, self.sent = safe[len(self.sent) :], safe
        return new

    def finish(self) -> tuple[str, ParsedTurn]:
        """The turn is over: (content not sent yet, the whole turn's parse). The parse's
        content is the whole content, of which the sent part is a prefix."""
        split, parsed = self.reader.read(self.text, self.opened)
        if not self.calls:
            parsed = ParsedTurn(content=split.text)
        if not parsed.content.startswith(self.sent):  # a bug here: never drop content silently
            log.error("streamed content %r is not a prefix of %r", self.sent, parsed.content)
            return "", parsed
        return parsed.content[len(self.sent) :], parsed


def body_start(reasoning: ReasoningStep, text: str, opened: bool) -> int | None:
    """Where the text after the reasoning block starts, once no later text can move it; None
    while undecided (a block not closed yet, or a start that may still become `<think>`).
    Mirrors TagReasoning: only a block leading the turn is reasoning, the first end tag
    closes it. Any other reasoning step is undecided until the end of the turn."""
    if type(reasoning) is NoReasoning:
        return 0
    if type(reasoning) is not TagReasoning:
        return None
    if opened:
        end = text.find(reasoning.end)
        return None if end < 0 else end + len(reasoning.end)
    lead = len(text) - len(text.lstrip())
    if reasoning.start.startswith(text[lead:]):  # nothing but space yet, or a part of the tag
        return None
    if not text.startswith(reasoning.start, lead):
        return 0
    end = text.find(reasoning.end, lead + len(reasoning.start))
    return None if end < 0 else end + len(reasoning.end)


def stable_content(body: str, openers: tuple[str, ...], ends: tuple[str, ...]) -> tuple[str, bool]:
    """(the content of `body` that no later text can change, whether a call may have opened).

    That is the text before the first opener (or before a tail that may grow into an opener
    or an end marker), without what the parser strips from a turn's edges: leading and
    trailing space and trailing end-of-turn markers, which text after them would keep."""
    found = [i for i in (body.find(o) for o in openers) if i >= 0]
    cut = min(found) if found else len(body) - partial_tail(body, openers + ends)
    region = body[:cut]
    while True:
        trimmed = region.rstrip()
        for marker in ends:
            if trimmed.endswith(marker):
                trimmed = trimmed[: -len(marker)]
                break
        if trimmed == region:
            return region.lstrip(), bool(found)
        region = trimmed


def partial_tail(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper beginning of one of `markers`."""
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
