"""Entry point: compose the config, type it, validate it, start Ray, build the groups, train.

    python -m toolrl.main                                   # the embedded default, on CPU
    python -m toolrl.main trainer.total_steps=20 rollout.n=8
    python -m toolrl.main --cfg job                         # print the composed config
    python -m toolrl.main --help                            # config groups and options

A bad config fails here, before Ray starts, with the key to change. Outputs (metrics.jsonl,
wandb files, the final Hugging Face checkpoint) go to Hydra's run folder, `runs/<date>/<time>`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from toolrl.config import (
    Config,
    ConfigError,
    build_task,
    instantiate,
    register,
    to_config,
    validate,
)

register()


def resolve_model(path: str, embedded_tool: str = "calculator") -> str:
    """`embedded` builds (or finds cached) the tiny default model, warm-started to call
    `embedded_tool`; anything else is a folder."""
    if path != "embedded":
        return path
    from toolrl.models.tiny import build_embedded_model, embedded_config

    return str(build_embedded_model(embedded_config(embedded_tool)))


def run(cfg: Config) -> dict[str, Any]:
    """Everything after validation: model, Ray, worker groups, the loop. Returns final metrics."""
    import ray
    from transformers import AutoTokenizer

    from toolrl.algo.algorithm import Algorithm
    from toolrl.metrics import MetricsLogger
    from toolrl.rollout.chat import read_chat_template
    from toolrl.trainer import Trainer
    from toolrl.workers.rollout import RolloutGroup

    model_path = resolve_model(cfg.model.path, cfg.model.embedded_tool)
    r, t = cfg.rollout, cfg.trainer
    # Workers keep warnings and errors but not vLLM's and transformers' start-up chatter,
    # so the console shows the progress bar.
    quiet = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
        "TQDM_DISABLE": "1",
    }
    ray.init(
        address=cfg.ray.address,
        num_cpus=None if cfg.ray.address else cfg.ray.num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": quiet},
    )
    try:
        chat_template = read_chat_template(cfg.model.chat_template)
        spec = rollout_spec(cfg, model_path, chat_template)
        rollout = RolloutGroup(
            spec,
            r.num_workers,
            r.num_cpus_per_worker,
            r.num_gpus_per_worker,
            r.max_inflight_per_worker,
        )
        algorithm = Algorithm(cfg.algorithm, r.max_total_tokens)
        train, critic = train_groups(cfg, algorithm, model_path)
        logger = MetricsLogger(
            cfg.run_dir,
            t.total_steps,
            cfg.logger.wandb_mode,
            cfg.logger.project,
            cfg.logger.run_name,
            config=dataclasses.asdict(cfg),
            progress_bar=cfg.logger.progress_bar,
        )
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        trainer = Trainer(
            cfg,
            task=build_task(
                cfg.task,
                count_tokens=token_counter(
                    tokenizer, chat_template, cfg.model.chat_template_kwargs
                ),
                tool_names=list(cfg.tools),
            ),
            algorithm=algorithm,
            rollout=rollout,
            train=train,
            logger=logger,
            pad_id=_pad_id(tokenizer),
            model_path=model_path,
            critic=critic,
        )
        try:
            return trainer.fit()
        finally:
            logger.close()
            rollout.shutdown()
            train.shutdown()
            if critic is not None and critic is not train:
                critic.shutdown()
    finally:
        ray.shutdown()


def train_groups(cfg: Config, algorithm: Any, model_path: str) -> tuple[Any, Any]:
    """The policy's group (with the reference when the algorithm needs one) and the group
    holding the critic: the same group when `algorithm.critic.colocate`, None without one."""
    from toolrl.workers.train_group import CriticRole, PolicyRole, TrainGroup

    c, t = cfg.algorithm.critic, cfg.trainer
    temperature = getattr(instantiate(cfg.rollout.sampler), "temperature", 1.0)
    policy = PolicyRole(t.optim, algorithm.needs_reference, temperature)
    critic = None
    if algorithm.needs_critic:
        critic = CriticRole(c.path or model_path, c.path is None, c.optim, c.value_clip)
    if critic is not None and c.colocate:
        group = TrainGroup(t.train_group, model_path, policy, critic)
        return group, group
    own = TrainGroup(c.group, model_path, critic=critic) if critic is not None else None
    return TrainGroup(t.train_group, model_path, policy), own


def rollout_spec(cfg: Config, model_path: str, chat_template: str | None) -> Any:
    """What every rollout worker builds itself from (toolrl.workers.rollout.RolloutSpec)."""
    from toolrl.rollout.agent_loop import LoopConfig
    from toolrl.workers.rollout import RolloutSpec

    r = cfg.rollout
    return RolloutSpec(
        model_path=model_path,
        engine=r.engine,
        # by name: every LoopConfig field is a rollout.* key of the same name
        loop=LoopConfig(**{f.name: getattr(r, f.name) for f in dataclasses.fields(LoopConfig)}),
        sampler=r.sampler,
        eval_sampler=r.eval_sampler,
        parser=cfg.parser,
        tools=cfg.tools,
        reward=cfg.reward,
        reward_workers=r.reward_workers,
        protocol=cfg.protocol,
        chat_template=chat_template,
        chat_template_kwargs=cfg.model.chat_template_kwargs,
    )


def token_counter(
    tokenizer: Any, chat_template: str | None = None, template_kwargs: dict[str, Any] | None = None
) -> Any:
    """The length of a prompt as the chat template renders it for generation, without the
    tools' schemas (a row's own tools are known only per row, in the rollout), with the run's
    template control: `chat_template` (model.chat_template's text) and `template_kwargs`."""
    from toolrl.rollout.chat import render_chat

    def count_tokens(messages: list[dict[str, Any]]) -> int:
        text = render_chat(tokenizer, messages, True, None, chat_template, template_kwargs)
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count_tokens


def _pad_id(tokenizer: Any) -> int:
    # Many tokenizers (Llama 3) have no pad token; padded positions are masked out anyway.
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    try:
        cfg = to_config(dcfg)
        validate(cfg)
    except (ConfigError, OmegaConfBaseException) as e:
        print(f"toolrl: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    final = run(cfg)
    summary = {k: v for k, v in final.items() if k.startswith("eval/") or k == "checkpoint"}
    print(json.dumps({"run_dir": cfg.run_dir, **summary}, indent=2))


if __name__ == "__main__":
    main()
