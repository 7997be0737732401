"""The default run's step, split into rollout, update and weight push: synchronous against
overlapped (trainer.max_staleness=1), beside the train limit, all measured in one run.

    python bench/step.py                           # 8 steps per mode on the embedded default
    python bench/step.py --steps 12 trainer.train_group.world_size=1     # any overrides
    python bench/step.py --from-run runs/2026-11-29/18-00-00   # a finished run's split only

It runs the real job (Ray, vLLM, FSDP2) three times in this process: synchronous and
overlapped for the split, then synchronous again with each step's update followed by the
train limit on the same batch while the workers wait (so the two are timed side by side and
a change in the machine's speed, which on a shared host can be large, hits both). Then,
with Ray shut down, it times on the synchronous run's batches in this one process (torch
threads = cores), the three paths interleaved batch by batch:

    limit  a bare forward + backward + AdamW step over the batch, packed, with the head only
           at the scored tokens (all at once, through cross_entropy): what one pass of
           training over these tokens costs at least
    full   the scoring path before the lean one (padded rows, float32 logits over the whole
           vocabulary at every position), doing what the update did: old-logprob and
           reference passes over the batch, then forward + backward per mini-batch, AdamW
           step each
    lean   the same work through toolrl.workers.scoring, with the old-logprob pass over the
           rows after the first mini-batch only (the first one's update scores its own pi_old,
           as the trainer now does)

Medians are over steps 1..S-1 (step 0 warms up); ratios are medians of per-step ratios, with
their range over the steps (repeated runs of the same code moved the paired ratio by about
0.1, README).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolrl.algo.batch import TrainBatch  # noqa: E402
from toolrl.workers.scoring import ScoredLM, pack  # noqa: E402

KEYS = ("time/step_s", "time/rollout_s", "time/train_s", "time/weight_sync_s", "time/cpu_s")


def load_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from toolrl.config import register, to_config
    from toolrl.validate import validate

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = to_config(compose("config", overrides=overrides))
    validate(cfg)
    return cfg


def job_overrides(steps: int, extra: list[str]) -> list[str]:
    """A short default job for timing: no evaluation, checkpoint, wandb or progress bar."""
    quiet = ["trainer.eval_every=0", "trainer.save_checkpoint=false"]
    quiet += ["logger.wandb_mode=disabled", "logger.progress_bar=false"]
    return [f"trainer.total_steps={steps}", *quiet, *extra]


def run_job(
    overrides: list[str], run_dir: str, paired: list[tuple[float, float]] | None = None
) -> tuple[list[dict], list[list], str]:
    """Run toolrl.main's job; returns (metrics per step, kept trajectories per step, model).

    With `paired`, each step's update is followed, in this process while the workers wait,
    by the train limit on the same batch: (update seconds, limit seconds) per step. That
    adds the limit's time to the job's step clock, so only the pairs of such a job count."""
    from toolrl import main, trainer

    cfg = load_config(overrides)
    cfg.run_dir = run_dir
    model = main.resolve_model(cfg.model.path, cfg.model.embedded_tool)
    kept_per_step: list[list] = []
    real_update = trainer.Trainer._update

    def update(self, batch, kept):  # keep what each step trains on
        kept_per_step.append(kept)
        t0 = time.perf_counter()
        out = real_update(self, batch, kept)
        if paired is not None:
            seconds = time.perf_counter() - t0
            limit_batch = batches_of([kept], pad_id=0)[0]  # packing ignores the padding
            paired.append((seconds, time_limit(model, limit_batch)))
        return out

    trainer.Trainer._update = update
    try:
        main.run(cfg)
    finally:
        trainer.Trainer._update = real_update
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step_s" in r], kept_per_step, model


def split(rows: list[dict]) -> dict[str, float]:
    """Median over steps 1.. (step 0 warms up) of every time/ key."""
    rows = rows[1:] or rows
    keys = sorted({k for r in rows for k in r if k.startswith("time/")} | set(KEYS))
    return {k: statistics.median(r.get(k, 0.0) for r in rows) for k in keys}


def _full_logprobs(lm, mb: TrainBatch) -> torch.Tensor:
    """The replaced path: padded rows, float32 logits over the vocabulary at every position."""
    logits = lm(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
    lp = logits.gather(-1, mb.input_ids[:, 1:, None])[..., 0] - logits.logsumexp(dim=-1)
    return F.pad(lp * mb.attention_mask[:, 1:], (0, 1))


def _lean_logprobs(scored: ScoredLM, mb: TrainBatch) -> torch.Tensor:
    return scored.score(mb, 1.0)[0]


def time_update(model_path: str, batch: TrainBatch, path: str, mini: int, micro: int) -> float:
    """Seconds for what the trainer's update does on one process: old-logprob and reference
    passes (no grad), then per mini-batch forward + backward (per micro-batch) + AdamW."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    scored = ScoredLM(lm)
    fn = (
        (lambda mb: _full_logprobs(lm, mb))
        if path == "full"
        else (lambda mb: _lean_logprobs(scored, mb))
    )
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    head = batch.split_sizes(mini)[0] if path == "lean" else 0  # pi_old from the update
    t0 = time.perf_counter()
    with torch.no_grad():
        for scored_rows in (batch.rows(head, batch.size), batch):  # pi_old, the reference
            for mb in scored_rows.micro_batches(micro):
                fn(mb.trimmed())
    for part in batch.split(mini):
        opt.zero_grad()
        for mb in part.micro_batches(micro):
            mb = mb.trimmed()
            loss = -(fn(mb) * mb.loss_mask).sum() / max(batch.num_tokens, 1)
            loss.backward()
        opt.step()
    return time.perf_counter() - t0


def time_limit(model_path: str, batch: TrainBatch) -> float:
    """One bare training pass over the batch: packed forward, head only at scored tokens,
    backward, AdamW."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    p = pack(batch)
    t0 = time.perf_counter()
    hidden = lm.base_model(input_ids=p.input_ids, position_ids=p.position_ids).last_hidden_state
    logits = lm.get_output_embeddings()(hidden.flatten(0, 1)[p.index])  # [N, V]
    F.cross_entropy(logits, p.targets).backward()  # the fastest log-softmax here (head.py)
    opt.step()
    return time.perf_counter() - t0


def batches_of(kept_per_step: list[list], pad_id: int) -> list[TrainBatch]:
    out = []
    for kept in kept_per_step:
        b = TrainBatch.from_trajectories(kept, None, pad_id)
        b.advantages = b.loss_mask.clone()
        out.append(b)
    return out


def ratio(a: list[float], b: list[float]) -> str:
    """The median of the per-step ratios a/b, and their range over the steps."""
    r = sorted(x / y for x, y in zip(a, b, strict=True))
    return f"{statistics.median(r):.2f}  (steps: {r[0]:.2f}-{r[-1]:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--from-run", default=None, help="print a finished run's split and exit")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for both runs")
    args = ap.parse_args()
    if args.from_run:
        rows = [
            json.loads(x) for x in Path(args.from_run, "metrics.jsonl").read_text().splitlines()
        ]
        print(json.dumps(split([r for r in rows if "time/step_s" in r]), indent=2))
        return
    cores = len(os.sched_getaffinity(0))
    common = job_overrides(args.steps, args.overrides)
    modes = {
        "sync": ["trainer.max_staleness=0"],
        "overlap": ["trainer.max_staleness=1", "algorithm.loss.mismatch.mode=tis"],
        "paired": ["trainer.max_staleness=0"],  # each update beside the limit, same batch
    }
    torch.set_num_threads(cores)  # this process times the limit and the one-process paths
    results, kept, pairs = {}, None, []
    for name, extra in modes.items():
        with tempfile.TemporaryDirectory() as run_dir:
            paired = pairs if name == "paired" else None
            rows, kept_steps, model = run_job(common + extra, run_dir, paired)
        results[name] = split(rows)
        kept = kept if kept is not None else kept_steps
    cfg = load_config(common)
    mini, micro = cfg.algorithm.mini_batches, cfg.trainer.train_group.micro_batch_size
    batches = batches_of(kept, pad_id=0)[1:]
    time_limit(model, batches[0])  # warm-up
    limit, full, lean = [], [], []
    for b in batches:  # interleaved, so a change in the machine's speed hits all three
        limit.append(time_limit(model, b))
        full.append(time_update(model, b, "full", mini, micro))
        lean.append(time_update(model, b, "lean", mini, micro))
    s, o = results["sync"], results["overlap"]
    ideal = max(s["time/rollout_s"], s["time/train_s"], s["time/cpu_s"] / cores)
    print(f"cores {cores}; medians of steps 1..{args.steps - 1}; batches of the sync run")
    print(f"{'mode':<10}" + "".join(f"{k.split('/')[1]:>16}" for k in KEYS))
    for name in ("sync", "overlap"):
        print(f"{name:<10}" + "".join(f"{results[name][k]:>16.2f}" for k in KEYS))
    parts = [k for k in s if k not in KEYS]
    print("sync update's parts: " + ", ".join(f"{k[5:-2]} {s[k]:.2f} s" for k in parts))
    real, paired_limit = [u for u, _ in pairs[1:]], [b for _, b in pairs[1:]]
    print(
        f"train limit (1 process, {cores} threads, bare step):      {statistics.median(limit):.2f} s"
    )
    print(f"update, one process, full-vocabulary padded path:   {statistics.median(full):.2f} s")
    print(f"update, one process, lean path:                     {statistics.median(lean):.2f} s")
    print(f"real update (Ray, FSDP2), paired run:               {statistics.median(real):.2f} s")
    print("ratios, medians over the steps of each step's pair:")
    print(f"  full / lean (same batch, same process):           {ratio(full, lean)}")
    print(f"  one-process lean update / train limit:            {ratio(lean, limit)}")
    print(f"  real update (Ray, FSDP2) / train limit:           {ratio(real, paired_limit)}")
    print(f"overlap step / max(rollout, update, cpu/cores):     {o['time/step_s'] / ideal:.2f}")
    print(
        f"overlap step / sync step:                           {o['time/step_s'] / s['time/step_s']:.2f}"
    )


if __name__ == "__main__":
    main()
