"""Integration tests of `VLLMEngine` against real vLLM (CPU, float32) and transformers.

One engine serves the whole module (vLLM takes ~30 s to start); its asyncio loop lives
in a module-scoped `asyncio.Runner` because vLLM's output handler is bound to the loop
of the first `generate`. The weight-update test puts the original weights back.

Run: `.venv/bin/python -m pytest tests/integration/test_engine.py -q -s` (-s shows timings)
"""

from __future__ import annotations

import asyncio
import contextlib
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
        # 32-token blocks (vLLM-CPU's smallest): the prefix cache test needs hits on short contexts
        return VLLMEngine(EngineConfig(model_path=str(tiny_model_dir), seed=0, block_size=32))

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


def hf_logprobs(
    model, context: list[int], new_ids: list[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p(new_ids[i] | context + new_ids[:i]) from one transformers forward, under
    logits / temperature; [len(new_ids)]."""
    ids = torch.tensor([context + new_ids])  # [1, T]
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature  # [T, V]
    # Row t predicts token t+1, so rows len(context)-1 .. T-2 score the new ids.
    rows = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)  # [N, V]
    return rows.gather(-1, torch.tensor(new_ids)[:, None]).squeeze(-1)


def assert_matches_hf(
    model, context: list[int], gen: Generation, temperature: float = 1.0
) -> float:
    assert len(gen.token_ids) == len(gen.logprobs) > 0
    ref = hf_logprobs(model, context, gen.token_ids, temperature)
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
    # Logprobs are those of the distribution sampled from (processed_logprobs): the trainer
    # scores logits / temperature the same way (toolrl.workers.actor._token_logprobs).
    hot = gen(runner, engine, PROMPTS[1], max_new_tokens=16, seed=9, temperature=0.6)
    errs.append(assert_matches_hf(hf_model, PROMPTS[1], hot, temperature=0.6))
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


# --- pauses: requests that stream and are cut (inline tags); see toolrl/rollout/pause.py ---


def at_count(n: int):
    """A pause that keeps the first `n` generated ids."""
    return lambda ids: n if len(ids) >= n else None


def assert_prefix(paused: Generation, full: Generation, n: int) -> None:
    """`paused` is the first `n` ids (and logprobs) of the unpaused `full`, ending in "stop"."""
    assert paused.finish_reason == "stop" and len(full.token_ids) >= n
    assert paused.token_ids == full.token_ids[:n]
    assert paused.logprobs == pytest.approx(full.logprobs[:n], abs=1e-5)


def assert_no_request_left(runner: asyncio.Runner, engine: VLLMEngine) -> None:
    """Nothing runs in vLLM: none in its output processor, and (resetting the prefix cache
    succeeds only when no request holds KV blocks) none in its engine core."""
    assert engine._in_flight == 0 and engine._drained.is_set()
    assert engine._llm.get_num_unfinished_requests() == 0
    assert runner.run(engine._llm.reset_prefix_cache())


@pytest.fixture(scope="module")
def decode(tiny_model_dir: Path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def tag_in(decode, ids: list[int]) -> str:
    """A short text from the middle of decode(ids) (no U+FFFD), as a stop "tag"."""
    text = decode(ids)
    for size in (4, 3, 2):
        for i in range(len(text) // 3, len(text) - size):
            if "\ufffd" not in text[i : i + size]:
                return text[i : i + size]
    raise AssertionError(f"no clean text in {text!r}")


def paused_gen(runner: asyncio.Runner, engine: VLLMEngine, ids: list[int], pause, **kw):
    return runner.run(engine.generate(ids, Sampling(**kw), pause))


def test_pause_keeps_a_prefix_of_the_sampled_ids(runner, engine, decode):
    from tests.unit.test_pause import reference_cut
    from toolrl.rollout.pause import stop_at_texts

    kw = {"max_new_tokens": 40, "seed": 21}
    full = gen(runner, engine, PROMPTS[0], **kw)
    assert_prefix(paused_gen(runner, engine, PROMPTS[0], at_count(5), **kw), full, 5)
    # A pause that never fires: as without one, also when a stop id ends the turn first.
    never = paused_gen(runner, engine, PROMPTS[0], lambda ids: None, **kw)
    assert never.token_ids == full.token_ids and never.finish_reason == "length"
    assert never.logprobs == pytest.approx(full.logprobs, abs=1e-5)
    k = next(i for i in range(8, 40) if full.token_ids[i] not in full.token_ids[:i])
    stop = {**kw, "stop_token_ids": (full.token_ids[k],)}
    assert_prefix(paused_gen(runner, engine, PROMPTS[0], lambda ids: None, **stop), full, k + 1)
    assert_prefix(paused_gen(runner, engine, PROMPTS[0], at_count(k + 5), **stop), full, k + 1)
    # A text from the middle of the unpaused sample, as a tag: cut at the shortest prefix.
    tag = tag_in(decode, full.token_ids)
    n = reference_cut(decode, full.token_ids, [tag])
    assert n is not None and 1 < n < len(full.token_ids)
    pause = stop_at_texts(decode, [tag])
    paused = paused_gen(runner, engine, PROMPTS[0], pause, **kw)
    assert_prefix(paused, full, n)
    assert pause.matched == tag and tag in decode(paused.token_ids)
    assert tag not in decode(paused.token_ids[:-1])


def test_paused_request_leaves_vllm(runner, engine):
    # The request could run 600 more tokens: after the cut it must be gone from vLLM.
    start = time.perf_counter()
    g = paused_gen(runner, engine, PROMPTS[1], at_count(3), max_new_tokens=600, seed=4)
    print(f"[engine] paused at 3 of 600 tokens: {time.perf_counter() - start:.2f}s")
    assert len(g.token_ids) == 3
    assert_no_request_left(runner, engine)
    after = gen(runner, engine, PROMPTS[1], max_new_tokens=6, seed=4)
    assert after.finish_reason == "length" and after.token_ids[:3] == g.token_ids

    def broken(ids: list[int]) -> int | None:
        if len(ids) >= 2:
            raise KeyError("bug in a pause")
        return None

    with pytest.raises(KeyError, match="bug in a pause"):
        paused_gen(runner, engine, PROMPTS[1], broken, max_new_tokens=600, seed=4)
    with pytest.raises(ValueError, match="pause returned 0"):
        paused_gen(runner, engine, PROMPTS[1], lambda ids: 0, max_new_tokens=600, seed=4)
    assert_no_request_left(runner, engine)


class HeldCut:
    """A pause that keeps the first `n` ids, once released (until then it lets ids come)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.released = n, 0, False

    def __call__(self, ids: list[int]) -> int | None:
        self.calls += 1
        return self.n if self.released and len(ids) >= self.n else None


def test_concurrent_paused_requests(runner, engine, decode, hf_model):
    from tests.unit.test_pause import reference_cut
    from toolrl.rollout.pause import StopAtTexts

    jobs = [(PROMPTS[i % len(PROMPTS)] + [i], 2000 + i) for i in range(16)]

    async def run(max_new: int, pauses: list) -> list[Generation]:
        calls = (
            engine.generate(ids, Sampling(max_new_tokens=max_new, seed=seed), pause)
            for (ids, seed), pause in zip(jobs, pauses, strict=True)
        )
        return list(await asyncio.gather(*calls))

    full = runner.run(run(32, [None] * 16))
    # Even jobs cut at a count, odd ones at a text from the middle of their own sample.
    tags = [tag_in(decode, g.token_ids) for g in full]
    cuts = [
        3 + i if i % 2 == 0 else reference_cut(decode, g.token_ids, [tags[i]])
        for i, g in enumerate(full)
    ]
    pauses = [
        at_count(c) if i % 2 == 0 else StopAtTexts(decode, [tags[i]]).pause()
        for i, c in enumerate(cuts)
    ]
    start = time.perf_counter()
    paused = runner.run(run(400, pauses))
    print(f"[engine] 16 concurrent paused requests: {time.perf_counter() - start:.2f}s")
    for g, f, n in zip(paused, full, cuts, strict=True):
        assert_prefix(g, f, n)
    assert_no_request_left(runner, engine)

    # A weight swap (to the same weights) called while 16 paused requests stream: it waits
    # for them to be cut and aborted, then runs; each keeps its exact prefix.
    async def update_while_paused() -> list[Generation]:
        held = [HeldCut(c) for c in cuts]
        task = asyncio.create_task(run(400, held))
        while not all(h.calls for h in held):
            await asyncio.sleep(0.005)
        update = asyncio.create_task(
            engine.load_weights(pack_state_dict(hf_model.state_dict()), engine.version)
        )
        await asyncio.sleep(0.05)
        assert not update.done() and engine._in_flight == 16
        for h in held:
            h.released = True
        await update
        assert task.done()  # the update waited for every paused request
        return await task

    for g, f, n in zip(runner.run(update_while_paused()), full, cuts, strict=True):
        assert_prefix(g, f, n)
    assert_no_request_left(runner, engine)


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


def test_a_later_turn_reads_its_context_from_the_prefix_cache(runner, engine, hf_model):
    """Turn 2's context is turn 1's context + its sampled ids + a tool answer: every whole
    32-token block turn 1 computed is read back, not recomputed, and gives the same logprobs.
    After a weight load the cache is empty (its KV came from other weights)."""
    context = list(range(40, 140))  # 100 tokens: not a prefix of any other test's prompt
    first = gen(runner, engine, context, max_new_tokens=40, seed=3)
    assert first.cached_tokens == 0
    later = context + first.token_ids + list(range(200, 210))
    second = gen(runner, engine, later, max_new_tokens=8, seed=4)
    computed = len(context) + len(first.token_ids) - 1  # the last sampled id has no KV yet
    assert second.cached_tokens == computed // 32 * 32 >= 96
    assert_matches_hf(hf_model, later, second)
    state = {k: v for k, v in hf_model.state_dict().items() if k != "lm_head.weight"}
    runner.run(engine.load_weights(pack_state_dict(state), version=engine.version + 1))
    assert gen(runner, engine, later, max_new_tokens=8, seed=4).cached_tokens == 0


def test_idle_engine_burns_no_cpu(runner, engine):
    """Once a generation is over, the engine's processes (children of this one) sleep: vLLM's
    worker stops spinning for the next step after toolrl.workers.engine_idle's window (vLLM's
    own is 1 s, which held a core through the first second of every update)."""
    import psutil

    from toolrl.workers.engine_idle import IDLE_AFTER_S

    children = [  # vLLM names them VLLM::EngineCore, VLLM::Worker; Ray's are left out
        p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::")
    ]
    assert len(children) >= 2, "the engine runs in processes of its own"

    def cpu_seconds() -> float:
        total = 0.0
        for p in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    gen(runner, engine, PROMPTS[2], max_new_tokens=16, seed=1)
    time.sleep(IDLE_AFTER_S + 0.4)  # margin for a slow host to finish the request
    start = cpu_seconds()
    time.sleep(0.5)
    burnt = cpu_seconds() - start
    assert burnt < 0.05, f"the idle engine's processes used {burnt:.2f} CPU s in 0.5 s"


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
