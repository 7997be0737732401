"""Check whether a model folder's chat template works with toolrl's multi-turn token builder.

Before training a model with tools, run

    python -m toolrl.check_template MODEL_DIR
    python -m toolrl.check_template MODEL_DIR --chat-template fixed.jinja   # another template
    python -m toolrl.check_template MODEL_DIR --template-kwargs '{"enable_thinking": false}'

It loads the tokenizer from the local folder (no downloads), builds the append-only
`ChatBuilder` with a probe tool, and prints: the end-of-turn token the engine stops at,
whether tool turns are append-only (and if not, the builder's reason), the ids and text the
builder appends after a tool-calling turn, whether those ids are the tokenizer's ids of the
template's own render for tool answers that start and end with punctuation, whitespace, a
newline or nothing (where a vocabulary merges template text and tool text into one token,
like Qwen's `.\\n`), how the template writes a tool's text, whether user turns (an
environment's observations) are append-only and token-exact for such texts too, whether it
renders tool schemas, whether it drops reasoning of earlier turns, whether its generation
prompt opens a `<think>` block (turns start inside reasoning), and which parser in
conf/parser/ matches its tool-call format. `--chat-template` (or `--template`) and
`--template-kwargs` are `model.chat_template` and `model.chat_template_kwargs` of a run.
A template that cannot add user turns is still usable for tool turns (the environment
protocol refuses it). Exit status: 0 usable, 1 not usable, 2 bad path or argument.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolrl.rollout.chat import ChatBuilder, TemplateError, read_chat_template, render_chat
from toolrl.rollout.parsers.base import Parser
from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser
from toolrl.rollout.parsers.reasoning import TagReasoning
from toolrl.rollout.trajectory import ToolResult

PROBE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "toolrl_probe",
        "description": "Probe tool of toolrl.check_template.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
PROBE_ARGS = {"city": "Paris"}
PROBE_REASONING = "toolrl-probe-reasoning"
PROBE_CALL_ID = "probe0001"  # 9 characters, as Mistral's templates require
# Tool answers whose edges meet the template's text: a seam a vocabulary may merge across.
SEAM_ANSWERS = ("", "x", "x.", "x}", "x]", "x)", " x", "x ", "\nx\n", "{}", "é", ".x", "}x")
SEAM_ANSWERS += ("\n", " ", "(no output)", "x\n[output truncated: 12 more tokens]")
_USER = {"role": "user", "content": "Weather in Paris?"}
# conf/parser/<name>.yaml by the markers of the format, most specific first: Qwen3-Coder's
# XML also sits in <tool_call>, and Llama 3.1 writes "parameters" where Hermes has "arguments".
PARSERS: tuple[tuple[str, re.Pattern[str], type], ...] = (
    ("qwen3_coder", re.compile(r"<function="), Qwen3CoderParser),
    ("hermes", re.compile(r"<tool_call>"), HermesParser),
    ("mistral", re.compile(r"\[TOOL_CALLS\]"), MistralParser),
    ("llama3_json", re.compile(r'<\|python_tag\|>|"parameters"'), Llama3JsonParser),
    ("pythonic", re.compile(r"\[\w+\(\w+="), PythonicParser),
)


@dataclass
class Report:
    """What the check found; `problems` empty means the template is usable."""

    eos: str | None = None
    eos_id: int | None = None
    append_only: str = "not checked"
    glue_text: str | None = None
    glue_ids: list[int] = field(default_factory=list)
    seams: str = "not checked"
    content_form: str | None = None
    user_turns: str = "not checked"
    user_seams: str = "not checked"
    renders_tools: str = "not checked"
    strips_reasoning: str = "not checked"
    opens_reasoning: str = "not checked"
    parser: str = "unknown"
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        glue = f"{self.glue_text!r} ids={self.glue_ids}" if self.glue_text is not None else "-"
        verdict = "yes" if self.usable else "no: " + "; ".join(self.problems)
        return [
            f"end-of-turn token: {self.eos!r} (id {self.eos_id})",
            f"tool turns append-only: {self.append_only}",
            f"glue after a tool-calling turn (one answer 'RESULT'): {glue}",
            f"tool turns token-exact with the render: {self.seams}",
            f"tool output written: {self.content_form or '-'}",
            f"user turns (environment observations) append-only: {self.user_turns}",
            f"user turns token-exact with the render: {self.user_seams}",
            f"renders tool schemas: {self.renders_tools}",
            f"strips reasoning from earlier turns: {self.strips_reasoning}",
            f"turns start inside <think> (the prompt opens it): {self.opens_reasoning}",
            f"tool-call format looks like parser: {self.parser}",
            f"usable: {verdict}",
        ]


def _render(
    tok: Any, messages: list[dict[str, Any]], tools: list | None, gen: bool, kw: dict[str, Any]
) -> str:
    return render_chat(tok, messages, gen, tools, template_kwargs=kw)


def _check_eos(tok: Any, report: Report) -> None:
    report.eos = tok.eos_token
    if report.eos is None:
        report.problems.append("the tokenizer has no eos token")
        return
    report.eos_id = tok.convert_tokens_to_ids(report.eos)
    if tok.encode(report.eos, add_special_tokens=False) != [report.eos_id]:
        report.problems.append(f"{report.eos!r} is not a single token the engine can stop at")


def _check_builder(tok: Any, report: Report, kw: dict[str, Any]) -> None:
    try:
        chat = ChatBuilder(tok, [PROBE_TOOL], template_kwargs=kw)
    except TemplateError as e:
        report.append_only = f"no: {e}"
        report.problems.append(f"the token builder refuses the template: {e}")
        return
    report.append_only = "yes"
    report.glue_ids = chat.tool_turn_ids([ToolResult("toolrl_probe", "RESULT")])
    report.glue_text = chat.decode(report.glue_ids)
    report.content_form = chat.content_form
    opened = TagReasoning().opened_by(chat.generation_prompt)
    report.opens_reasoning = "yes (use parser/reasoning=qwen3)" if opened else "no"
    _check_seams(tok, chat, report, kw)
    _check_user_turns(tok, chat, report, kw)


def _check_seams(tok: Any, chat: ChatBuilder, report: Report, kw: dict[str, Any]) -> None:
    """For each of SEAM_ANSWERS: are the ids of the template's render of a conversation with
    that tool answer its ids through the call turn's end plus the builder's tool turn?"""
    call = {"id": PROBE_CALL_ID, "type": "function"}
    call["function"] = {"name": "toolrl_probe", "arguments": PROBE_ARGS}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    prompt = _render(tok, [_USER], [PROBE_TOOL], True, kw)
    bad = []
    answer = {"role": "tool", "name": "toolrl_probe", "tool_call_id": PROBE_CALL_ID}
    for text in SEAM_ANSWERS:
        try:
            full = _render(tok, [_USER, turn, {**answer, "content": text}], [PROBE_TOOL], True, kw)
        except Exception as e:  # the template's raise_exception() or a field it lacks
            report.seams = f"error: {type(e).__name__}: {e}"
            return
        end = full.find(chat.turn_end, len(prompt)) + len(chat.turn_end)
        built = chat.tool_turn_ids([ToolResult("toolrl_probe", text, call_id=PROBE_CALL_ID)])
        if _encode(tok, full[:end]) + built != _encode(tok, full):
            bad.append(text)
    n = len(SEAM_ANSWERS)
    if not bad:
        report.seams = f"yes ({n} tool answers with edge punctuation, whitespace or nothing)"
        return
    report.seams = f"no: {len(bad)} of {n} answers differ: {', '.join(map(repr, bad))}"
    report.problems.append(
        "the tool turn's ids differ from the tokenizer's ids of the template's render for "
        f"tool answers {', '.join(map(repr, bad))}: a train/serve mismatch"
    )


def _check_user_turns(tok: Any, chat: ChatBuilder, report: Report, kw: dict[str, Any]) -> None:
    """Can the builder add user turns, and are its ids, for each of SEAM_ANSWERS as the
    user's text, the tokenizer's ids of the render after an assistant reply's end?"""
    try:
        chat.check_user_turns()
    except TemplateError as e:
        report.user_turns = f"no: {e}"
        report.user_seams = "-"
        return
    drops = chat.history_drops
    report.user_turns = f"yes (earlier turns render without {drops!r}; kept)" if drops else "yes"
    reply = {"role": "assistant", "content": "Sunny."}
    bad = []
    for text in SEAM_ANSWERS:
        full = _render(
            tok, [_USER, reply, {"role": "user", "content": text}], [PROBE_TOOL], True, kw
        )
        end = full.index(chat.turn_end, full.index("Sunny.")) + len(chat.turn_end)
        if _encode(tok, full[:end]) + chat.user_turn_ids(text) != _encode(tok, full):
            bad.append(text)
    if not bad:
        report.user_seams = f"yes ({len(SEAM_ANSWERS)} texts with edge punctuation or whitespace)"
        return
    report.user_seams = f"no: {len(bad)} of {len(SEAM_ANSWERS)} texts differ: {bad!r}"
    report.problems.append(f"the user turn's ids differ from the render's for texts {bad!r}")


def _encode(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _check_renders(tok: Any, report: Report, kw: dict[str, Any]) -> None:
    """Tool schemas and reasoning; a template that raises on these probes says so."""
    try:
        with_tools = _render(tok, [_USER], [PROBE_TOOL], True, kw)
        report.renders_tools = "yes" if "toolrl_probe" in with_tools else "no"
        if report.renders_tools == "no":
            report.problems.append("the template does not show the tools' schemas to the model")
    except Exception as e:  # the template's raise_exception() or a field it lacks
        report.renders_tools = f"error: {type(e).__name__}: {e}"
        report.problems.append("the template cannot render a prompt with tools")
    turn = {"role": "assistant", "content": f"<think>\n{PROBE_REASONING}\n</think>\n\nSunny."}
    try:
        text = _render(tok, [_USER, turn, {"role": "user", "content": "And?"}], None, True, kw)
        kept = PROBE_REASONING in text
        report.strips_reasoning = "no (kept as written)" if kept else "yes (the builder keeps it)"
    except Exception as e:
        report.strips_reasoning = f"error: {type(e).__name__}: {e}"


def _call_text(tok: Any, kw: dict[str, Any]) -> str:
    """The template's own rendering of an assistant turn with one probe call, or ''."""
    call = {"id": "probe0001", "type": "function"}
    call["function"] = {"name": "toolrl_probe", "arguments": PROBE_ARGS}
    turn = {"role": "assistant", "content": "", "tool_calls": [call]}
    try:
        prompt = _render(tok, [_USER], [PROBE_TOOL], True, kw)
        full = _render(tok, [_USER, turn], [PROBE_TOOL], False, kw)
    except Exception:
        return ""
    return full[len(prompt) :] if full.startswith(prompt) else full


def template_parser(tok: Any, kw: dict[str, Any]) -> tuple[str, type, str] | None:
    """(name in conf/parser/, parser class, where it was seen) of the tool-call format the
    template writes, from the markers in a rendered call (else in the template source)."""
    source = tok.chat_template if isinstance(tok.chat_template, str) else ""
    for text, where in ((_call_text(tok, kw), "rendered call"), (source, "template source")):
        for name, marker, cls in PARSERS:
            if marker.search(text):
                return name, cls, where
    return None


def _check_parser(tok: Any, report: Report, kw: dict[str, Any]) -> None:
    """Guess the parser from the template, and say whether it reads the template's own call."""
    found = template_parser(tok, kw)
    if found is None:
        report.parser = "unknown: no known tool-call marker; write a parser for this format"
        return
    name, cls, where = found
    report.parser = f"{name} (conf/parser/{name}.yaml; from the {where}"
    report.parser += _reads_back(cls(), _call_text(tok, kw)) + ")"


def _reads_back(parser: Parser, call_text: str) -> str:
    if not call_text:
        return ""
    calls = parser(call_text).calls
    ok = [(c.name, c.arguments) for c in calls] == [("toolrl_probe", PROBE_ARGS)]
    return ", it parses the template's own call" if ok else ", it does NOT parse its own call"


def check(tok: Any, template_kwargs: dict[str, Any] | None = None) -> Report:
    """Run every check on a tokenizer that carries its chat template, rendered with
    `template_kwargs` (model.chat_template_kwargs)."""
    report, kw = Report(), dict(template_kwargs or {})
    if not tok.chat_template:
        report.problems.append("the tokenizer has no chat template (give one with --chat-template)")
        return report
    _check_eos(tok, report)
    _check_builder(tok, report, kw)
    _check_renders(tok, report, kw)
    _check_parser(tok, report, kw)
    return report


def main(argv: list[str] | None = None) -> int:
    """Print the report for MODEL_DIR; return 0 usable, 1 not usable, 2 bad path."""
    ap = argparse.ArgumentParser(prog="python -m toolrl.check_template", description=__doc__)
    ap.add_argument("model_dir", type=Path, help="local folder with the tokenizer files")
    ap.add_argument(
        "--chat-template",
        "--template",
        dest="template",
        type=Path,
        help="a .jinja file to use as the chat template (model.chat_template)",
    )
    ap.add_argument(
        "--template-kwargs",
        default="{}",
        help="a JSON object passed to the template (model.chat_template_kwargs)",
    )
    args = ap.parse_args(argv)
    try:
        kwargs = json.loads(args.template_kwargs)
    except json.JSONDecodeError as e:
        kwargs = e
    if not isinstance(kwargs, dict):
        print(f"error: --template-kwargs is not a JSON object: {kwargs}", file=sys.stderr)
        return 2
    if not args.model_dir.is_dir():
        print(f"error: {args.model_dir} is not a folder", file=sys.stderr)
        return 2
    if args.template is not None and not args.template.is_file():
        print(f"error: {args.template} is not a file", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(args.model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        print(f"error: no tokenizer in {args.model_dir}: {e}", file=sys.stderr)
        return 2
    if args.template is not None:
        tok.chat_template = read_chat_template(args.template)
    report = check(tok, kwargs)
    print("\n".join(report.lines()))
    return 0 if report.usable else 1


if __name__ == "__main__":
    sys.exit(main())
