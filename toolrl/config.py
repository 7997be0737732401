"""Typed configuration: the dataclass schemas behind `conf/`, and building `_target_`s.

Hydra composes `conf/config.yaml` on top of `Config` (registered in the ConfigStore as
`toolrl_schema`), so a typo in a key or a wrong type fails at composition. `main` then
turns the result into these dataclasses once, with `to_config`, and calls
`toolrl.validate.validate`, which checks what types cannot: ranges, cross-field rules and
that every `_target_` imports and accepts its arguments. Nothing below `main` sees a
DictConfig.

Print the composed config with `python -m toolrl.main --cfg job`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")

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
    eval_samples: int = 1  # per eval prompt, each with its own fixed seed
    eval_pass_k: list[int] = field(default_factory=lambda: [1])  # eval/pass@k; k <= eval_samples
    eval_pass_reward: float = 1.0  # a sample passes (pass@k) when its reward reaches this
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
    trajectories_per_step: int = 4  # to trajectories.jsonl (evals: eval_...) and wandb; 0: none


@dataclass
class RayConfig:
    address: str | None = None  # None starts a local cluster; "auto" joins one (Slurm)
    num_cpus: int | None = None  # local cluster only; None lets Ray count the cores
    placement_timeout_s: float = 300.0  # how long a worker group may wait for its resources


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


@contextlib.contextmanager
def composing() -> Iterator[Callable[[list[str]], DictConfig]]:
    """`compose(overrides)` of conf/config.yaml as `python -m toolrl.main` composes it, for
    the commands beside it (toolrl.eval, toolrl.serve)."""
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        yield lambda overrides: compose("config", overrides=list(overrides))


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
