"""Per-step metrics: summaries of a batch of trajectories, and where they are written.

Every step's metrics go to `metrics.jsonl` in the run directory (one JSON object a line,
always), to wandb (offline by default, so no account is needed; `wandb sync` uploads a
run later) and to a progress bar on the console. docs/metrics.md says what each key means.
A few sample trajectories per step (prompt, turns with their calls and the tools' answers,
reward and its components) go to `trajectories.jsonl` and to a wandb table, and as many of
each evaluation's to `eval_trajectories.jsonl` and a table of that name.

    python -m toolrl.metrics runs/<date>/<time>     # print a run's curve as a table
    python -m toolrl.metrics RUN_A RUN_B ...         # several runs' eval reward side by side
"""

from __future__ import annotations

import json
import math
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from statistics import mean
from typing import Any

from toolrl.rollout.trajectory import Trajectory


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and every live process it started (a local
    Ray cluster's raylet, actors and vLLM engines), so far. On a joined cluster (ray.address
    set) only this node's driver side is seen."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:  # exited while we looked
            pass
    return total


def rollout_metrics(trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    """Means over a batch: reward, lengths, turns, tool calls and errors, infra failures."""
    if not trajs:
        return {}
    sampled = [sum(t.loss_mask) for t in trajs]
    return {
        f"{prefix}/reward": mean(t.total_reward for t in trajs),
        f"{prefix}/answered": mean(t.info.get("final_text") is not None for t in trajs),
        f"{prefix}/response_len": mean(t.response_len for t in trajs),
        f"{prefix}/sampled_tokens": mean(sampled),
        f"{prefix}/turns": mean(len(t.turns) for t in trajs),
        f"{prefix}/tool_calls": mean(t.num_tool_calls for t in trajs),
        f"{prefix}/tool_errors": mean(t.num_tool_errors for t in trajs),
        f"{prefix}/calls_in_reasoning": mean(t.num_reasoning_calls for t in trajs),
        f"{prefix}/truncated": mean(
            any(u.finish_reason == "length" for u in t.turns) for t in trajs
        ),
        f"{prefix}/infra_errors": mean(t.infra_error is not None for t in trajs),
        **reward_metrics(trajs, prefix),
        **prefix_cache_metrics(trajs, prefix),
    }


def prefix_cache_metrics(trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    """Per turn k, the fraction of the turns' context tokens the engine read from its prefix
    cache (turn 0: the prompt, shared by a group's samples; later turns: the trajectory so
    far, which the previous turn computed)."""
    out = {}
    for k in range(max((len(t.turns) for t in trajs), default=0)):
        turns = [t.turns[k] for t in trajs if len(t.turns) > k]
        context = sum(u.start for u in turns)
        if context:
            out[f"{prefix}/prefix_hit_turn{k}"] = sum(u.cached_tokens for u in turns) / context
    return out


def reward_metrics(trajs: list[Trajectory], prefix: str) -> dict[str, float]:
    """Each reward component's mean over the scored trajectories (`train/reward/<name>`),
    and how many components per trajectory failed on the model's output (scored 0)."""
    scored = [t.info for t in trajs if "reward_components" in t.info]
    if not scored:
        return {}
    names = sorted({k for info in scored for k in info["reward_components"]})
    out = {
        f"{prefix}/reward/{k}": mean(i["reward_components"].get(k, 0.0) for i in scored)
        for k in names
    }
    out[f"{prefix}/reward_failures"] = mean(i["reward_failures"] for i in scored)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of a prompt of which c passed (Chen et
    al. 2021, "Evaluating Large Language Models Trained on Code"): the chance that k of the n
    samples, drawn without replacement, hold at least one pass, 1 - C(n-c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # comb(n - c, k) is 0 when k > n - c


def pass_metrics(
    trajs: list[Trajectory], ks: Sequence[int], threshold: float, prefix: str
) -> dict[str, float]:
    """`{prefix}/pass@k` for each k: pass_at_k averaged over prompts (trajectories grouped by
    prompt_id), a sample passing when its total reward reaches `threshold`. An infrastructure
    fault scores 0, as in `{prefix}/reward`, so it counts as a fail."""
    groups: dict[int, list[bool]] = {}
    for t in trajs:
        groups.setdefault(t.prompt_id, []).append(t.total_reward >= threshold)
    if not groups:
        return {}
    return {
        f"{prefix}/pass@{k}": mean(pass_at_k(len(g), sum(g), k) for g in groups.values())
        for k in ks
    }


def trajectory_records(
    trajs: list[Trajectory],
    step: int | None,
    messages: Callable[[int], list[dict[str, Any]]],
    decode: Callable[[list[int]], str] | None = None,
) -> list[dict[str, Any]]:
    """Trajectories as JSON-able dicts for trajectories.jsonl and the wandb table: the prompt
    (`messages(prompt_id)`), each turn (what the model wrote, decoded from its sampled ids when
    `decode` is given, else the parser's content; its calls; the tools' answers), the final
    text, the total reward and its components. `sample` numbers a prompt's samples in order."""
    seen: dict[int, int] = {}
    out = []
    for t in trajs:
        sample = seen[t.prompt_id] = seen.get(t.prompt_id, -1) + 1
        turns = [
            {
                "text": decode(t.token_ids[u.start : u.end]) if decode else u.content,
                "finish_reason": u.finish_reason,
                "calls": [{"name": c.name, "arguments": c.arguments} for c in u.calls],
                # parse errors are answered too, as results named "error" after the calls'
                "results": [{"name": r.name, "content": r.content, "ok": r.ok} for r in u.results],
                "observation": u.observation,
                "reward": u.reward,
            }
            for u in t.turns
        ]
        out.append(
            {
                "step": step,
                "prompt_id": t.prompt_id,
                "sample": sample,
                "prompt": messages(t.prompt_id),
                "turns": turns,
                "final_text": t.info.get("final_text"),
                "reward": t.total_reward,
                "reward_components": t.info.get("reward_components", {}),
                "infra_error": t.infra_error,
            }
        )
    return out


# sample trajectories of training steps, and of the evaluations (eval prompts, at eval steps)
SAMPLE_TABLES = ("trajectories", "eval_trajectories")
TRAJECTORY_COLUMNS = [
    "step", "prompt_id", "sample", "prompt", "turns", "final_text", "reward", "reward_components"
]  # fmt: skip


def table_row(record: dict[str, Any]) -> list[Any]:
    """A trajectory record as a row of TRAJECTORY_COLUMNS, its prompt and turns as text."""
    prompt = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in record["prompt"])
    lines = []
    for k, u in enumerate(record["turns"]):
        lines.append(f"[turn {k}, {u['finish_reason']}] {u['text']}")
        lines += [f"  call {c['name']} {json.dumps(c['arguments'])}" for c in u["calls"]]
        lines += [
            f"  {'answer' if r['ok'] else 'error'} ({r['name']}): {r['content']}"
            for r in u["results"]
        ]
        if u["observation"] is not None:
            lines.append(f"  observation: {u['observation']}")
    head = [record[k] for k in TRAJECTORY_COLUMNS[:3]]
    tail = [record["final_text"], record["reward"], json.dumps(record["reward_components"])]
    return [*head, prompt, "\n".join(lines), *tail]


_BAR_KEYS = {
    "train/reward": "reward",
    "eval/reward": "eval",
    "train/tool_calls": "calls",
    "time/step_s": "step_s",
}


class MetricsLogger:
    """Writes each step's metrics to JSONL, wandb and the progress bar."""

    def __init__(
        self,
        run_dir: str,
        total_steps: int,
        wandb_mode: str,
        project: str,
        run_name: str | None,
        config: dict[str, Any],
        progress_bar: bool = True,
        start_step: int = 0,
        run_id: str | None = None,
    ) -> None:
        """`start_step` > 0 continues a run: rows of metrics.jsonl from that step on (written
        after the checkpoint the run resumes from) are dropped, and wandb resumes `run_id`."""
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keep_rows_before(self.path, start_step)
        self._file = self.path.open("a")
        self.run_dir = Path(run_dir)
        for table in SAMPLE_TABLES:  # train samples, and the evaluations'
            keep_rows_before(self.run_dir / f"{table}.jsonl", start_step)
        self._sample_files: dict[str, Any] = {}  # each opened at its first write
        self._wandb = None
        self.run_id = run_id
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            self.run_id = run_id or uuid.uuid4().hex[:8]  # wandb's own id form
            self._wandb = wandb.init(
                project=project,
                name=run_name,
                mode=wandb_mode,
                dir=run_dir,
                config=config,
                id=self.run_id,
                resume="allow",
            )
        self._bar = None
        if progress_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=start_step,
                desc="toolrl",
                unit="step",
                dynamic_ncols=True,
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._bar is not None:
            shown = {short: f"{metrics[k]:.3g}" for k, short in _BAR_KEYS.items() if k in metrics}
            self._bar.set_postfix(shown, refresh=False)

    def log_trajectories(
        self, step: int, records: list[dict[str, Any]], table: str = "trajectories"
    ) -> None:
        """Sample trajectories (`trajectory_records`) to <table>.jsonl, one a line, and to
        wandb as the table <table>: one of SAMPLE_TABLES."""
        if table not in SAMPLE_TABLES:
            raise ValueError(f"sample table {table!r}; use one of {', '.join(SAMPLE_TABLES)}")
        if not records:
            return
        if table not in self._sample_files:
            self._sample_files[table] = (self.run_dir / f"{table}.jsonl").open("a")
        out = self._sample_files[table]
        for r in records:
            out.write(json.dumps(r, default=str) + "\n")
        out.flush()
        if self._wandb is not None:
            import wandb

            rows = wandb.Table(columns=TRAJECTORY_COLUMNS, data=[table_row(r) for r in records])
            self._wandb.log({table: rows}, step=step)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        self._file.close()
        for out in self._sample_files.values():
            out.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb is not None:
            self._wandb.finish()


def keep_rows_before(path: Path, step: int) -> None:
    """Drop the rows of a metrics.jsonl (or trajectories.jsonl) at `step` and later (all of
    them for step 0): a run resumed from step k logs k, k+1, ... again. Replaced atomically."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if _step_of(line) < step]
    if len(kept) == len(lines):
        return
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _step_of(line: str) -> float:
    """A row's step; a half-written last row (the process was killed) counts as none."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


_TABLE = ("eval/reward", "eval/tool_calls", "train/reward", "train/tool_calls", "time/step_s")


def _rows(run_dir: str) -> dict[int, dict[str, float]]:
    """A run's metrics.jsonl merged per step."""
    rows: dict[int, dict[str, float]] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(int(r["step"]), {}).update(r)
    return rows


def _table(header: list[str], rows: dict[int, list[float | None]]) -> str:
    out = ["| step | " + " | ".join(header) + " |", "|---" * (len(header) + 1) + "|"]
    for step, cells in sorted(rows.items()):
        shown = ["" if c is None else f"{c:.3f}" for c in cells]
        out.append(f"| {step} | " + " | ".join(shown) + " |")
    return "\n".join(out)


def curve(run_dir: str) -> str:
    """A Markdown table of a run's metrics.jsonl: one row per step that has any column."""
    rows = _rows(run_dir)
    return _table(list(_TABLE), {s: [r.get(k) for k in _TABLE] for s, r in rows.items()})


def compare(run_dirs: list[str], key: str = "eval/reward") -> str:
    """One column per run (named by its folder) of `key` at the steps where any run has it."""
    runs = [_rows(d) for d in run_dirs]
    steps = sorted({s for rows in runs for s, r in rows.items() if key in r})
    table = {s: [rows.get(s, {}).get(key) for rows in runs] for s in steps}
    return _table([Path(d).name for d in run_dirs], table)


if __name__ == "__main__":
    print(curve(sys.argv[1]) if len(sys.argv) == 2 else compare(sys.argv[1:]))
