"""What a tool call costs the engine: stop and resume (a new request per turn, its context
read back from the prefix cache) against one streaming-input session per trajectory (vLLM's
`generate` over an input stream: the request keeps its KV between turns and each tool
answer is appended as the next input chunk), measured in one run on one vLLM engine.

    python bench/resume.py                    # 128 trajectories, then 1, of 3 turns x 64 tokens

Each trajectory: a 320-id prompt (groups of 8 share one), 3 turns of exactly 64 sampled
ids, a 16-id tool answer after each of the first two, tools answering at once. For 128
trajectories at once (throughput) and for one alone (latency) it prints the wall time of

    limit      one plain call of the same 192 ids per trajectory (no tool turns)
    resume     toolrl's way: VLLMEngine.generate per turn, with the whole context
    session    a streaming-input session per trajectory

and the cost per tool call: (wall - limit) / tool calls, for one trajectory alone, and
per call of the batch (the batch's extra wall time spread over its calls). Forcing a tool's
answer into a running generation with a logits processor instead costs one decode step per
answer id, and the sequence must keep decoding (forced ids) while the tool runs; the
single-sequence decode step is printed so that cost can be set beside the others.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ANSWER = list(range(500, 516))


def prompts(n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    groups = [[rng.randrange(3, 10_000) for _ in range(length)] for _ in range(-(-n // 8))]
    return [groups[i // 8] for i in range(n)]


async def limit(engine, ps, turns, turn_tokens) -> float:
    from toolrl.rollout.sampler import Sampling

    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            engine.generate(p, Sampling(max_new_tokens=turns * turn_tokens, seed=i))
            for i, p in enumerate(ps)
        )
    )
    return time.perf_counter() - t0


async def resume(engine, ps, turns, turn_tokens) -> float:
    from toolrl.rollout.sampler import Sampling

    async def one(i: int, p: list[int]) -> None:
        ctx = list(p)
        for k in range(turns):
            g = await engine.generate(ctx, Sampling(max_new_tokens=turn_tokens, seed=i * 10 + k))
            ctx += g.token_ids + (ANSWER if k + 1 < turns else [])

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    return time.perf_counter() - t0


async def session(engine, ps, turns, turn_tokens) -> float:
    from vllm import SamplingParams
    from vllm.engine.protocol import StreamingInput
    from vllm.sampling_params import RequestOutputKind

    from toolrl.rollout.engine import _token_prompt

    def params(seed: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=turn_tokens,
            ignore_eos=True,
            seed=seed,
            logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )

    async def one(i: int, p: list[int]) -> None:
        turn_done: asyncio.Queue[None] = asyncio.Queue()

        async def inputs():
            yield StreamingInput(prompt=_token_prompt(list(p)), sampling_params=params(i * 10))
            for k in range(1, turns):
                await turn_done.get()  # the turn ended: the tool answers at once
                yield StreamingInput(
                    prompt=_token_prompt(ANSWER), sampling_params=params(i * 10 + k)
                )

        sampled = 0
        async for out in engine._llm.generate(inputs(), params(i * 10), f"session-{i}"):
            if out.outputs:
                sampled += len(out.outputs[0].token_ids)
                if out.outputs[0].finish_reason is not None and not out.finished:
                    turn_done.put_nowait(None)
        assert sampled == turns * turn_tokens, sampled

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(ps)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trajectories", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=32)
    args = ap.parse_args()
    from toolrl.main import resolve_model
    from toolrl.rollout.engine import EngineConfig, VLLMEngine

    turns, turn_tokens = 3, 64

    async def run() -> None:
        cfg = EngineConfig(
            model_path=resolve_model("embedded"),
            max_model_len=1024,
            kv_cache_gib=2,
            block_size=args.block_size,
        )
        engine = VLLMEngine(cfg)
        await limit(engine, prompts(8, 320)[:8], 1, 16)  # warm-up
        print(f"block size {args.block_size}; {turns} turns x {turn_tokens} ids, 16-id answers")
        print(
            f"{'trajectories':>12} {'limit s':>8} {'resume s':>9} {'session s':>10} "
            f"{'resume / call ms':>17} {'session / call ms':>18}"
        )
        for n in (args.trajectories, 1):
            ps = prompts(n, 320)
            calls = n * (turns - 1)
            lim = await limit(engine, ps, turns, turn_tokens)
            res = await resume(engine, ps, turns, turn_tokens)
            ses = await session(engine, ps, turns, turn_tokens)
            print(
                f"{n:>12} {lim:>8.2f} {res:>9.2f} {ses:>10.2f} "
                f"{1000 * (res - lim) / calls:>17.1f} {1000 * (ses - lim) / calls:>18.1f}"
            )
            if n == 1:
                print(
                    f"single-sequence decode step: {1000 * lim / (turns * turn_tokens):.1f} ms; "
                    f"forcing a 16-id answer id by id: about {16 * lim / (turns * turn_tokens) * 1000:.0f} ms a call"
                )
        engine.shutdown()

    asyncio.run(run())


if __name__ == "__main__":
    main()
