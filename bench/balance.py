"""The update with each rank's rows chosen by token count (TrainBatch.balanced_rows, what
TrainGroup does) against rows dealt out in order, on the batches of a short default job.

    python bench/balance.py                                # a 4-step job's batches, 4 rounds
    python bench/balance.py --rounds 3 trainer.train_group.world_size=4   # any overrides

It runs the job once to keep what each step trained on, then starts two training groups in
one Ray session (the job's train_group settings; one deals rows in order) and, batch after
batch, runs the trainer's own update phase (`Trainer._update`: pi_old pass, reference pass,
advantages, one step per mini-batch) on each, alternating which goes first, with the train
limit (bench/step.py) timed on the same batch in this process. Prints each group's median
ratio to the limit and the median of the per-batch ratio balanced / in order, with ranges.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step  # noqa: E402
import torch  # noqa: E402

from toolrl.algo.algorithm import Algorithm  # noqa: E402
from toolrl.algo.batch import TrainBatch  # noqa: E402


def in_order_rows(batch: TrainBatch, n: int) -> list[list[int]]:
    """Rows dealt to n ranks in order, as before balanced_rows (the row counts of `split`)."""
    return [r.tolist() for r in torch.arange(batch.size).split(batch.split_sizes(n))]


def in_order_group():  # noqa: ANN201
    """A TrainGroup that deals rows to ranks in order."""
    from toolrl.workers.train_group import TrainGroup

    class InOrder(TrainGroup):
        def _rank_rows(self, batch: TrainBatch) -> list[list[int]]:
            return in_order_rows(batch, self.cfg.world_size)

    return InOrder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="steps of the job whose batches are used")
    ap.add_argument("--rounds", type=int, default=4, help="passes over those batches")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for the job and the groups")
    args = ap.parse_args()
    common = step.job_overrides(args.steps, args.overrides)
    with tempfile.TemporaryDirectory() as run_dir:
        _, kept_per_step, model = step.run_job(common, run_dir)

    import ray

    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the limit: one process, every core
    from toolrl.workers import train_group as tg
    from toolrl.workers.train_group import PolicyRole, TrainGroup

    cfg = step.load_config(common)
    ray.init(include_dashboard=False, num_cpus=4 * cfg.trainer.train_group.world_size)
    names = iter(range(100))
    reserve = tg.reserve  # each group reserves its own placement group
    tg.reserve = lambda name, *a: reserve(f"{name}-{next(names)}", *a)
    algorithm = Algorithm(cfg.algorithm, cfg.rollout.max_total_tokens)
    role = PolicyRole(cfg.trainer.optim, reference=algorithm.needs_reference)
    groups = {
        "balanced": TrainGroup(cfg.trainer.train_group, model, role),
        "in order": in_order_group()(cfg.trainer.train_group, model, role),
    }
    from toolrl.trainer import Trainer

    seconds: dict[str, list[float]] = {k: [] for k in groups}
    limits: list[float] = []
    for i, kept in enumerate(kept_per_step * args.rounds):
        order = list(groups) if i % 2 == 0 else list(groups)[::-1]
        for name in order:
            host = SimpleNamespace(algorithm=algorithm, train=groups[name], critic=None)
            batch = TrainBatch.from_trajectories(kept, None, pad_id=0)
            t0 = time.perf_counter()
            Trainer._update(host, batch, kept)
            seconds[name].append(time.perf_counter() - t0)
        limits.append(step.time_limit(model, step.batches_of([kept], pad_id=0)[0]))
    ray.shutdown()
    world, spread = cfg.trainer.train_group.world_size, {"balanced": [], "in order": []}
    for kept in kept_per_step:  # the busiest rank's tokens over the mean, per mini-batch
        batch = TrainBatch.from_trajectories(kept, None, pad_id=0)
        for part in batch.split(cfg.algorithm.mini_batches):
            lengths = part.attention_mask.sum(dim=1)
            in_order = in_order_rows(part, world)
            for name, rows in (("balanced", part.balanced_rows(world)), ("in order", in_order)):
                tokens = [int(lengths[r].sum()) for r in rows]
                spread[name].append(max(tokens) / (sum(tokens) / world))
    for name, s in spread.items():
        print(f"{name:>9}: busiest rank's tokens / mean {statistics.median(s):.3f} (median)")
    print(f"{len(limits)} updates each (the first, a warm-up, left out of the medians)")
    for name, s in seconds.items():
        print(f"{name:>9}: update / train limit {step.ratio(s[1:], limits[1:])}")
    balanced, in_order = seconds["balanced"][1:], seconds["in order"][1:]
    print(f"balanced / in order, per batch: {step.ratio(balanced, in_order)}")


if __name__ == "__main__":
    main()
