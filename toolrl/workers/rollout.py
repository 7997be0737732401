"""The rollout group: Ray actors that each own a vLLM engine and run the agent loop over it.

`RolloutWorker` is a plain class (tests drive it without Ray); the Ray actor is that same
class wrapped by `ray.remote`. Its sampler, rollout protocol, tools, parser and rewards come
from `_target_` entries in `conf/`, so a new tool, parser or protocol needs no code edit here.
`RolloutGroup` is the driver's handle: its router (toolrl.workers.router) hands prompt groups
to the least loaded engine, and it pushes new weights into every engine after an update.
"""

from __future__ import annotations

import functools
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from toolrl.config import Target, build_parser, instantiate, offered, resolve_target
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner
from toolrl.rollout.agent_loop import AgentLoop, Episode, LoopConfig
from toolrl.rollout.chat import ChatBuilder
from toolrl.rollout.engine import EngineConfig, VLLMEngine
from toolrl.rollout.protocols.base import RolloutProtocol
from toolrl.rollout.text import PlainText
from toolrl.rollout.trajectory import Trajectory
from toolrl.workers.placement import in_bundle, release, reserve
from toolrl.workers.router import Router, approx_prompt_tokens, prompt_groups, schedule

log = logging.getLogger(__name__)
MAX_RESTARTS = 2  # a worker dying again at once on the same episodes is not bad luck


@dataclass
class RolloutSpec:
    """Everything one rollout worker needs, already validated by `main`."""

    model_path: str
    engine: EngineConfig
    loop: LoopConfig
    sampler: Target
    eval_sampler: Target
    parser: Target
    tools: dict[str, Target]
    reward: dict[str, Target]  # name -> reward spec (toolrl.rewards.combine.RewardStack)
    reward_workers: int = 1  # processes scoring sync rewards off the rollout event loop
    protocol: Target = field(
        default_factory=lambda: {"_target_": "toolrl.rollout.protocols.chat.ChatToolTurns"}
    )
    # model.chat_template's Jinja text (main reads the file; None: the tokenizer's own) and
    # model.chat_template_kwargs: every chat-template render in the worker uses both.
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


class RolloutWorker:
    def __init__(self, spec: RolloutSpec) -> None:
        from transformers import AutoTokenizer

        self.engine = VLLMEngine(replace(spec.engine, model_path=spec.model_path))
        tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
        if spec.chat_template is not None:  # so whatever renders with it uses the run's template
            tokenizer.chat_template = spec.chat_template
        tools = [instantiate(t) for t in spec.tools.values()]
        schemas = [t.schema() for t in tools]
        kwargs = spec.chat_template_kwargs
        protocol = build_protocol(spec.protocol, spec.parser, tokenizer, schemas, kwargs)
        self.rewards = RewardRunner(RewardStack(spec.reward), max_workers=spec.reward_workers)
        tools_by_name = {t.name: t for t in tools}
        truncate = PlainText(tokenizer).truncate
        self.loop = AgentLoop(
            self.engine, protocol, tools_by_name, self.rewards, spec.loop, truncate
        )
        self.sampler = instantiate(spec.sampler)
        self.eval_sampler = instantiate(spec.eval_sampler)

    async def rollout(self, episodes: list[Episode], evaluate: bool = False) -> list[Trajectory]:
        sampler = self.eval_sampler if evaluate else self.sampler
        return await self.loop.run_many(episodes, sampler)

    async def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        # The trainer calls this only between rollouts, so no turn is in flight.
        await self.engine.load_weights(safetensors_bytes, version)
        self.loop.weight_version = version

    async def load_weights_file(self, path: str, version: int) -> None:
        await self.engine.load_weights_file(path, version)
        self.loop.weight_version = version

    def ready(self) -> bool:
        return True

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def shutdown(self) -> None:
        self.rewards.close()
        self.engine.shutdown()


def build_protocol(
    spec: Target,
    parser_spec: Target,
    tokenizer: Any,
    schemas: list[dict[str, Any]],
    template_kwargs: dict[str, Any] | None = None,
) -> RolloutProtocol:
    """The rollout protocol, given the parts of the run its constructor names: `tokenizer`,
    `tool_schemas`, `chat` (the append-only token builder), `parser` and `reasoning`. Only
    the named ones are built: a base model's tokenizer has no chat template to build on."""
    # built once, on first use: a protocol naming both parts gets the pair of one build
    parser_and_reasoning = functools.cache(lambda: build_parser(parser_spec, schemas))
    parts = {
        "tokenizer": lambda: tokenizer,
        "tool_schemas": lambda: schemas,
        "chat": lambda: ChatBuilder(tokenizer, schemas, template_kwargs=template_kwargs),
        "template_kwargs": lambda: dict(template_kwargs or {}),  # model.chat_template_kwargs
        "parser": lambda: parser_and_reasoning()[0],
        "reasoning": lambda: parser_and_reasoning()[1],
    }
    target = resolve_target("protocol", spec)
    # Called directly, not through Hydra: Hydra would turn the parts (a dataclass reasoning
    # step) into configs, and build a nested `environment` spec once instead of per trajectory.
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    return target(**kwargs, **{name: make() for name, make in offered(target, **parts).items()})


class RolloutGroup:
    """Driver-side handle over `num_workers` rollout actors, with the router in front."""

    def __init__(
        self,
        spec: RolloutSpec,
        num_workers: int,
        num_cpus: float,
        num_gpus: float = 0.0,
        max_inflight: int = 256,
        placement_timeout_s: float | None = None,
    ) -> None:
        self._actor = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(RolloutWorker)
        self._spec = spec
        # one engine per node while nodes last (toolrl.workers.placement)
        self._pg = reserve(
            "rollout", num_workers, num_cpus, num_gpus, "SPREAD", placement_timeout_s
        )
        self.workers = [self._new_worker(i) for i in range(num_workers)]
        self.max_inflight = max_inflight
        self.restarts = 0  # workers started again after theirs died (see _collect)
        self._closing = False
        # The last pushed weights, held until the next push for a restarted worker to load:
        # ("file", path in rank 0's shared memory, version) or ("ref", object ref, version).
        self._last: tuple[str, Any, int] | None = None
        self._last_train: Any = None  # the group whose rank 0 wrote the file
        # what one sample may add: its turns' budgets, within the trajectory's token budget
        max_new = int(spec.sampler.get("max_new_tokens", spec.loop.max_total_tokens))
        self.budget = min(max_new * spec.loop.max_turns, spec.loop.max_total_tokens)
        self._dispatch = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router")
        self.last_rollout_s = 0.0
        ray.get([w.ready.remote() for w in self.workers])
        self.worker_nodes = ray.get([w.node_id.remote() for w in self.workers])  # per engine
        self.node_ids = set(self.worker_nodes)

    def _new_worker(self, engine: int) -> Any:
        return self._actor.options(**in_bundle(self._pg, engine)).remote(self._spec)

    def rollout(self, episodes: list[Episode], evaluate: bool = False) -> list[Trajectory]:
        """Roll out every episode; trajectories in the order of `episodes`."""
        return self.start(episodes, evaluate).result()

    def start(self, episodes: list[Episode], evaluate: bool = False) -> Future:
        """Start rolling out and return at once; `.result()` gives what `rollout` returns."""
        return self._dispatch.submit(self._run, episodes, evaluate)

    def _run(self, episodes: list[Episode], evaluate: bool) -> list[Trajectory]:
        start = time.perf_counter()
        groups = prompt_groups(episodes, self.budget, approx_prompt_tokens)
        router = Router(len(self.workers), self.max_inflight)
        out: list[Trajectory | None] = [None] * len(episodes)

        # call -> (engine, its worker, the episodes it runs)
        sent_to: dict[ray.ObjectRef, tuple[int, Any, list[Episode]]] = {}

        def submit(engine: int, batch: list[Any]) -> ray.ObjectRef:
            eps = [ep for group in batch for ep in group.episodes]
            worker = self.workers[engine]
            ref = worker.rollout.remote(eps, evaluate)
            sent_to[ref] = (engine, worker, eps)
            return ref

        def wait_one(handles: list[ray.ObjectRef]) -> ray.ObjectRef:
            return ray.wait(handles, num_returns=1)[0][0]

        for batch, ref in schedule(groups, router, submit, wait_one):
            positions = [pos for group in batch for pos in group.positions]
            trajs = self._collect(ref, *sent_to.pop(ref), evaluate)
            for pos, traj in zip(positions, trajs, strict=True):
                out[pos] = traj
        self.last_rollout_s = time.perf_counter() - start  # its own duration, overlapped or not
        return out  # type: ignore[return-value]

    def _collect(
        self, ref: ray.ObjectRef, engine: int, worker: Any, episodes: list[Episode], evaluate: bool
    ) -> list[Trajectory]:
        """The trajectories of one call. When its worker's process died, a new worker takes
        its place with the last pushed weights and runs the same episodes again (their seeds
        make them the same samples); up to MAX_RESTARTS times in a row."""
        for attempt in range(MAX_RESTARTS + 1):
            try:
                return ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if self._closing:  # shut down under a rollout that was given up
                    raise
                if attempt == MAX_RESTARTS:
                    raise RuntimeError(
                        f"rollout worker {engine} died {attempt + 1} times in a row running "
                        "the same episodes; see its log under /tmp/ray/session_latest/logs"
                    ) from e
                if self.workers[engine] is worker:  # not replaced yet for another of its calls
                    log.warning("rollout worker %d died (%s); starting another", engine, e)
                    self._restart(engine)
                worker = self.workers[engine]
                ref = worker.rollout.remote(episodes, evaluate)
        raise AssertionError("unreachable")

    def _restart(self, engine: int) -> None:
        ray.kill(self.workers[engine], no_restart=True)
        worker = self._new_worker(engine)  # in the dead one's bundle, once Ray frees it
        ray.get(worker.ready.remote())
        if self._last is not None:  # pushes never overlap a rollout: these are current
            kind, source, version = self._last
            load = worker.load_weights_file if kind == "file" else worker.load_weights
            ray.get(load.remote(source, version))
        self.workers[engine] = worker
        self.restarts += 1

    def load_weights(self, safetensors_bytes: bytes, version: int) -> None:
        self._keep(None, None)  # the previous push's copy goes first: one copy at a time
        ref = ray.put(safetensors_bytes)  # one copy in the object store, read by every worker
        ray.get([w.load_weights.remote(ref, version) for w in self.workers])
        self._keep(("ref", ref, version), None)

    def load_weights_from(self, train: Any, version: int) -> str:
        """Load the policy's current weights (a TrainGroup's) into every engine. When every
        engine shares the node of the policy's rank 0, that rank writes one safetensors file
        to shared memory and the engines read it: no copy through the object store and the
        driver. Otherwise the bytes travel through the object store. Returns which way.
        The copy stays (a file in shared memory, or the object) until the next push, for a
        worker restarted in between; a push never overlaps a rollout."""
        self._keep(None, None)  # the previous push's copy goes first: one copy at a time
        path = train.write_weights() if self.node_ids == {train.node_id} else None
        if path is None:  # another node, or no room in rank 0's shared memory for a copy
            self.load_weights(train.weights(), version)
            return "object_store"
        try:
            ray.get([w.load_weights_file.remote(path, version) for w in self.workers])
        except BaseException:
            train.remove_weights(path)
            raise
        self._keep(("file", path, version), train)
        return "shared_memory"

    def _keep(self, last: tuple[str, Any, int] | None, train: Any) -> None:
        """Hold the weights just pushed (for a restart) and let go of the ones before."""
        old, old_train = self._last, self._last_train
        self._last, self._last_train = last, train
        if old is not None and old[0] == "file":
            old_train.remove_weights(old[1])

    def shutdown(self) -> None:
        # a rollout still in flight (an update failed mid-overlap, a stop) is dropped
        self._closing = True
        self._dispatch.shutdown(wait=False, cancel_futures=True)
        try:
            self._keep(None, None)  # the last weights file, while its group still runs
        except Exception as e:  # the group is gone already: the file dies with the node
            log.warning("could not remove the last weights file: %s", e)
        try:
            ray.get([w.shutdown.remote() for w in self.workers])  # vLLM's processes first
        finally:
            for w in self.workers:
                ray.kill(w)
            release(self._pg)
