"""Parse time of every tool-call parser against the size of a call's argument.

For each format (hermes, qwen3_coder, llama3_json, mistral array, mistral v11, pythonic) it
writes one turn holding one call whose string argument is 1 KB, 10 KB, 100 KB and 1 MB long
(text full of quotes, backslashes, brackets, newlines, unicode and other formats' markers),
and one whose argument is a 1 MB nested JSON object, checks that the parser reads the call
back exactly, and times the parse (best of several runs). It prints the times, the ratio
time(1 MB) / time(1 KB), the per-KB slope between them, and time(1 MB) / time(100 KB): a
parser linear in its input gives about 10 there, a quadratic one about 100, so each parser
is marked LINEAR when that ratio is at most --max-ratio (default 25) and NOT LINEAR otherwise.
The exit status is 1 when a parser is not linear or misreads a call. The machines are small
and shared: compare ratios, not absolute times.

    python bench/parsers.py                     # all parsers, default sizes
    python bench/parsers.py --min-time 0.5      # longer timing per cell, steadier numbers
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from toolrl.rollout.parsers.hermes import HermesParser
from toolrl.rollout.parsers.llama3_json import Llama3JsonParser
from toolrl.rollout.parsers.mistral import MistralParser
from toolrl.rollout.parsers.pythonic import PythonicParser
from toolrl.rollout.parsers.qwen3_coder import Qwen3CoderParser

KB = 1024
SIZES = {"1KB": KB, "10KB": 10 * KB, "100KB": 100 * KB, "1MB": KB * KB}
# One line of a long argument: what a model writing code or prose into a tool puts there. No
# `</parameter>` in it: Qwen3-Coder's XML cannot hold one followed by another parameter.
CHUNK = 'say "hi" to <tool_call> and [TOOL_CALLS]{x}; [y], \\n é 日本 <|im_end|> [ARGS]\n'
SCHEMA = {
    "type": "function",
    "function": {
        "name": "f",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string"}, "data": {"type": "object"}},
        },
    },
}
Args = dict[str, Any]


def long_text(size: int) -> str:
    return (CHUNK * (size // len(CHUNK) + 1))[:size]


def nested_object(size: int) -> dict[str, Any]:
    """A JSON object of about `size` bytes: rows of nested records, as a search tool returns."""
    row = {"id": 0, "title": "row", "tags": ["a", "b"], "score": 0.5, "ok": True}
    row["meta"] = {"parent": None, "path": ["x", {"y": [1, 2, {"z": "w"}]}]}
    n = size // len(json.dumps(row)) + 1
    return {"rows": [dict(row, id=i, title=f"row {i}") for i in range(n)]}


def xml_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


# How each format writes a turn with one call f(**args); the Mistral id is a sampled one.
WRITERS: dict[str, Callable[[Args], str]] = {
    "hermes": lambda a: (
        f"<tool_call>\n{json.dumps({'name': 'f', 'arguments': a})}\n</tool_call>" + "<|im_end|>"
    ),
    "qwen3_coder": lambda a: (
        "<tool_call>\n<function=f>\n"
        + "".join(f"<parameter={k}>\n{xml_value(v)}\n</parameter>\n" for k, v in a.items())
        + "</function>\n</tool_call><|im_end|>"
    ),
    "llama3_json": lambda a: (
        "<|python_tag|>" + json.dumps({"name": "f", "parameters": a}) + "<|eot_id|>"
    ),
    "mistral_array": lambda a: (
        "[TOOL_CALLS]" + json.dumps([{"name": "f", "arguments": a, "id": "a1B2c3D4e"}]) + "</s>"
    ),
    "mistral_v11": lambda a: f"[TOOL_CALLS]f[CALL_ID]a1B2c3D4e[ARGS]{json.dumps(a)}</s>",
    "pythonic": lambda a: f"[f({', '.join(f'{k}={v!r}' for k, v in a.items())})]<|eot_id|>",
}
PARSERS: dict[str, Callable[[], Callable[[str], Any]]] = {
    "hermes": HermesParser,
    "qwen3_coder": lambda: Qwen3CoderParser(tool_schemas=[SCHEMA]),
    "llama3_json": Llama3JsonParser,
    "mistral_array": MistralParser,
    "mistral_v11": MistralParser,
    "pythonic": PythonicParser,
}


def best_time(fn: Callable[[], Any], min_time: float) -> float:
    """Seconds per call: the best of 5 runs, each of enough calls to last min_time / 5."""
    loops, elapsed = 1, 0.0
    while True:  # find a loop count that makes one run last long enough to time
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time / 5 or loops >= 1 << 20:
            break
        loops *= 2 if elapsed == 0 else max(2, int(min_time / 5 / elapsed) + 1)
    best = elapsed / loops
    for _ in range(4):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


def measure(name: str, min_time: float) -> dict[str, float] | str:
    """Seconds per parse for each size (and "1MB nested"), or why the parser misread a call."""
    parser = PARSERS[name]()
    cases = {label: {"text": long_text(size)} for label, size in SIZES.items()}
    cases["1MB nested"] = {"data": nested_object(KB * KB)}
    times = {}
    for label, args in cases.items():
        text = WRITERS[name](args)
        turn = parser(text)
        if [(c.name, c.arguments) for c in turn.calls] != [("f", args)] or turn.errors:
            return f"misread the {label} call: {turn.errors[:1]}"
        times[label] = best_time(lambda t=text: parser(t), min_time)
    return times


def report(name: str, times: dict[str, float], max_ratio: float) -> bool:
    """Print one row; True when the parser is linear."""
    small, big = times["1KB"], times["1MB"]
    slope_us = (big - small) / 1023 * 1e6  # µs per KB between 1 KB and 1 MB
    growth = big / times["100KB"]
    linear = growth <= max_ratio
    cells = "".join(f"{times[k] * 1e3:>11.3f}" for k in (*SIZES, "1MB nested"))
    verdict = "LINEAR" if linear else "NOT LINEAR"
    print(f"{name:<14}{cells}{big / small:>10.0f}{slope_us:>10.2f}{growth:>11.1f}  {verdict}")
    return linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-time", type=float, default=0.2, help="seconds of timing per cell")
    ap.add_argument(
        "--max-ratio", type=float, default=25.0, help="largest t(1MB)/t(100KB) called linear"
    )
    args = ap.parse_args()
    print(f"python {platform.python_version()}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    print("times in ms per parse (best of 5 runs)")
    heads = "".join(f"{h:>11}" for h in (*SIZES, "1MB nested"))
    print(f"{'parser':<14}{heads}{'1MB/1KB':>10}{'us/KB':>10}{'1MB/100KB':>11}  growth")
    ok = True
    for name in PARSERS:
        times = measure(name, args.min_time)
        if isinstance(times, str):
            print(f"{name:<14}FAIL: {times}")
            ok = False
        else:
            ok &= report(name, times, args.max_ratio)
    print(f"load at end {os.getloadavg()}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
