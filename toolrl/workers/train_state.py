"""Sharded training state on disk: a model's weights, its optimizer and schedule, and the RNG.

Collectives: every rank of the group calls `save_train_state` / `load_train_state` at once.
Weights and optimizer moments go through `torch.distributed.checkpoint` (DCP), which writes
each rank's shards to its own file plus one metadata file, and reshards on load, so a run
saved on 2 ranks resumes on 1 or 4. The LR schedule is the same on every rank and rides in
the same checkpoint; each rank's torch RNG state is its own small file (a rank missing one,
after a change of world size, keeps its seeded state: the update draws no random numbers).

    save_train_state("ckpt/policy", policy)     # any object with .model, .optimizer, .scheduler
    load_train_state("ckpt/policy", policy)

The folder is written by all ranks; the caller (toolrl.checkpoint) makes it visible only
once complete. Across nodes it must be on a file system every rank sees.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict


class Trained(Protocol):
    """A role with training state: the Policy and the Critic (toolrl.workers.actor/critic)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def save_train_state(path: str, role: Trained) -> None:
    """Collective: write the role's model shards, optimizer state and schedule under `path`."""
    dcp.save(_state(role), checkpoint_id=path)
    torch.save(torch.get_rng_state(), os.path.join(path, f"rng_rank{dist.get_rank()}.pt"))
    dist.barrier()


def load_train_state(path: str, role: Trained) -> None:
    """Collective: restore what `save_train_state` wrote, resharded to this group."""
    state = _state(role)
    dcp.load(state, checkpoint_id=path)  # fills `state` in place
    set_state_dict(
        role.model, role.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )
    role.scheduler.load_state_dict({**role.scheduler.state_dict(), **state["schedule"]})
    rng = os.path.join(path, f"rng_rank{dist.get_rank()}.pt")
    if os.path.exists(rng):
        torch.set_rng_state(torch.load(rng))


def _state(role: Trained) -> dict[str, object]:
    """What is saved: sharded model and optimizer state dicts (DTensors) and the schedule."""
    model_sd, optim_sd = get_state_dict(role.model, role.optimizer)
    return {"model": model_sd, "optim": optim_sd, "schedule": _schedule_state(role.scheduler)}


def _schedule_state(scheduler: torch.optim.lr_scheduler.LRScheduler) -> dict[str, object]:
    # LambdaLR's own state_dict holds the lambda's slot (None) too; these are the counters.
    s = scheduler.state_dict()
    return {
        "last_epoch": s["last_epoch"],
        "_step_count": s["_step_count"],
        "_last_lr": s["_last_lr"],
    }
