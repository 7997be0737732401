"""Checkpoints a run continues from: where they live, how one is made visible, which to resume.

    <run_dir>/checkpoints/
        step_00000010/          a complete checkpoint after 10 training steps
            train/policy/       sharded weights, AdamW and schedule (torch.distributed.checkpoint)
            train/critic/       the same for the critic, when the algorithm has one
            trainer.json        step, weight version, prompt order, wandb id, the fixed config
            driver_rng.pt       the driver's python and torch RNG states
        latest                  the name of the newest complete checkpoint

A checkpoint is written into a hidden `.tmp-...` folder beside the others, renamed into place
once every part is on disk, and only then does `latest` (replaced atomically) name it: a
crash mid-write leaves `latest` on the previous checkpoint and a stray temp folder, which the
next save removes. The last `keep_last` checkpoints are kept.

`trainer.resume=auto` continues from `latest` in the run folder (none: a fresh start);
`trainer.resume=PATH` from a checkpoint folder, a `checkpoints` folder or a run folder;
`trainer.resume=never` always starts fresh. Keys that cannot change across a resume (the
model, task, algorithm and seed) are compared before Ray starts (`check_resumable`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from toolrl.config import Config, ConfigError

LATEST = "latest"
STATE = "trainer.json"
RNG = "driver_rng.pt"
# What a resumed run must share with the run that saved: the rest (steps, logging, workers,
# world size, budgets of evaluation) may change.
FIXED = ("model", "task", "algorithm", "trainer.seed")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def latest(folder: str | Path) -> Path | None:
    """The complete checkpoint `folder/latest` names, or None."""
    marker = Path(folder) / LATEST
    if not marker.is_file():
        return None
    path = Path(folder) / marker.read_text().strip()
    return path if (path / STATE).is_file() else None


def resolve(resume: str, run_dir: str | Path) -> Path | None:
    """The checkpoint folder `trainer.resume` points at, or None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest(checkpoints_dir(run_dir))
    path = Path(resume).expanduser()
    for candidate in (path, checkpoints_dir(path)):
        if (candidate / STATE).is_file():
            return candidate
        found = latest(candidate)
        if found is not None:
            return found
    raise ConfigError(
        f"trainer.resume={resume!r}: no checkpoint there (a step_* folder holding {STATE}, "
        "or a run or checkpoints folder whose `latest` names one); use auto or never"
    )


def set_aside(run_dir: str | Path) -> Path | None:
    """Rename the run folder's checkpoints (if any) out of the way of a fresh start, so its
    `latest` and pruning never mix the two runs; returns where they went."""
    folder = checkpoints_dir(run_dir)
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    for n in itertools.count(1):
        aside = folder.with_name(f"checkpoints.before-{n}")
        if not aside.exists():
            os.rename(folder, aside)
            return aside
    raise AssertionError("unreachable")


def fixed_config(cfg: Config) -> dict[str, Any]:
    """The flattened keys of `cfg` under FIXED, as JSON values."""
    flat: dict[str, Any] = {}
    tree = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
    for key in FIXED:
        node: Any = tree
        for part in key.split("."):
            node = node[part]
        _flatten(node, key, flat)
    return flat


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = node


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / STATE).read_text())


def check_resumable(path: Path, cfg: Config) -> dict[str, Any]:
    """The checkpoint's trainer state; raises ConfigError naming every fixed key that differs."""
    state = read_state(path)
    saved, now = state["fixed"], fixed_config(cfg)
    changed = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if changed:
        raise ConfigError(
            f"cannot resume from {path}: the run it saved had other values for keys that "
            "cannot change across a resume:\n  "
            + "\n  ".join(changed)
            + "\nset them back, or start fresh (trainer.resume=never, or a new run folder)"
        )
    return state


class Checkpointer:
    """Writes the run's checkpoints: `begin` a temp folder, fill it, `commit` it."""

    def __init__(self, run_dir: str | Path, keep_last: int) -> None:
        self.folder = checkpoints_dir(run_dir)
        self.keep_last = keep_last

    def begin(self, step: int) -> Path:
        """A fresh temp folder to write step `step`'s checkpoint into (stale ones removed)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        return Path(tempfile.mkdtemp(prefix=f".tmp-{step_name(step)}-", dir=self.folder))

    def commit(self, tmp: Path, step: int, state: dict[str, Any]) -> Path:
        """Write the trainer state, move `tmp` into place, point `latest` at it, prune."""
        _write_json(tmp / STATE, state)
        _fsync_tree(tmp)
        final = self.folder / step_name(step)
        if final.exists():  # a step saved before (a resume from an earlier checkpoint)
            shutil.rmtree(final)
        os.rename(tmp, final)
        marker = self.folder / f".{LATEST}.tmp"
        marker.write_text(final.name + "\n")
        _fsync_file(marker)
        os.replace(marker, self.folder / LATEST)
        _fsync_file(self.folder)
        self._prune(final)
        return final

    def _prune(self, keep: Path) -> None:
        done = sorted(p for p in self.folder.glob("step_*") if (p / STATE).is_file())
        for old in done[: -self.keep_last]:
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)


def save_driver_rng(path: Path) -> None:
    """The driver's python and torch RNG states into a checkpoint folder being written."""
    import torch

    torch.save({"python": random.getstate(), "torch": torch.get_rng_state()}, path / RNG)


def restore_driver_rng(path: Path) -> None:
    import torch

    saved = torch.load(path / RNG, weights_only=False)
    random.setstate(saved["python"])
    torch.set_rng_state(saved["torch"])


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` to disk before it is made visible."""
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(folder, name))
        _fsync_file(Path(folder))
