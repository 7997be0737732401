"""Evaluate an exported checkpoint on a task's eval split, with the agent loop, protocol,
parser, tools and reward of training; results as a table and json.

    python -m toolrl.eval runs/<date>/<time>/checkpoint                 # as that run evaluated
    python -m toolrl.eval CHECKPOINT trainer.eval_samples=8 'trainer.eval_pass_k=[1,4,8]'
    python -m toolrl.eval CHECKPOINT task=dataset task.eval_files=[data/test.jsonl] ...
    python -m toolrl.eval CHECKPOINT --out results.json

CHECKPOINT is a Hugging Face model folder with its tokenizer (training exports the final
policy to RUN_DIR/checkpoint/). When it sits in a run folder (RUN_DIR/.hydra/overrides.yaml),
the config is composed with that run's overrides, so task, tools, parser, reward and rollout
settings match the run; overrides given here go on top (one naming a key, or a group, the run
set replaces the run's). Only the rollout engines start (Ray, vLLM), no training group. The
eval split is rolled out as Trainer.evaluate does (`eval_episodes`: trainer.eval_prompts
prompts x trainer.eval_samples, the same seeds), so a run's checkpoint reproduces its final
eval/reward.

Prints a table; writes the json (default RUN_DIR/eval/<time>.json) with pass@k, the reward and
its components, tool use (calls and turns per sample, errors by kind, truncation), and every
trajectory to <out>.trajectories.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from toolrl.config import Config, ConfigError, composing, to_config
from toolrl.metrics import trajectory_records
from toolrl.rollout.trajectory import Trajectory
from toolrl.validate import validate


def error_kinds(traj: Trajectory) -> Counter[str]:
    """The trajectory's tool errors by kind: `parse` (a call the parser could not read), the
    caller's (`unknown_tool`, `timeout`, `raised`, `call_limit`) and `tool` (the tool's own
    error answer, e.g. bad arguments)."""
    kinds: Counter[str] = Counter()
    for turn in traj.turns:
        kinds["parse"] += len(turn.parse_errors)
        for r in turn.results[: len(turn.calls)]:  # any after them answer the parse errors
            if not r.ok:
                kinds[r.error or "tool"] += 1
    return +kinds  # without zero counts


def tool_use(trajs: list[Trajectory]) -> dict[str, Any]:
    """How the samples used their tools: calls per sample (and per tool), the share of samples
    calling any, errors per sample by kind (`error_kinds`)."""
    n = max(len(trajs), 1)
    by_tool = Counter(c.name for t in trajs for u in t.turns for c in u.calls)
    errors = sum((error_kinds(t) for t in trajs), Counter())
    return {
        "calls_per_sample": sum(t.num_tool_calls for t in trajs) / n,
        "samples_calling": sum(t.num_tool_calls > 0 for t in trajs) / n,
        "calls_by_tool": dict(sorted(by_tool.items())),
        "errors_per_sample": {k: v / n for k, v in sorted(errors.items())},
    }


def compose(checkpoint: Path, overrides: list[str]) -> Config:
    """The run's config (its .hydra/overrides.yaml beside the checkpoint, if there) with
    `overrides` on top, typed and validated, evaluating `checkpoint`. Warns when conf/ has
    changed since the run, so its overrides no longer give the config it saved."""
    from omegaconf import OmegaConf

    saved = checkpoint.parent / ".hydra" / "config.yaml"
    with composing() as hydra_compose:
        cfg = to_config(hydra_compose(merged_overrides(checkpoint, overrides)))
        if saved.is_file():
            now = hydra_compose(merged_overrides(checkpoint, []))
            changed = differing_keys(OmegaConf.to_container(now), OmegaConf.load(saved))
            if changed:
                print(
                    f"toolrl.eval: conf/ changed since the run; today's values of "
                    f"{', '.join(changed)} differ from its {saved}",
                    file=sys.stderr,
                )
    cfg.model.path = str(checkpoint)
    validate(cfg)
    return cfg


def differing_keys(a: Any, b: Any, where: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested configs (dicts, DictConfigs)."""
    from omegaconf import DictConfig, OmegaConf

    a, b = (OmegaConf.to_container(x) if isinstance(x, DictConfig) else x for x in (a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b))
        return [d for k in keys for d in differing_keys(a.get(k), b.get(k), f"{where}{k}.")]
    return [] if a == b else [where.rstrip(".")]


def merged_overrides(checkpoint: Path, overrides: list[str]) -> list[str]:
    """The run's overrides (none outside a run folder) whose key, or group, `overrides` does
    not set, then `overrides`: one setting `task` drops the run's `task` and `task.*`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    saved = checkpoint.parent / ".hydra" / "overrides.yaml"
    # ray.*: where the run ran (a Slurm run joined its cluster), not what it computed
    run = [
        o for o in (OmegaConf.load(saved) if saved.is_file() else []) if not o.startswith("ray.")
    ]
    parse = OverridesParser.create().parse_overrides
    mine = {o.key_or_group for o in parse(overrides)}
    kept = [
        o.input_line
        for o in parse(run)
        if not any(o.key_or_group == k or o.key_or_group.startswith(k + ".") for k in mine)
    ]
    return kept + overrides


def evaluate(cfg: Config) -> tuple[dict[str, Any], list[Trajectory], list[Any]]:
    """Roll out the eval split on fresh engines: (results, trajectories, prompts)."""
    import ray

    from toolrl.main import load_model_and_task, rollout_group, start_ray
    from toolrl.trainer import eval_episodes, eval_metrics

    t = cfg.trainer
    model_path, _, chat_template, task = load_model_and_task(cfg)
    prompts = task.prompts("eval")[: t.eval_prompts]
    t0 = time.perf_counter()
    start_ray(cfg)
    try:
        rollout = rollout_group(cfg, model_path, chat_template)
        try:
            trajs = rollout.rollout(eval_episodes(prompts, t.seed, t.eval_samples), evaluate=True)
        finally:
            rollout.shutdown()
    finally:
        ray.shutdown()
    results = {
        "checkpoint": model_path,
        "task": cfg.task.get("_target_"),
        "prompts": len(prompts),
        "samples_per_prompt": t.eval_samples,
        "pass_reward": t.eval_pass_reward,
        "metrics": eval_metrics(trajs, t),
        "tool_use": tool_use(trajs),
        "seconds": time.perf_counter() - t0,
    }
    return results, trajs, prompts


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table of (what, value)."""
    rows = [("prompts x samples", f"{results['prompts']} x {results['samples_per_prompt']}")]
    rows += [(k, f"{v:.4f}") for k, v in results["metrics"].items()]
    use = results["tool_use"]
    rows += [(f"tools/{k}", f"{use[k]:.4f}") for k in ("calls_per_sample", "samples_calling")]
    rows += [(f"tools/calls/{k}", str(v)) for k, v in use["calls_by_tool"].items()]
    errors = use["errors_per_sample"].items()
    rows += [(f"tools/errors_per_sample/{k}", f"{v:.4f}") for k, v in errors]
    return "\n".join(["| what | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def write(results: dict[str, Any], trajs: list[Trajectory], prompts: list[Any], out: Path) -> None:
    """The json to `out`, every trajectory (`trajectory_records`) to <out>.trajectories.jsonl."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    records = trajectory_records(trajs, None, lambda i: prompts[i].messages)
    lines = "".join(json.dumps(r, default=str) + "\n" for r in records)
    out.with_suffix(".trajectories.jsonl").write_text(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m toolrl.eval", description=" ".join(__doc__.split("\n\n")[0].split())
    )
    parser.add_argument("checkpoint", type=Path, help="a Hugging Face model folder")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for toolrl.main")
    parser.add_argument("--out", type=Path, help="the json (default RUN_DIR/eval/<time>.json)")
    args = parser.parse_args(argv)
    checkpoint = args.checkpoint.resolve()
    try:
        if not (checkpoint / "config.json").is_file():
            raise ConfigError(f"{checkpoint} is not a Hugging Face model folder (no config.json)")
        cfg = compose(checkpoint, args.overrides)
        results, trajs, prompts = evaluate(cfg)  # the model and task checks come before Ray
    except (ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"toolrl.eval: bad config: {e}", file=sys.stderr)
        return 2
    out = args.out or checkpoint.parent / "eval" / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}.json"
    write(results, trajs, prompts, out)
    print(table(results))
    print(f"toolrl.eval: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
