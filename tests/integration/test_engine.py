"""Integration tests of `VLLMEngine` against real vLLM (CPU, float32) and transformers.

One engine serves the whole module (vLLM takes ~30 s to start); its asyncio loop lives
in a module-scoped `asyncio.Runner` because vLLM's output handler is bound to the loop
of the first `generate`. The weight-update test puts the original weights back.

Run: `.venv/bin/python -m pytest tests/integration/test_engine.py -q -s` (-s shows timings)
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from toolrl.rollout.engine import EngineConfig, VLLMEngine
from toolrl.rollout.sampler import Generation, Sampling
from toolrl.workers.weights import pack_state_dict

TOL = 1e-4  # max abs difference of float32 logprobs, vLLM vs transformers
REPO_ROOT = Path(__file__).resolve().parents[2]
# Variables the engine sets (or vLLM changes) only while it spawns its processes.
WATCHED_ENV = ("OMP_NUM_THREADS", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")
ENV_AROUND_START: dict[str, dict[str, str | None]] = {}


@pytest.fixture(scope="module")
def runner() -> Iterator[asyncio.Runner]:
    with asyncio.Runner() as r:
        yield r


@pytest.fixture(scope="module")
def engine(runner: asyncio.Runner, tiny_model_dir: Path) -> Iterator[VLLMEngine]:
    async def build() -> VLLMEngine:
        return VLLMEngine(EngineConfig(model_path=str(tiny_model_dir), seed=0))

    ENV_AROUND_START["before"] = {k: os.environ.get(k) for k in WATCHED_ENV}
    start = time.perf_counter()
    eng = runner.run(build())
    print(f"\n[engine] start {time.perf_counter() - start:.1f}s")
    ENV_AROUND_START["after"] = {k: os.environ.get(k) for k in WATCHED_ENV}
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def hf_logprobs(model, context: list[int], new_ids: list[int]) -> torch.Tensor:
    """log p(new_ids[i] | context + new_ids[:i]) from one transformers forward; [len(new_ids)]."""
    ids = torch.tensor([context + new_ids])  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits[0].float()  # [T, V]
    # Row t predicts token t+1, so rows len(context)-1 .. T-2 score the new ids.
    rows = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)  # [N, V]
    return rows.gather(-1, torch.tensor(new_ids)[:, None]).squeeze(-1)


def assert_matches_hf(model, context: list[int], gen: Generation) -> float:
    assert len(gen.token_ids) == len(gen.logprobs) > 0
    ref = hf_logprobs(model, context, gen.token_ids)
    err = (torch.tensor(gen.logprobs) - ref).abs().max().item()
    assert err < TOL, f"max |vLLM - HF| logprob = {err}"
    return err


def gen(runner: asyncio.Runner, engine: VLLMEngine, ids: list[int], **kw) -> Generation:
    return runner.run(engine.generate(ids, Sampling(**kw)))


# The last prompt is longer than vLLM-CPU's 128-token KV block, so its prefix is cached
# and reused by later requests: the weight-update test then needs the cache reset.
LONG = [(7 * i) % 300 + 3 for i in range(300)]
PROMPTS = [[1, 87, 85, 264, 201], [5, 9], list(range(3, 60)), [1, 2, 3, 4, 5, 6, 7, 8] * 6, LONG]


def test_logprobs_match_transformers(runner, engine, hf_model):
    errs = []
    for i, prompt in enumerate(PROMPTS):
        g = gen(runner, engine, prompt, max_new_tokens=24, seed=100 + i)
        assert g.finish_reason == "length" and len(g.token_ids) == 24
        errs.append(assert_matches_hf(hf_model, prompt, g))
    # Multi-turn-like context: turn 1 + foreign (tool) ids + turn 2 sampled after it.
    turn1 = gen(runner, engine, PROMPTS[0], max_new_tokens=16, seed=7)
    context = PROMPTS[0] + turn1.token_ids + [2, 201, 1, 300, 301, 17, 18, 2, 201]
    turn2 = gen(runner, engine, context, max_new_tokens=16, seed=8)
    errs.append(assert_matches_hf(hf_model, context, turn2))
    # Logprobs are the model's own (raw_logprobs), whatever temperature / top-p sample.
    hot = gen(runner, engine, PROMPTS[1], max_new_tokens=16, seed=9, temperature=0.6, top_p=0.8)
    errs.append(assert_matches_hf(hf_model, PROMPTS[1], hot))
    greedy = gen(runner, engine, PROMPTS[2], max_new_tokens=12, temperature=0.0)
    ids = torch.tensor([PROMPTS[2] + greedy.token_ids])
    with torch.no_grad():
        argmax = hf_model(ids).logits[0, len(PROMPTS[2]) - 1 : -1].argmax(-1).tolist()
    assert greedy.token_ids == argmax
    print(f"[engine] max |vLLM - HF| logprob: {max(errs):.2e}")


def test_ids_are_what_the_engine_sampled(runner, engine):
    a = gen(runner, engine, PROMPTS[0], max_new_tokens=32, seed=11)
    b = gen(runner, engine, PROMPTS[0], max_new_tokens=32, seed=11)
    c = gen(runner, engine, PROMPTS[0], max_new_tokens=32, seed=12)
    assert a == b, "same seed must give the same ids and logprobs"
    assert a.token_ids != c.token_ids
    # Stop at a token first seen at position k: ids[:k+1] come back, stop id included.
    k = next(i for i in range(5, 32) if a.token_ids[i] not in a.token_ids[:i])
    stop = a.token_ids[k]
    s = gen(runner, engine, PROMPTS[0], max_new_tokens=32, seed=11, stop_token_ids=(stop,))
    assert s.finish_reason == "stop"
    assert s.token_ids == a.token_ids[: k + 1] and s.token_ids[-1] == stop
    assert s.logprobs == pytest.approx(a.logprobs[: k + 1], abs=1e-5)
    short = gen(runner, engine, PROMPTS[0], max_new_tokens=3, seed=11)
    assert short.finish_reason == "length" and short.token_ids == a.token_ids[:3]


def test_engine_start_leaves_process_environment_alone(engine):
    assert ENV_AROUND_START["after"] == ENV_AROUND_START["before"]


def test_context_at_max_model_len_returns_nothing(runner, engine):
    full = [5] * engine.cfg.max_model_len
    assert gen(runner, engine, full, max_new_tokens=8) == Generation([], [], "length")
    near = gen(runner, engine, [5] * (engine.cfg.max_model_len - 2), max_new_tokens=8, seed=1)
    assert near.finish_reason == "length" and len(near.token_ids) == 2


def test_concurrent_generates_equal_solo_runs(runner, engine):
    jobs = [
        (PROMPTS[i % len(PROMPTS)] + [i % 300], Sampling(max_new_tokens=32, seed=1000 + i))
        for i in range(64)
    ]
    solo = [runner.run(engine.generate(ids, s)) for ids, s in jobs]

    async def batch() -> list[Generation]:
        return await asyncio.gather(*(engine.generate(ids, s) for ids, s in jobs))

    start = time.perf_counter()
    together = runner.run(batch())
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(g.token_ids) for g in together)
    print(f"[engine] 64 concurrent x 32 new tokens: {n_tokens / elapsed:.0f} tokens/s")
    for a, b in zip(solo, together, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.logprobs == pytest.approx(b.logprobs, abs=TOL)


def perturbed_model(hf_model, seed: int):
    """A copy of `hf_model` with N(0, 0.05) noise on every parameter (tied head included)."""
    import copy

    model = copy.deepcopy(hf_model)
    gen_ = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():  # the tied lm_head is the embedding: perturbed once
            p.add_(torch.randn(p.shape, generator=gen_) * 0.05)
    return model


def test_load_weights_changes_generations(runner, engine, hf_model):
    new_model = perturbed_model(hf_model, seed=1)
    state = new_model.state_dict()
    assert "lm_head.weight" in state  # tied: both names, one tensor
    before = [gen(runner, engine, p, max_new_tokens=24, seed=5) for p in PROMPTS]

    async def update_while_busy() -> tuple[list[Generation], list[Generation]]:
        # Generations already started finish on the old weights; ones started after
        # `load_weights` was called wait for the new weights.
        old = [
            asyncio.create_task(engine.generate(p, Sampling(max_new_tokens=24, seed=5)))
            for p in PROMPTS
        ]
        await asyncio.sleep(0)
        update = asyncio.create_task(engine.load_weights(pack_state_dict(state), version=1))
        await asyncio.sleep(0)
        new = [
            asyncio.create_task(engine.generate(p, Sampling(max_new_tokens=24, seed=5)))
            for p in PROMPTS
        ]
        await update
        return list(await asyncio.gather(*old)), list(await asyncio.gather(*new))

    start = time.perf_counter()
    old, after = runner.run(update_while_busy())
    print(f"[engine] generate + load_weights + generate: {time.perf_counter() - start:.2f}s")
    assert engine.version == 1
    assert old == before
    assert all(a.token_ids != b.token_ids for a, b in zip(before, after, strict=True))
    for prompt, g in zip(PROMPTS, after, strict=True):
        assert_matches_hf(new_model, prompt, g)
    with pytest.raises(AssertionError):
        assert_matches_hf(hf_model, PROMPTS[0], after[0])

    # Put the original weights back, this time without the tied `lm_head.weight` name.
    original = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    runner.run(engine.load_weights(pack_state_dict(original), version=2))
    restored = [gen(runner, engine, p, max_new_tokens=24, seed=5) for p in PROMPTS]
    for a, b in zip(before, restored, strict=True):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=TOL)


def test_engine_in_ray_async_actor(runner, engine, tiny_model_dir, hf_model):
    ray = pytest.importorskip("ray")

    @ray.remote(num_cpus=1)
    class EngineActor:
        def __init__(self, model_path: str) -> None:
            self.engine = VLLMEngine(EngineConfig(model_path=model_path, seed=0))

        async def generate(self, ids: list[int], seed: int) -> Generation:
            return await self.engine.generate(ids, Sampling(max_new_tokens=16, seed=seed))

        async def load_weights(self, blob: bytes, version: int) -> int:
            await self.engine.load_weights(blob, version)
            return self.engine.version

        def shutdown(self) -> None:
            self.engine.shutdown()

    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    ray.init(
        num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}
    )
    try:
        actor = EngineActor.remote(str(tiny_model_dir))
        jobs = [(PROMPTS[i % len(PROMPTS)], 50 + i) for i in range(16)]
        # Sixteen calls in flight at once on the actor's event loop.
        remote = ray.get([actor.generate.remote(ids, seed) for ids, seed in jobs], timeout=300)
        local = [gen(runner, engine, ids, max_new_tokens=16, seed=seed) for ids, seed in jobs]
        assert [g.token_ids for g in remote] == [g.token_ids for g in local]
        new_model = perturbed_model(hf_model, seed=2)
        blob = pack_state_dict(new_model.state_dict())
        assert ray.get(actor.load_weights.remote(blob, 3), timeout=120) == 3
        g = ray.get(actor.generate.remote(PROMPTS[0], 1), timeout=120)
        assert_matches_hf(new_model, PROMPTS[0], g)
        ray.get(actor.shutdown.remote(), timeout=120)
    finally:
        ray.shutdown()
