"""Parsing runs nothing: no process, socket, code execution or file opening during a parse.

Every shipped parser reads text a policy model wrote, so a turn is hostile input. This test
installs a `sys.addaudithook` hook (hooks cannot be removed: it is installed once per process
and records only while a parse is running) and runs every parser over a corpus of hostile
turns in every format: Python that would run a shell if evaluated, `eval(...)`, huge numbers,
deep nesting, 100 KB arguments. No forbidden event may fire. `compile` is allowed: the
pythonic parser builds an AST with `ast.parse`, which reads code without running it.

    python -m pytest tests/unit/test_parser_audit.py
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest

from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser

# Audit events a parse must never raise: a name, or a prefix of names (`socket` covers
# `socket.connect`, `socket.__new__`, ...).
FORBIDDEN = ("subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.fork")
FORBIDDEN += ("os.forkpty", "os.spawn", "os.startfile", "os.kill", "socket", "exec", "open")
FORBIDDEN += ("os.remove", "os.rename", "os.mkdir", "os.listdir", "os.scandir", "ctypes")
FORBIDDEN += ("urllib", "http.client", "builtins.input", "webbrowser", "shutil")

_recording: list[list[tuple[str, str]]] = []  # the events of the parse now running, if any
_installed: list[bool] = []


def _hook(event: str, args: tuple[Any, ...]) -> None:
    if _recording and any(event == f or event.startswith(f + ".") for f in FORBIDDEN):
        _recording[-1].append((event, repr(args)[:120]))


def install_hook() -> None:
    """Install the hook once per process: a second one would record every event twice."""
    if not _installed:
        sys.addaudithook(_hook)
        _installed.append(True)


def events_of(fn: Callable[[], Any]) -> tuple[Any, list[tuple[str, str]]]:
    """Run fn with recording on: (its result, the forbidden events it raised)."""
    install_hook()
    _recording.append([])
    try:
        result = fn()
    finally:
        events = _recording.pop()
    return result, events


SCHEMA = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {"type": "object", "properties": {"a": {"type": "object"}}},
    },
}
PARSERS: dict[str, Callable[[str], Any]] = {
    "hermes": HermesParser(),
    "qwen3_coder": Qwen3CoderParser(),
    "llama3_json": Llama3JsonParser(),
    "mistral": MistralParser(),
    "pythonic": PythonicParser(),
}
SHELL = "__import__('os').system('touch /tmp/toolrl-pwned')"
PAYLOADS = (
    SHELL,
    f"eval({SHELL!r})",
    f"exec({SHELL!r})",
    "open('/etc/passwd').read()",
    "__import__('socket').create_connection(('127.0.0.1', 9))",
    "__import__('subprocess').Popen(['true'])",
    "(lambda: __import__('os').fork())()",
    "[x for x in ().__class__.__base__.__subclasses__()]",
    "1" * 100_000,  # an integer past Python's digit limit
    "9" * 5000 + "e99999",  # a float that overflows
    "[" * 50_000 + "]" * 50_000,  # deep nesting
    "{" + '"a":{' * 20_000 + "}" * 20_001,
    "x" * 100_000,  # a 100 KB argument
)


def pythonic_texts(p: str) -> list[str]:
    return [f"[f(a={p})]", f"[{p}]", f"[f(a=1), g(b={p})]", f"[f(**{p})]", f"[f({p})]"]


def json_texts(p: str) -> list[str]:
    """The payload as a raw JSON value and as a string argument, in every JSON format."""
    out = []
    for arg in (p, json.dumps(p), f'{{"a": {json.dumps(p)}}}'):
        obj = f'{{"name": "f", "arguments": {{"a": {arg}}}}}'
        out += [f"<tool_call>\n{obj}\n</tool_call>", f"<|python_tag|>{obj}", obj]
        out += [f"[TOOL_CALLS][{obj}]", f'[TOOL_CALLS]f[ARGS]{{"a": {arg}}}</s>']
        out += [f"<tool_call>\n<function=f>\n<parameter=a>\n{arg}\n</parameter>\n</function>"]
    return out


CORPUS = [t for p in PAYLOADS for t in pythonic_texts(p) + json_texts(p)]


def test_the_hook_sees_what_it_forbids() -> None:
    # Without this the test below could pass with a hook that records nothing.
    _, events = events_of(lambda: (eval("1"), open(os.devnull).close()))  # noqa: SIM115
    assert {"exec", "open"} <= {e for e, _ in events}
    _, events = events_of(lambda: compile("1", "<s>", "eval"))
    assert events == []  # compile is not forbidden


@pytest.mark.parametrize("name", list(PARSERS) + ["qwen3_coder_schema"])
def test_no_parser_runs_anything(name: str) -> None:
    if name == "qwen3_coder_schema":
        parser = Qwen3CoderParser(tool_schemas=[SCHEMA])
    else:
        parser = PARSERS[name]
    parser("warm-up")  # imports a parser makes on first use are not a parse's doing
    bad = []
    for text in CORPUS:
        try:
            turn, events = events_of(lambda t=text: parser(t))
        except Exception as e:  # a parser must never raise, on any string
            bad.append(f"raised {type(e).__name__} on {text[:60]!r}")
            continue
        if events:
            bad.append(f"{events[:3]} on {text[:60]!r}")
    assert not bad, f"{len(bad)} of {len(CORPUS)} inputs:\n" + "\n".join(bad[:5])
    assert not os.path.exists("/tmp/toolrl-pwned")


@pytest.mark.parametrize("payload", [p for p in PAYLOADS if "(" in p])
def test_pythonic_code_in_an_argument_is_an_error_not_a_call(payload: str) -> None:
    # Only a literal can be an argument: code is refused (and, above, never run).
    turn = PythonicParser()(f"[f(a={payload}), g(b=1)]")
    assert [(c.name, c.arguments) for c in turn.calls] == [("g", {"b": 1})]
    assert len(turn.errors) == 1 and turn.errors[0].startswith("tool call 1: ")
