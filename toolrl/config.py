"""Typed configuration: the dataclass schemas behind `conf/`, and validation before Ray starts.

Hydra composes `conf/config.yaml` on top of `Config` (registered in the ConfigStore as
`toolrl_schema`), so a typo in a key or a wrong type fails at composition. `main` then
turns the result into these dataclasses once, with `to_config`, and calls `validate`,
which checks what types cannot: ranges, cross-field rules and that every `_target_`
imports and accepts its arguments. Nothing below `main` sees a DictConfig.

Print the composed config with `python -m toolrl.main --cfg job`.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib
import inspect
import os
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

Target = dict[str, Any]  # a YAML mapping with a `_target_` key plus constructor arguments


class ConfigError(ValueError):
    """A config that cannot run; the message says which key and what to change."""


# The styles of toolrl.models.warmstart.TOOL_STYLES, each with the tool its traces call.
EMBEDDED_TOOLS = {"calculator": "calculator", "python": "python", "calculator_inline": "calculator"}


# The small typed configs of the components live here, so that importing the config (and
# validating one) needs no torch, vLLM or Ray; each component module re-exports its own.


@dataclass
class EngineConfig:
    """Settings of one vLLM engine (one rollout worker)."""

    model_path: str = ""
    dtype: str = "float32"  # bfloat16 on GPU
    max_model_len: int = 1024
    kv_cache_gib: int = 1  # CPU only: KV cache size (what VLLM_CPU_KVCACHE_SPACE sets)
    gpu_memory_utilization: float = 0.5  # GPU only
    enforce_eager: bool = True
    seed: int = 0
    # KV block size in tokens (None: vLLM's default, 128 on CPU). The prefix cache reuses
    # whole blocks only, so later turns of short trajectories hit it only with small blocks.
    block_size: int | None = None
    # "processed_logprobs": log p(token | context) under the distribution sampled from, i.e.
    # log_softmax(logits / temperature) with top_p 1, what the trainer scores. Measured on
    # vLLM 0.32 CPU: bitwise equal to "raw_logprobs" (the model's own) at temperature 1.
    logprobs_mode: str = "processed_logprobs"
    # CPU only. vLLM's default "auto" pins the worker's OpenMP threads to fixed cores
    # (all but one, kept for its scheduler process): on 2 cores that is core 0, and every
    # engine on the node computes the same list, so two engines would share one core.
    # Unpinned, the OS moves the worker to whichever core training leaves free. One
    # thread: with 2 threads on 2 cores shared with 2 busy torch processes throughput
    # fell ~4x (OpenMP barriers wait for a descheduled thread). See `_cpu_thread_env`.
    cpu_threads_bind: str = "nobind"  # VLLM_CPU_OMP_THREADS_BIND: "nobind", "auto", "0-3"
    cpu_omp_threads: int = 1  # OMP_NUM_THREADS of the model worker when "nobind"


@dataclass
class MismatchConfig:
    """Correction for the rollout engine sampling from a slightly different policy than the
    trainer computes (toolrl.algo.losses.mismatch_weights says what each mode does)."""

    mode: str = "none"  # none | tis | icepop | seq-mask-tis
    low: float = 0.5  # icepop, seq-mask-tis: tokens / sequences with rho below this are masked
    high: float = 2.0  # tis caps rho here; icepop, seq-mask-tis mask above it


@dataclass
class LossConfig:
    """The policy loss (toolrl.algo.losses.policy_loss)."""

    clip_low: float = 0.2
    clip_high: float = 0.28  # asymmetric clip (DAPO); = clip_low for vanilla PPO clip
    kl_coef: float = 0.001  # KL to the reference as a loss term; 0 disables
    kl_estimator: str = "k3"  # k1 | k2 | k3
    entropy_coef: float = 0.0  # > 0 adds an entropy bonus
    # token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm
    aggregation: str = "token-mean"
    norm_tokens: int | None = None  # seq-mean-token-sum-norm's constant (Dr. GRPO)
    mismatch: MismatchConfig = field(default_factory=MismatchConfig)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    warmup_steps: int = 0  # linear warm-up over this many updates


@dataclass
class TrainGroupConfig:
    world_size: int = 2
    num_cpus_per_worker: float = 0.5
    num_gpus_per_worker: float = 0.0  # 1 on GPU machines; the ranks then use NCCL
    torch_threads: int = 1
    micro_batch_size: int = 32
    # Group rows into micro-batches of at most this many (padded) tokens instead of
    # micro_batch_size rows: long multi-turn rows go few at a time, short ones many.
    micro_batch_tokens: int | None = None


@dataclass
class ModelConfig:
    # "embedded" builds (once, then cached) the tiny default model; otherwise a local HF folder.
    path: str = "embedded"
    # The tool the embedded model is warm-started to call (one of EMBEDDED_TOOLS); it must be
    # the tool the run configures. Ignored when `path` is a folder.
    embedded_tool: str = "calculator"
    # A file whose Jinja text replaces the tokenizer's chat template in every render of the
    # run (prompts, tool and user turns, prompt-length counts); None: the tokenizer's own.
    chat_template: str | None = None
    # Passed to every chat template render, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    num_workers: int = 1  # Ray actors, each owning one engine
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0  # 1 on GPU machines, so the engine sees a device
    n: int = 8  # samples per prompt (the GRPO group size)
    max_turns: int = 3  # assistant turns per trajectory
    max_total_tokens: int = 512  # prompt + everything appended; a trajectory stops when full
    tool_timeout_s: float = 10.0  # per call, enforced by the loop
    max_tool_output_tokens: int = 256  # a tool answer is cut to this many tokens, with a marker
    max_tool_calls: int | None = None  # per trajectory; later calls get an error answer
    reward_workers: int = 1  # processes per rollout worker scoring sync rewards
    # trajectories one engine works on at once; the router holds back further prompt groups
    max_inflight_per_worker: int = 256
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampler: Target = field(
        default_factory=lambda: {"_target_": "toolrl.rollout.sampler.Sampler", "temperature": 1.0}
    )
    eval_sampler: Target = field(
        default_factory=lambda: {"_target_": "toolrl.rollout.sampler.Sampler", "temperature": 1.0}
    )


@dataclass
class CriticConfig:
    """The value model PPO learns (used only when the estimator needs a critic)."""

    path: str | None = None  # None: the policy's initial weights with a new value head
    optim: OptimConfig = field(default_factory=OptimConfig)
    value_clip: float = 0.2  # a value moves at most this much per update
    # True: the critic lives in the policy's processes (a separate class, same ranks);
    # False: its own FSDP2 group of Ray actors, sized by `group`.
    colocate: bool = True
    group: TrainGroupConfig = field(default_factory=TrainGroupConfig)


@dataclass
class AlgorithmConfig:
    """What `toolrl.algo.algorithm.Algorithm` is built from; conf/algorithm/*.yaml set it."""

    # The advantage estimator (toolrl/algo/advantages.py): GroupNorm, RLOO, ReinforcePP, GAE.
    advantages: Target = field(
        default_factory=lambda: {"_target_": "toolrl.algo.advantages.GroupNorm"}
    )
    loss: LossConfig = field(default_factory=LossConfig)
    mini_batches: int = 2  # optimizer steps per rollout batch
    # recompute: the trainer scores the batch before updating (pi_old, exact);
    # rollout: the engine's logprobs are pi_old, saving that pass.
    old_logprobs: str = "recompute"
    kl_in_reward: float = 0.0  # > 0: -coef * (log pi_old - log ref) joins each token's reward
    # DAPO's dynamic sampling: drop groups whose samples all scored the same (no signal)
    # and roll out more prompts, up to max_sampling_rounds rollouts, to fill the batch.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    # DAPO's soft overlong penalty: responses within `overlong_buffer` tokens of the budget
    # lose up to `overlong_penalty` reward, linearly. 0 disables.
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    critic: CriticConfig = field(default_factory=CriticConfig)


@dataclass
class TrainerConfig:
    total_steps: int = 20
    prompts_per_step: int = 16
    eval_every: int = 5  # steps; 0 evaluates only at the start and the end
    eval_prompts: int = 64
    seed: int = 0
    train_group: TrainGroupConfig = field(default_factory=TrainGroupConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    save_checkpoint: bool = True  # the Hugging Face export of the final policy (checkpoint/)
    # Checkpoints to continue from (toolrl/checkpoint.py): every save_every steps, at the end
    # and on a stop signal (0: none); the last keep_last are kept.
    save_every: int = 10
    keep_last: int = 2
    # auto: continue from the run folder's latest checkpoint, if any; never; or a PATH.
    resume: str = "auto"
    # 0: roll out, then update (on-policy). 1: the engines roll out batch k+1 with the weights
    # before update k while it runs, so each batch is one update old (needs a mismatch mode).
    max_staleness: int = 0


@dataclass
class LoggerConfig:
    wandb_mode: str = "offline"  # offline | online | disabled
    project: str = "toolrl"
    run_name: str | None = None
    progress_bar: bool = True


@dataclass
class RayConfig:
    address: str | None = None  # None starts a local cluster; "auto" joins one (Slurm)
    num_cpus: int | None = None  # local cluster only; None lets Ray count the cores


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # How a trajectory advances (toolrl/rollout/protocols/); conf/protocol/chat.yaml's choice.
    protocol: Target = field(
        default_factory=lambda: {"_target_": "toolrl.rollout.protocols.chat.ChatToolTurns"}
    )
    # The call parser; its `reasoning` entry is the reasoning step run before it (parser_parts).
    # The same as conf/parser/hermes.yaml composes, for a Config built in Python.
    parser: Target = field(
        default_factory=lambda: {
            "_target_": "toolrl.rollout.parsers.hermes.HermesParser",
            "reasoning": {"_target_": "toolrl.rollout.parsers.reasoning.TagReasoning"},
        }
    )
    tools: dict[str, Target] = field(default_factory=dict)
    task: Target = field(
        default_factory=lambda: {"_target_": "toolrl.data.arithmetic.ArithmeticTask"}
    )
    # name -> reward spec; the trajectory's reward is their weighted sum (RewardStack). Empty
    # here: conf/reward/ picks (a dict default would merge into every choice of the group).
    reward: dict[str, Target] = field(default_factory=dict)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    run_dir: str = "."  # set by main to Hydra's output folder


def register() -> None:
    ConfigStore.instance().store(name="toolrl_schema", node=Config)


def _reject_unknown_keys(node: Any, where: str) -> None:
    # `+trainer.totl_steps=3` adds a key the schema lacks; to_object would silently drop it.
    schema = OmegaConf.get_type(node) if isinstance(node, DictConfig) else None
    if schema is None or not dataclasses.is_dataclass(schema):
        return
    known = {f.name for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in known:
            raise ConfigError(
                f"{where}{key}: unknown key; {schema.__name__} has {', '.join(sorted(known))}"
            )
        _reject_unknown_keys(node._get_node(key), f"{where}{key}.")


def to_config(cfg: DictConfig) -> Config:
    """The one conversion from Hydra's DictConfig to typed dataclasses."""
    _reject_unknown_keys(cfg, "")
    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, Config):
        raise TypeError("config.yaml must list `toolrl_schema` first in its defaults")
    return obj


def resolve_target(where: str, spec: Target) -> Any:
    """Import a `_target_` and check its arguments bind, so mistakes surface before Ray starts."""
    if "_target_" not in spec:
        raise ConfigError(f"{where}: needs a `_target_` (a dotted path to a class or function)")
    path = str(spec["_target_"])
    module_name, _, attr = path.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{where}._target_={path!r} cannot be imported: {e}") from e
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    if kwargs or inspect.isclass(obj):
        try:
            inspect.signature(obj).bind_partial(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{where}: {path} does not accept these arguments: {e}") from e
    return obj


def instantiate(spec: Target, **extra: Any) -> Any:
    """Build an object from a `_target_` mapping (nested targets and `_partial_` work as in Hydra)."""
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(spec, **extra, _convert_="all")


NO_REASONING: Target = {"_target_": "toolrl.rollout.parsers.reasoning.NoReasoning"}


def parser_parts(spec: Target) -> tuple[Target, Target]:
    """The call parser's spec and its reasoning step's: `parser.reasoning` is reserved for the
    step (none if absent), every other key goes to the parser."""
    parser = {k: v for k, v in spec.items() if k != "reasoning"}
    return parser, spec.get("reasoning") or NO_REASONING


def offered(target: Any, **run_values: Any) -> dict[str, Any]:
    """The values the run offers a swap point (the tools' schemas, a token counter, the tool
    names) that its constructor names as parameters; a target takes only what it asks for."""
    params = inspect.signature(target).parameters
    return {k: v for k, v in run_values.items() if k in params}


def build_parser(spec: Target, tool_schemas: list[dict[str, Any]]) -> tuple[Any, Any]:
    """The call parser and its reasoning step from `parser` in the config.

    The contract, once: a parser is any callable `text -> ParsedTurn`; it receives the turn's
    text after the reasoning step, and the tools' schemas as `tool_schemas=` when its
    constructor names that parameter (qwen3_coder types values by them). `validate` builds
    it the same way, so what fails here fails before Ray starts."""
    parser_spec, reasoning_spec = parser_parts(spec)
    extra = offered(resolve_target("parser", parser_spec), tool_schemas=tool_schemas)
    resolve_target("parser.reasoning", reasoning_spec)
    return build_target("parser", parser_spec, **extra), build_target(
        "parser.reasoning", reasoning_spec
    )


def build_task(spec: Target, **run_values: Any) -> Any:
    """The task, given the run's values it names (see `offered`): the dataset task takes
    `count_tokens` (to drop prompts over budget) and `tool_names` (to check each row's tools)."""
    return build_target("task", spec, **offered(resolve_target("task", spec), **run_values))


def build_target(key: str, spec: Target, **extra: Any) -> Any:
    try:
        return instantiate(spec, **extra)
    except Exception as e:  # Hydra wraps the constructor's own ValueError
        raise ConfigError(f"{key}: {e}") from e


def check(ok: bool, key: str, msg: str) -> None:
    """Raise a ConfigError naming `key` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Checks that types cannot express. Raises ConfigError naming the key to change."""
    r, t, a = cfg.rollout, cfg.trainer, cfg.algorithm
    check(r.n >= 1, "rollout.n", f"is {r.n}; use >= 1")
    check(r.num_workers >= 1, "rollout.num_workers", "must be >= 1")
    check(r.max_turns >= 1, "rollout.max_turns", "must be >= 1")
    check(r.tool_timeout_s > 0, "rollout.tool_timeout_s", "must be > 0")
    check(r.max_tool_output_tokens >= 1, "rollout.max_tool_output_tokens", "must be >= 1")
    check(
        r.max_tool_calls is None or r.max_tool_calls >= 0,
        "rollout.max_tool_calls",
        "must be >= 0, or null for no limit",
    )
    check(
        r.max_total_tokens <= r.engine.max_model_len,
        "rollout.max_total_tokens",
        f"is {r.max_total_tokens} but rollout.engine.max_model_len is {r.engine.max_model_len}; "
        "raise the latter or lower the former",
    )
    check(t.total_steps >= 0, "trainer.total_steps", "must be >= 0")
    check(t.prompts_per_step >= 1, "trainer.prompts_per_step", "must be >= 1")
    check(t.eval_every >= 0, "trainer.eval_every", "must be >= 0 (0: only at start and end)")
    check(t.train_group.world_size >= 1, "trainer.train_group.world_size", "must be >= 1")
    check(t.save_every >= 0, "trainer.save_every", "must be >= 0 (0: no checkpoints)")
    check(t.keep_last >= 1, "trainer.keep_last", "must be >= 1")
    check(t.resume != "", "trainer.resume", "use auto, never or a checkpoint path")
    batch = t.prompts_per_step * r.n
    check(
        a.mini_batches >= 1 and batch // a.mini_batches >= t.train_group.world_size,
        "algorithm.mini_batches",
        f"{a.mini_batches} mini-batches of a {batch}-sample batch leave fewer samples than the "
        f"{t.train_group.world_size} training ranks; lower it or raise trainer.prompts_per_step",
    )
    check(t.optim.lr > 0, "trainer.optim.lr", "must be > 0")
    _check_staleness(cfg)
    check_micro_batches(t.train_group, "trainer.train_group")
    _check_samplers(cfg)
    from toolrl.algo.checks import check_algorithm  # no torch: the checks import no tensors

    needs_critic = check_algorithm(cfg)
    _check_resources(cfg, needs_critic)
    check(
        cfg.logger.wandb_mode in ("offline", "online", "disabled"),
        "logger.wandb_mode",
        f"is {cfg.logger.wandb_mode!r}; use offline, online or disabled",
    )
    path = cfg.model.path
    check(
        path == "embedded" or os.path.isfile(os.path.join(path, "config.json")),
        "model.path",
        f"{path!r} is not a Hugging Face model folder (no config.json); use `embedded` or a local folder",
    )
    _check_embedded_tool(cfg)
    _check_chat_template(cfg.model)
    check(bool(cfg.tools), "tools", "no tools configured; add one, e.g. tools=calculator")
    for name, spec in cfg.tools.items():
        _check_tool(f"tools.{name}", spec)
    _check_parser(cfg.parser)
    _check_protocol(cfg.protocol, tool_names=list(cfg.tools))
    _check_task(cfg.task, tool_names=list(cfg.tools))
    _check_reward(cfg.reward)
    check(r.reward_workers >= 1, "rollout.reward_workers", "must be >= 1")
    check(r.max_inflight_per_worker >= 1, "rollout.max_inflight_per_worker", "must be >= 1")


def _check_staleness(cfg: Config) -> None:
    t, a = cfg.trainer, cfg.algorithm
    check(
        t.max_staleness in (0, 1),
        "trainer.max_staleness",
        f"is {t.max_staleness}; use 0 (synchronous) or 1 (roll out the next batch during the update)",
    )
    if t.max_staleness == 0:
        return
    check(
        a.loss.mismatch.mode != "none",
        "algorithm.loss.mismatch.mode",
        "is none, but trainer.max_staleness=1 samples with weights one update old; set it to "
        "tis, icepop or seq-mask-tis so the loss corrects for that (or max_staleness=0)",
    )
    check(
        not a.dynamic_sampling,
        "algorithm.dynamic_sampling",
        "refill rounds wait on their own rollouts and cannot overlap the update; "
        "use trainer.max_staleness=0 with it",
    )


def check_micro_batches(group: TrainGroupConfig, where: str) -> None:
    check(group.micro_batch_size >= 1, f"{where}.micro_batch_size", "must be >= 1")
    tokens = group.micro_batch_tokens
    check(
        tokens is None or tokens >= 1,
        f"{where}.micro_batch_tokens",
        "must be >= 1 (a token budget per micro-batch), or null for micro_batch_size rows",
    )


# apply_chat_template's own parameters: a template kwarg of one of these names would clash.
_RENDER_ARGS = ("conversation", "tools", "documents", "chat_template", "add_generation_prompt")
_RENDER_ARGS += ("continue_final_message", "tokenize", "return_dict", "tokenizer_kwargs")


def _check_chat_template(model: ModelConfig) -> None:
    path = model.chat_template
    check(
        path is None or os.path.isfile(path),
        "model.chat_template",
        f"{path!r} is not a file; give a Jinja chat template file, or null for the tokenizer's",
    )
    clash = sorted(set(model.chat_template_kwargs) & set(_RENDER_ARGS))
    check(
        not clash,
        "model.chat_template_kwargs",
        f"{', '.join(clash)} are set by toolrl itself; pass only the template's own variables",
    )


def _check_embedded_tool(cfg: Config) -> None:
    tool = cfg.model.embedded_tool
    check(
        tool in EMBEDDED_TOOLS,
        "model.embedded_tool",
        f"is {tool!r}; the embedded model can be warm-started to call "
        f"{' or '.join(EMBEDDED_TOOLS)} (pick the tool the run configures)",
    )
    # The embedded model calls only the tool it was warm-started on: with the other one
    # configured instead, no call would succeed and RL would have nothing to reinforce.
    calls = EMBEDDED_TOOLS[tool]
    other = [k for k in cfg.tools if k in EMBEDDED_TOOLS.values() and k != calls]
    if cfg.model.path == "embedded" and other and calls not in cfg.tools:
        raise ConfigError(
            f"model.embedded_tool: is {tool!r} but tools configures {other[0]!r} instead; the "
            f"embedded model calls the tool it was warm-started on: set "
            f"model.embedded_tool={other[0]}"
        )


def _check_tool(where: str, spec: Target) -> None:
    """Import the tool and any tools nested in it; a tool class may also check its arguments
    against this machine in a static `preflight(**kwargs)` (the python tool: is bwrap here?)."""
    obj = resolve_target(where, spec)
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    limit = kwargs.get("max_concurrency")
    check(
        limit is None or (isinstance(limit, int) and limit >= 1),
        f"{where}.max_concurrency",
        f"is {limit!r}; use calls at once per rollout worker (>= 1), or null for no limit",
    )
    for key, value in kwargs.items():
        nested = value.values() if isinstance(value, dict) and "_target_" not in value else [value]
        for i, item in enumerate(nested):
            if isinstance(item, dict) and "_target_" in item:
                _check_tool(f"{where}.{key}[{i}]", item)
    _preflight(where, obj, kwargs)


def _check_task(spec: Target, tool_names: list[str]) -> None:
    """Import the task; one with a `preflight(**kwargs)` (the dataset task) reads its files
    now, so a bad file, column, row or tool name fails before Ray starts, naming them."""
    obj = resolve_target("task", spec)
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    _preflight("task", obj, {**kwargs, **offered(obj, tool_names=tool_names)})


def _check_protocol(spec: Target, tool_names: list[str]) -> None:
    """Import the protocol; one with a `preflight` (inline tags) checks its settings, and the
    tools they name, before Ray starts."""
    obj = resolve_target("protocol", spec)
    kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
    _preflight("protocol", obj, kwargs, tool_names=tool_names)


def _preflight(where: str, obj: Any, kwargs: dict[str, Any], **run_values: Any) -> None:
    """Call the target's static `preflight(**kwargs)`, if it has one, as a ConfigError; it
    also gets the run's values it names (`offered`)."""
    preflight = getattr(obj, "preflight", None)
    if callable(preflight):
        try:
            preflight(**kwargs, **offered(preflight, **run_values))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {e}") from e


def _check_reward(specs: dict[str, Target]) -> None:
    """Build the reward stack (imports every target, binds its arguments; starts no process);
    a reward class may check this machine in a static `preflight` (code tests: is bwrap here?)."""
    from toolrl.rewards.combine import OWN_KEYS, RewardStack

    try:
        RewardStack(specs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"reward: {e}") from e
    for name, spec in specs.items():
        spec = {k: v for k, v in spec.items() if k not in OWN_KEYS}
        kwargs = {k: v for k, v in spec.items() if not k.startswith("_")}
        _preflight(f"reward.{name}", resolve_target(f"reward.{name}", spec), kwargs)


def _check_parser(spec: Target) -> None:
    """Build the parser and its reasoning step once (without the tools' schemas, which need
    the tools built), so a bad argument fails before Ray."""
    build_parser(spec, [])


def _check_samplers(cfg: Config) -> None:
    samplers = {}
    for key, spec in (
        ("rollout.sampler", cfg.rollout.sampler),
        ("rollout.eval_sampler", cfg.rollout.eval_sampler),
    ):
        resolve_target(key, spec)
        samplers[key] = sampler = instantiate(spec)
        temperature, top_p = getattr(sampler, "temperature", 1.0), getattr(sampler, "top_p", 1.0)
        check(temperature >= 0, f"{key}.temperature", "must be >= 0")
        check(0 < top_p <= 1, f"{key}.top_p", "must be in (0, 1]")
        check(getattr(sampler, "max_new_tokens", 1) >= 1, f"{key}.max_new_tokens", "must be >= 1")
    train = samplers["rollout.sampler"]
    # The trainer scores logits / temperature, the distribution the engine sampled from; a
    # top-p cut would need the same truncation in the loss.
    temperature = getattr(train, "temperature", 1.0)
    check(
        temperature > 0 and getattr(train, "top_p", 1.0) == 1.0,
        "rollout.sampler",
        "training samples need temperature > 0 and top_p 1.0 (the loss scores the full "
        "tempered distribution); change top_p only in rollout.eval_sampler",
    )
    check(
        temperature == 1.0 or cfg.rollout.engine.logprobs_mode == "processed_logprobs",
        "rollout.engine.logprobs_mode",
        "is raw_logprobs (untempered) but rollout.sampler.temperature is not 1; the ratio "
        "needs the tempered logprobs: set processed_logprobs",
    )


def _check_resources(cfg: Config, needs_critic: bool = False) -> None:
    """On a local cluster, Ray would leave actors pending forever if they ask for more CPUs or
    GPUs than the machine has."""
    if cfg.ray.address:
        return
    have = cfg.ray.num_cpus or os.cpu_count() or 1
    need = _asked(cfg, needs_critic, "num_cpus_per_worker")
    check(
        need <= have,
        "rollout.num_cpus_per_worker",
        f"the actors ask for {need:g} CPUs but this machine has {have}; lower "
        "rollout.num_cpus_per_worker or trainer.train_group.num_cpus_per_worker (they may be "
        "fractions) or the number of workers",
    )
    gpus = _asked(cfg, needs_critic, "num_gpus_per_worker")
    if gpus > 0:
        have_gpus = local_gpu_count()
        check(
            gpus <= have_gpus,
            "rollout.num_gpus_per_worker",
            f"the actors ask for {gpus:g} GPUs but this machine has {have_gpus}; set "
            "rollout.num_gpus_per_worker and trainer.train_group.num_gpus_per_worker to 0 on a "
            "CPU machine, or lower the number of workers",
        )


def _asked(cfg: Config, needs_critic: bool, per_worker: str) -> float:
    """What all actors ask Ray for of one resource (`per_worker` names its config field)."""
    r, g, c = cfg.rollout, cfg.trainer.train_group, cfg.algorithm.critic
    total = r.num_workers * getattr(r, per_worker) + g.world_size * getattr(g, per_worker)
    if needs_critic and not c.colocate:
        total += c.group.world_size * getattr(c.group, per_worker)
    return total


def local_gpu_count() -> int:
    """NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES applies), without importing
    torch: the driver's device files, as Ray counts them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    return len(glob.glob("/proc/driver/nvidia/gpus/*"))
