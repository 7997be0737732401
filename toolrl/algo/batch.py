"""The training batch: trajectories padded into [B, T] tensors, with split and micro-batching.

Alignment convention (used by every [B, T] tensor here, by `Policy.logprobs` and by the loss):

    column t of loss_mask / old_logprobs / advantages / ref_logprobs describes the
    prediction of token t+1 from input_ids[:, :t+1], i.e. the logits at position t.

So `loss_mask[i, t] = traj.loss_mask[t + 1]` and `old_logprobs[i, t] = traj.logprobs[t + 1]`.
The last column never has a target and is always 0. Nothing is lost by the shift: token 0
is a prompt token, never sampled. All tensors keep the full width T = longest trajectory,
so input_ids and the per-token tensors share one shape. Rows are right-padded with
`pad_id` (attention_mask 0, loss_mask 0), so real tokens keep positions 0..len-1.

Run `python -m pytest tests/unit/test_batch.py`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from toolrl.rollout.trajectory import Trajectory


@dataclass
class TrainBatch:
    input_ids: Tensor  # [B, T] long, right-padded
    attention_mask: Tensor  # [B, T] long, 1 on real tokens
    loss_mask: Tensor  # [B, T] float 0/1, 1 where token t+1 was sampled by the policy
    # [B, T] float, pi_old's logprob of token t+1 on sampled columns (0 elsewhere): the
    # rollout's, or the trainer's when it recomputes them (it scores sampled columns only)
    old_logprobs: Tensor
    advantages: Tensor  # [B, T] float, the advantage of token t+1 (0 where masked out)
    ref_logprobs: Tensor | None = None  # [B, T] float, reference logprob of token t+1
    is_weights: Tensor | None = None  # [B, T] float, rollout/trainer mismatch correction
    values: Tensor | None = None  # [B, T] float, the critic's value before token t+1
    returns: Tensor | None = None  # [B, T] float, the critic's target at column t

    def __post_init__(self) -> None:
        shape = self.input_ids.shape
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None and t.shape != shape:
                raise ValueError(f"{f.name} has shape {tuple(t.shape)}, input_ids {tuple(shape)}")

    @classmethod
    def from_trajectories(
        cls, trajs: list[Trajectory], advantages: Tensor | None, pad_id: int
    ) -> TrainBatch:
        """Pad trajectories (right) into a batch; old_logprobs are the rollout's. advantages:
        [N], one scalar per trajectory on its sampled columns, or None (0 until the algorithm
        sets per-token ones, see toolrl.algo.algorithm).

        Trajectories with infra_error must already be left out by the caller.
        """
        if advantages is not None and len(trajs) != advantages.numel():
            raise ValueError(f"{len(trajs)} trajectories but {advantages.numel()} advantages")
        n, width = len(trajs), max((len(t.token_ids) for t in trajs), default=1)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros(n, width, dtype=torch.long)
        loss_mask = torch.zeros(n, width)
        old_logprobs = torch.zeros(n, width)
        for i, traj in enumerate(trajs):
            length = len(traj.token_ids)
            input_ids[i, :length] = torch.tensor(traj.token_ids, dtype=torch.long)
            attention_mask[i, :length] = 1
            # shift by one: column t predicts token t+1 (see the module docstring)
            loss_mask[i, : length - 1] = torch.tensor(traj.loss_mask[1:], dtype=torch.float32)
            old_logprobs[i, : length - 1] = torch.tensor(traj.logprobs[1:], dtype=torch.float32)
        adv = torch.zeros(n, width)
        if advantages is not None:
            adv = advantages.float().reshape(n, 1) * loss_mask  # [N, T]
        return cls(input_ids, attention_mask, loss_mask, old_logprobs * loss_mask, adv)

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Masked-in (policy-sampled) tokens: the denominator of the token-mean loss."""
        return int(self.loss_mask.sum().item())

    def _map(self, fn: Callable[[Tensor], Tensor]) -> TrainBatch:
        """Apply fn to every tensor field (None stays None)."""
        return TrainBatch(
            **{
                f.name: None if (t := getattr(self, f.name)) is None else fn(t)
                for f in fields(self)
            }
        )

    def rows(self, start: int, end: int) -> TrainBatch:
        """Rows [start, end) as a new batch (views, no copy)."""
        return self._map(lambda t: t[start:end])

    def split_sizes(self, n: int) -> list[int]:
        """The row counts of `split(n)`: they differ by at most one, larger ones first."""
        base, extra = divmod(self.size, n)
        return [base + (1 if i < extra else 0) for i in range(n)]

    def split(self, n: int) -> list[TrainBatch]:
        """n contiguous parts of `split_sizes(n)` rows (some may be empty).

        Parts are copies, not views: pickling a view (to send it to a rank) would ship the
        whole underlying storage.
        """
        parts, start = [], 0
        for size in self.split_sizes(n):
            parts.append(self.rows(start, start + size)._map(torch.clone))
            start += size
        return parts

    def balanced_rows(self, n: int) -> list[list[int]]:
        """Row indices for n data-parallel ranks: the row counts of `split_sizes(n)`, the
        token counts as even as a greedy pass makes them (longest row first, each to the rank
        holding the fewest tokens that has room), each rank's rows in batch order. Ranks wait
        for each other at every collective, so the one with the most tokens sets the pace; the
        loss divides by global counts (algo/losses.py), so any assignment gives the same step."""
        lengths = self.attention_mask.sum(dim=1).tolist()
        room, tokens = self.split_sizes(n), [0] * n
        parts: list[list[int]] = [[] for _ in range(n)]
        for i in sorted(range(self.size), key=lambda i: -lengths[i]):
            r = min((r for r in range(n) if room[r]), key=lambda r: tokens[r])
            parts[r].append(i)
            room[r], tokens[r] = room[r] - 1, tokens[r] + lengths[i]
        return [sorted(p) for p in parts]

    def select(self, rows: list[int]) -> TrainBatch:
        """These rows, in this order, as a new batch (copies)."""
        index = torch.tensor(rows, dtype=torch.long)
        return self._map(lambda t: t.index_select(0, index))

    def micro_batch_rows(self, size: int, max_tokens: int | None = None) -> list[list[int]]:
        """Row indices of each micro-batch: consecutive chunks of at most `size` rows, or, with
        `max_tokens`, rows grouped so that rows x longest row stays within that token budget
        (a row longer than the budget goes alone). The loss is a sum over tokens divided by a
        global count (algo/losses.py), so any grouping gives the same gradient."""
        if max_tokens is None:
            return [list(range(s, min(s + size, self.size))) for s in range(0, self.size, size)]
        lengths = self.attention_mask.sum(dim=1).tolist()
        order = sorted(range(self.size), key=lambda i: -lengths[i])  # longest first
        groups: list[list[int]] = []
        for i in order:  # the group's longest row is its first
            if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
                groups[-1].append(i)
            else:
                groups.append([i])
        return groups

    def micro_batches(self, size: int) -> Iterator[TrainBatch]:
        """Consecutive chunks of at most `size` rows."""
        for start in range(0, self.size, size):
            yield self.rows(start, min(start + size, self.size))

    def trimmed(self) -> TrainBatch:
        """Drop trailing columns that are padding in every row (saves compute per micro-batch)."""
        width = max(int(self.attention_mask.sum(dim=1).max().item()), 1) if self.size else 1
        return self._map(lambda t: t[:, :width])

    def to(self, device: torch.device | str) -> TrainBatch:
        return self._map(lambda t: t.to(device))
