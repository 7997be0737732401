"""Behaviour mix of the warm-started embedded model, sampled at temperature 1.

Builds the default embedded model (or uses the cached one), then samples one episode per
eval prompt with a minimal plain-transformers loop (turn, tool, turn) and prints the
fractions of correct calls, wrong-operator calls and direct answers, the operand and result
copy accuracies and the mean reward: the step-0 point that RL starts from.

    python bench/warmstart_modes.py                    # default model, 200 eval prompts
    python bench/warmstart_modes.py --tool python      # the variant that calls `python`
    python bench/warmstart_modes.py --tool calculator_inline   # plain text, inline <calc> tags
    python bench/warmstart_modes.py --cache /tmp/c --n 100 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from toolrl.models import warmstart_inline
from toolrl.models.tiny import build_embedded_model, embedded_config
from toolrl.models.warmstart import TOOL_STYLES, measure_modes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default: $TOOLRL_CACHE)"
    )
    ap.add_argument("--n", type=int, default=200, help="eval prompts to sample")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="sampling seeds")
    ap.add_argument(
        "--tool", default="calculator", choices=list(TOOL_STYLES), help="warm-start style"
    )
    args = ap.parse_args()
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    path = build_embedded_model(embedded_config(args.tool), cache_dir=args.cache)
    built_s = time.perf_counter() - t0
    info = json.loads((path / "toolrl_build.json").read_text())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    print(f"model: {path}")
    print(
        f"load average at start: {load:.2f} on {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    print(
        f"this call took {built_s:.1f}s; recorded build time {info['build_s']:.1f}s "
        f"(warm-start {info.get('warmstart', {}).get('seconds', 0):.1f}s)"
    )
    for seed in args.seeds:
        t1 = time.perf_counter()
        if TOOL_STYLES[args.tool].inline:  # sampled as the inline protocol runs it
            stats = warmstart_inline.measure_modes(model, tok, n=args.n, seed=seed)
        else:
            stats = measure_modes(model, tok, n=args.n, seed=seed, tool=args.tool)
        print(
            f"seed {seed} ({time.perf_counter() - t1:.1f}s): "
            + json.dumps({k: round(v, 3) for k, v in stats.items()})
        )


if __name__ == "__main__":
    main()
