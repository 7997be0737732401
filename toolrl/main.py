"""Entry point: compose the config, type it, validate it, start Ray, build the groups, train.

    python -m toolrl.main                                   # the embedded default, on CPU
    python -m toolrl.main trainer.total_steps=20 rollout.n=8
    python -m toolrl.main --cfg job                         # print the composed config
    python -m toolrl.main --help                            # config groups and options

A bad config fails here, before Ray starts, with the key to change. Outputs (metrics.jsonl,
wandb files, checkpoints/ to resume from, the final Hugging Face export checkpoint/) go to
Hydra's run folder, `runs/<date>/<time>`. Running again into the same folder continues from its
latest checkpoint (trainer.resume=auto):

    python -m toolrl.main hydra.run.dir=runs/exp1        # SIGTERM/SIGINT/SIGUSR1: saves, exits 143/130/138
    python -m toolrl.main hydra.run.dir=runs/exp1        # continues where it stopped
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
from pathlib import Path
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
    resolve_target,
    to_config,
)
from toolrl.validate import validate

register()


def resolve_model(path: str, embedded_tool: str = "calculator") -> str:
    """`embedded` builds (or finds cached) the tiny default model, warm-started to call
    `embedded_tool`; anything else is a folder."""
    if path != "embedded":
        return path
    from toolrl.models.tiny import build_embedded_model, embedded_config

    return str(build_embedded_model(embedded_config(embedded_tool)))


@dataclasses.dataclass
class Prepared:
    """What a run needs before Ray starts, each part already checked."""

    model_path: str
    tokenizer: Any
    chat_template: str | None  # model.chat_template's text; None: the tokenizer's own
    task: Any
    resume: Any  # the checkpoint folder to continue from, or None
    saved: dict[str, Any]  # its trainer state ({"step": 0, ...} for a fresh start)


def prepare(cfg: Config) -> Prepared:
    """The checks that need the model, the data or the run folder, before Ray starts: the
    checkpoint to resume (and the keys that must not change), the model folder, the parser
    against the template's tool-call format, the task, and its prompts against the budget."""
    from toolrl import checkpoint

    resume = checkpoint.resolve(cfg.trainer.resume, cfg.run_dir)
    saved = checkpoint.check_resumable(resume, cfg) if resume else {"step": 0, "wandb_id": None}
    if resume is None:  # a fresh start: an earlier run's checkpoints here must not mix in
        moved = checkpoint.set_aside(cfg.run_dir)
        if moved:
            print(f"toolrl: a fresh start; the checkpoints already here moved to {moved}")
    else:
        print(f"toolrl: resuming after step {saved['step']} from {resume}", file=sys.stderr)
        if checkpoint.checkpoints_dir(cfg.run_dir).resolve() not in resume.resolve().parents:
            saved = {**saved, "wandb_id": None}  # another run's checkpoint: its own wandb run
    model_path, tokenizer, chat_template, task = load_model_and_task(cfg)
    return Prepared(model_path, tokenizer, chat_template, task, resume, saved)


def load_model_and_task(cfg: Config) -> tuple[str, Any, str | None, Any]:
    """(model folder, tokenizer, model.chat_template's text, task), checked: the parser against
    the template's tool-call format, the prompts against the budget. Training and
    `toolrl.eval` both start from these."""
    from transformers import AutoTokenizer

    from toolrl.rollout.chat import read_chat_template

    model_path = resolve_model(cfg.model.path, cfg.model.embedded_tool)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    chat_template = read_chat_template(cfg.model.chat_template)
    check_parser_reads_template(cfg, tokenizer, chat_template)
    count = token_counter(tokenizer, chat_template, cfg.model.chat_template_kwargs)
    task = build_task(cfg.task, count_tokens=count, tool_names=list(cfg.tools))
    check_prompts_fit(cfg, task, tokenizer, chat_template)
    return model_path, tokenizer, chat_template, task


def check_parser_reads_template(cfg: Config, tokenizer: Any, chat_template: str | None) -> None:
    """With chat tool turns, the parser must read the format the template writes calls in."""
    from toolrl.check_template import template_parser

    if not _chat_tool_turns(cfg):
        return
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if not tokenizer.chat_template:
        return
    found = template_parser(tokenizer, dict(cfg.model.chat_template_kwargs))
    parser = resolve_target("parser", {"_target_": cfg.parser["_target_"]})  # the class only
    if found is None or not isinstance(parser, type) or issubclass(parser, found[1]):
        return
    shown = cfg.model.path if cfg.model.path != "embedded" else "$(python -m toolrl.models.tiny)"
    raise ConfigError(
        f"parser: the chat template writes tool calls in the {found[0]} format, which "
        f"{cfg.parser['_target_']} does not read; use parser={found[0]} (python -m "
        f"toolrl.check_template {shown} shows the template's format)"
    )


def _chat_tool_turns(cfg: Config) -> bool:
    """Whether the protocol runs tools as chat-template tool turns (schemas in the prompt)."""
    from toolrl.rollout.protocols.chat import ChatToolTurns

    protocol = resolve_target("protocol", {"_target_": cfg.protocol["_target_"]})
    return isinstance(protocol, type) and issubclass(protocol, ChatToolTurns)


PROMPTS_CHECKED = 2000  # a dataset's first prompts; longer ones are task.max_prompt_tokens's job


def check_prompts_fit(cfg: Config, task: Any, tokenizer: Any, chat_template: str | None) -> None:
    """Every (checked) prompt, rendered with the schemas of the tools it offers (with chat
    tool turns), must leave room to sample within rollout.max_total_tokens."""
    count = token_counter(tokenizer, chat_template, cfg.model.chat_template_kwargs)
    schemas = {}
    if _chat_tool_turns(cfg):
        schemas = {name: instantiate(spec).schema() for name, spec in cfg.tools.items()}
    prompts = task.prompts("train")[:PROMPTS_CHECKED]
    prompts += task.prompts("eval")[: cfg.trainer.eval_prompts]
    longest = 0
    for p in prompts:
        tools = [schemas[n] for n in (schemas if p.tools is None else p.tools) if n in schemas]
        longest = max(longest, count(p.messages, tools or None))
    budget = cfg.rollout.max_total_tokens
    if longest >= budget:
        raise ConfigError(
            f"rollout.max_total_tokens: is {budget} but prompts take up to {longest} tokens "
            "with their tools' schemas; raise it (with rollout.engine.max_model_len), or drop "
            "long prompts with task.max_prompt_tokens"
        )


def run(cfg: Config) -> dict[str, Any]:
    """Everything after validation: model, Ray, worker groups, the loop. Returns final metrics."""
    import ray

    from toolrl.algo.algorithm import Algorithm
    from toolrl.metrics import MetricsLogger
    from toolrl.preemption import StopRequest
    from toolrl.trainer import Trainer

    ready = prepare(cfg)
    model_path = ready.model_path
    r, t = cfg.rollout, cfg.trainer
    start_ray(cfg)
    stop = StopRequest()
    stop.install()  # after ray.init, which installs its own SIGTERM handler
    try:
        rollout = rollout_group(cfg, model_path, ready.chat_template)
        algorithm = Algorithm(cfg.algorithm, r.max_total_tokens)
        train, critic = train_groups(cfg, algorithm, model_path)
        write_placement(cfg.run_dir, rollout, train, critic)
        logger = MetricsLogger(
            cfg.run_dir,
            t.total_steps,
            cfg.logger.wandb_mode,
            cfg.logger.project,
            cfg.logger.run_name,
            config=dataclasses.asdict(cfg),
            progress_bar=cfg.logger.progress_bar,
            start_step=ready.saved["step"],
            run_id=ready.saved["wandb_id"],
        )
        trainer = Trainer(
            cfg,
            task=ready.task,
            algorithm=algorithm,
            rollout=rollout,
            train=train,
            logger=logger,
            pad_id=_pad_id(ready.tokenizer),
            tokenizer=ready.tokenizer,
            model_path=model_path,
            critic=critic,
            resume_from=ready.resume,
            stop=stop,
        )
        try:
            return trainer.fit()
        finally:
            stop.shutting_down = True  # a signal now must not cut the shutdown short
            logger.close()
            rollout.shutdown()
            train.shutdown()
            if critic is not None and critic is not train:
                critic.shutdown()
    finally:
        ray.shutdown()


def start_ray(cfg: Config) -> None:
    """Start a local Ray cluster, or join one (ray.address), for the groups to run on."""
    import ray

    # Workers keep warnings and errors but not vLLM's and transformers' start-up chatter,
    # so the console shows the progress bar.
    quiet = {
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "ERROR"),
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
        "TQDM_DISABLE": "1",
    }
    # RAY_ADDRESS (`ray job submit` sets it) joins that cluster; else "local": one of our own
    # even where a stopped cluster's address file is left (/tmp/ray/ray_current_cluster)
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"
    if address == "local" and threading.current_thread() is threading.main_thread():
        # A warning signal may reach every process of a Slurm job step (submitit sends
        # SIGUSR2 so): only the driver must act on it, and save. The local cluster's
        # processes, started now, inherit "ignore"; StopRequest.install() handles it here.
        for s in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(s, signal.SIG_IGN)
    ray.init(
        address=address,
        num_cpus=cfg.ray.num_cpus if address == "local" else None,
        include_dashboard=False,
        runtime_env={"env_vars": quiet},
    )


def rollout_group(cfg: Config, model_path: str, chat_template: str | None) -> Any:
    """The rollout engines as rollout.* configures them (toolrl.workers.rollout.RolloutGroup);
    training and `toolrl.eval` build them here."""
    from toolrl.workers.rollout import RolloutGroup

    r = cfg.rollout
    return RolloutGroup(
        rollout_spec(cfg, model_path, chat_template),
        r.num_workers,
        r.num_cpus_per_worker,
        r.num_gpus_per_worker,
        r.max_inflight_per_worker,
        cfg.ray.placement_timeout_s,
    )


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
    wait = cfg.ray.placement_timeout_s
    if critic is not None and c.colocate:
        group = TrainGroup(t.train_group, model_path, policy, critic, wait)
        return group, group
    own = TrainGroup(c.group, model_path, None, critic, wait) if critic is not None else None
    return TrainGroup(t.train_group, model_path, policy, None, wait), own


def write_placement(run_dir: str, rollout: Any, train: Any, critic: Any) -> dict[str, Any]:
    """RUN_DIR/placement.json: the node (Ray id and IP) of every engine and rank, and a line
    on the console: where a run on several nodes put its actors."""
    import ray

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    where = {"rollout": rollout.worker_nodes, "train": train.rank_nodes}
    if critic is not None and critic is not train:
        where["critic"] = critic.rank_nodes
    out = {k: [{"node_id": n, "ip": ips.get(n)} for n in v] for k, v in where.items()}
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    Path(run_dir, "placement.json").write_text(json.dumps(out, indent=1) + "\n")
    nodes = {n for v in where.values() for n in v}
    if len(nodes) > 1:
        counts = ", ".join(f"{k}: {len(set(v))} node(s)" for k, v in where.items())
        print(f"toolrl: placed on {len(nodes)} nodes ({counts})", file=sys.stderr)
    return out


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
    """The length of a prompt as the chat template renders it for generation, with the run's
    template control: `chat_template` (model.chat_template's text) and `template_kwargs`;
    without tools' schemas unless given `tools` (tasks count without: a row's own tools are
    known only per row, in the rollout)."""
    from toolrl.rollout.chat import render_chat

    def count_tokens(messages: list[dict[str, Any]], tools: list | None = None) -> int:
        text = render_chat(tokenizer, messages, True, tools, chat_template, template_kwargs)
        return len(tokenizer.encode(text, add_special_tokens=False))

    return count_tokens


def _pad_id(tokenizer: Any) -> int:
    # Many tokenizers (Llama 3) have no pad token; padded positions are masked out anyway.
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(dcfg: DictConfig) -> None:
    from toolrl.preemption import Preempted

    try:
        cfg = to_config(dcfg)
        validate(cfg)
        cfg.run_dir = HydraConfig.get().runtime.output_dir
        final = run(cfg)
    except (ConfigError, OmegaConfBaseException) as e:
        print(f"toolrl: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    except Preempted as e:
        saved = " (a second signal: the last ones not saved)" if e.immediate else ""
        print(
            f"toolrl: {e} after {e.completed} training steps{saved}; run the same command "
            f"with hydra.run.dir={cfg.run_dir} to continue from its latest checkpoint",
            file=sys.stderr,
        )
        from toolrl.cluster import REQUEUE_CODES, requeue_submitit_job

        if e.exit_code in REQUEUE_CODES:  # a warning before a time limit or a pre-emption
            requeue_submitit_job(cfg.run_dir)
        sys.exit(e.exit_code)
    summary = {k: v for k, v in final.items() if k.startswith("eval/") or k == "checkpoint"}
    print(json.dumps({"run_dir": cfg.run_dir, **summary}, indent=2))


if __name__ == "__main__":
    main()
