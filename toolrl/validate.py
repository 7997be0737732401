"""Checks of a composed config that its types cannot express, run before Ray starts.

`validate(cfg)` raises a ConfigError that names the key to change and says why (README,
"Bad configs fail before Ray starts", lists what it prints for common mistakes). Every
`_target_` is imported and its arguments bound; files, budgets, resources and the chat
template are checked; the algorithm's settings in toolrl.algo.checks.

Run `python -m pytest tests/unit/test_config.py tests/unit/test_bad_configs.py`.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from toolrl.config import (
    EMBEDDED_TOOLS,
    Config,
    ConfigError,
    ModelConfig,
    Target,
    TrainGroupConfig,
    build_parser,
    instantiate,
    offered,
    resolve_target,
)


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
    check(t.eval_samples >= 1, "trainer.eval_samples", "must be >= 1")
    for k in t.eval_pass_k:
        check(
            1 <= k <= t.eval_samples,
            "trainer.eval_pass_k",
            f"has k={k}; pass@k needs 1 <= k <= trainer.eval_samples (samples per eval "
            f"prompt), which is {t.eval_samples}: raise trainer.eval_samples or drop that k",
        )
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
    check(cfg.logger.trajectories_per_step >= 0, "logger.trajectories_per_step", "must be >= 0")
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
        cfg.trainer.eval_samples == 1
        or getattr(samplers["rollout.eval_sampler"], "temperature", 1.0) > 0,
        "trainer.eval_samples",
        "is above 1 but rollout.eval_sampler samples greedily (temperature 0): every sample "
        "of a prompt is the same, so pass@k is pass@1; raise its temperature or use 1",
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
