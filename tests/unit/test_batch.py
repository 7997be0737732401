"""Unit tests for toolrl.algo.batch: padding, the one-token shift, split and micro-batches."""

from __future__ import annotations

import pickle

import pytest
import torch

from toolrl.algo.batch import TrainBatch
from toolrl.rollout.trajectory import Trajectory


def _traj(prompt: list[int], sampled: list[int], tool: list[int], more: list[int]) -> Trajectory:
    t = Trajectory.from_prompt(0, prompt)
    t.append_sampled(sampled, [-0.1 * (i + 1) for i in range(len(sampled))])
    t.append_context(tool)
    t.append_sampled(more, [-1.0] * len(more))
    return t


def _batch(n: int = 3) -> TrainBatch:
    trajs = [_traj([1, 2, 3], [10, 11], [50], [12] * i) for i in range(n)]
    return TrainBatch.from_trajectories(trajs, torch.arange(n, dtype=torch.float32) + 1, pad_id=0)


def test_padding_and_shift_by_one() -> None:
    a = _traj([1, 2, 3], [10, 11], [50, 51], [12])  # 8 ids
    b = _traj([1, 2], [20], [], [])  # 3 ids
    batch = TrainBatch.from_trajectories([a, b], torch.tensor([2.0, -1.0]), pad_id=99)
    assert batch.input_ids.tolist() == [[1, 2, 3, 10, 11, 50, 51, 12], [1, 2, 20] + [99] * 5]
    assert batch.attention_mask.tolist() == [[1] * 8, [1] * 3 + [0] * 5]
    # column t is 1 when token t+1 was sampled: ids 10, 11 at 3, 4 -> columns 2, 3; 12 at 7 -> 6
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0, 0, 1, 0], [0, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.old_logprobs[0].tolist() == pytest.approx([0, 0, -0.1, -0.2, 0, 0, -1.0, 0])
    assert batch.advantages.tolist() == [[0, 0, 2, 2, 0, 0, 2, 0], [0, -1, 0, 0, 0, 0, 0, 0]]
    assert batch.num_tokens == 4 and batch.size == 2
    assert batch.input_ids.dtype == torch.long and batch.ref_logprobs is None


def test_mismatched_lengths_raise() -> None:
    with pytest.raises(ValueError):
        TrainBatch.from_trajectories([_traj([1], [2], [], [])], torch.zeros(2), pad_id=0)
    with pytest.raises(ValueError):
        TrainBatch(*(torch.zeros(2, 3) for _ in range(4)), torch.zeros(2, 4))


@pytest.mark.parametrize(
    ("n", "parts", "sizes"), [(5, 2, [3, 2]), (7, 3, [3, 2, 2]), (1, 2, [1, 0])]
)
def test_split_is_even_ordered_and_complete(n: int, parts: int, sizes: list[int]) -> None:
    batch = _batch(n)
    batch.ref_logprobs = torch.randn(batch.input_ids.shape)
    split = batch.split(parts)
    assert [p.size for p in split] == sizes
    assert all(p.input_ids.shape[1] == batch.input_ids.shape[1] for p in split)
    for name in ("input_ids", "loss_mask", "advantages", "ref_logprobs"):
        assert torch.equal(torch.cat([getattr(p, name) for p in split]), getattr(batch, name))
    assert sum(p.num_tokens for p in split) == batch.num_tokens


def test_split_parts_do_not_pickle_the_whole_batch() -> None:
    batch = _batch(40)
    part = batch.split(4)[0]
    assert len(pickle.dumps(part)) < len(pickle.dumps(batch)) / 2


def test_micro_batches_and_trim() -> None:
    batch = _batch(5)
    micro = list(batch.micro_batches(2))
    assert [m.size for m in micro] == [2, 2, 1]
    assert torch.equal(torch.cat([m.old_logprobs for m in micro]), batch.old_logprobs)
    first = micro[0].trimmed()  # rows of 6 and 7 ids in a batch 10 wide
    assert first.input_ids.shape == (2, 7) and first.loss_mask.shape == (2, 7)
    assert first.num_tokens == micro[0].num_tokens


def _lengths_batch(lengths: list[int], width: int = 12) -> TrainBatch:
    """Rows with these many real tokens (right-padded); row i's ids are all i."""
    n = len(lengths)
    ids = torch.arange(n).reshape(n, 1).repeat(1, width)
    attn = torch.zeros(n, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        attn[i, :length] = 1
    mask = attn[:, 1:].float()
    mask = torch.cat([mask, torch.zeros(n, 1)], dim=1)  # the last real column has no target
    per_row = torch.arange(n, dtype=torch.float32).reshape(n, 1) * torch.ones(n, width)
    return TrainBatch(
        ids, attn, mask, -per_row, per_row, per_row + 0.5, per_row + 0.25, per_row + 1, per_row + 2
    )


LENGTHS = [3, 9, 5, 1, 7, 7, 2, 12]


def test_micro_batch_rows_fixed_split_without_budget() -> None:
    batch = _lengths_batch(LENGTHS)
    assert batch.micro_batch_rows(3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert batch.micro_batch_rows(8) == [list(range(8))]


def test_micro_batch_rows_by_hand() -> None:
    batch = _lengths_batch(LENGTHS)
    # longest first: 12 (row 7), 9 (1), 7 (4), 7 (5), 5 (2), 3 (0), 2 (6), 1 (3); budget 14:
    #   [7] 12; +1 -> 2 x 12 > 14: [1] 9; +4 -> 2 x 9 > 14: [4] 7; +5 -> 2 x 7 = 14 fits
    #   +2 -> 3 x 7 > 14: [2] 5; +0 -> 2 x 5 = 10 fits; +6 -> 3 x 5 > 14: [6] 2; +3 -> 4 fits
    assert batch.micro_batch_rows(2, max_tokens=14) == [[7], [1], [4, 5], [2, 0], [6, 3]]


@pytest.mark.parametrize("max_tokens", [1, 5, 10, 14, 24, 100])
def test_micro_batch_rows_respect_the_budget(max_tokens: int) -> None:
    batch = _lengths_batch(LENGTHS)
    groups = batch.micro_batch_rows(2, max_tokens=max_tokens)
    assert sorted(i for g in groups for i in g) == list(range(len(LENGTHS)))  # each row once
    for g in groups:
        longest = max(LENGTHS[i] for i in g)
        assert len(g) * longest <= max_tokens or len(g) == 1
        part = batch.select(g).trimmed()  # what the trainer runs: the padded width is longest
        assert part.input_ids.shape == (len(g), longest)
    if max_tokens >= 8 * 12:
        assert len(groups) == 1  # everything fits at once


def test_select_keeps_the_given_order_and_every_field() -> None:
    batch = _lengths_batch(LENGTHS)
    part = batch.select([5, 0, 3])
    assert part.input_ids[:, 0].tolist() == [5, 0, 3]
    for name in ("old_logprobs", "advantages", "ref_logprobs", "is_weights", "values", "returns"):
        full = getattr(batch, name)
        assert torch.equal(getattr(part, name), full[[5, 0, 3]]), name
    part.advantages[0, 0] = 1e9  # a copy: the batch is untouched
    assert batch.advantages[5, 0].item() == 5.0


def test_new_fields_are_shape_checked_and_carried_by_split() -> None:
    batch = _lengths_batch(LENGTHS)
    halves = batch.split(2)
    for name in ("is_weights", "values", "returns"):
        assert torch.equal(torch.cat([getattr(h, name) for h in halves]), getattr(batch, name))
    with pytest.raises(ValueError, match="returns"):
        TrainBatch(*(torch.zeros(2, 3) for _ in range(8)), torch.zeros(2, 4))


def test_balanced_rows_even_out_tokens_across_ranks() -> None:
    batch = _lengths_batch([10, 10, 1, 1], width=10)  # contiguous halves: 20 and 2 tokens
    assert batch.balanced_rows(2) == [[0, 2], [1, 3]]  # 11 and 11
    assert _lengths_batch([5], width=5).balanced_rows(3) == [[0], [], []]


@pytest.mark.parametrize("seed", range(20))
def test_balanced_rows_keep_split_sizes_and_a_spread_under_the_longest_row(seed: int) -> None:
    """Fuzzed lengths (long-tailed, as turn counts make them): every row once, each rank's
    rows in batch order and as many as `split` gives it, and the ranks' token counts apart
    by at most the longest row (the greedy pass places rows longest first)."""
    gen = torch.Generator().manual_seed(seed)
    n_rows, ranks = int(torch.randint(1, 70, (1,), generator=gen)), 1 + seed % 4
    lengths = (torch.empty(n_rows).exponential_(generator=gen) * 80).long().add(3).tolist()
    batch = _lengths_batch(lengths, width=max(lengths))
    parts = batch.balanced_rows(ranks)
    assert sorted(i for p in parts for i in p) == list(range(n_rows))
    assert all(p == sorted(p) for p in parts)
    assert [len(p) for p in parts] == batch.split_sizes(ranks)
    tokens = [sum(lengths[i] for i in p) for p in parts]
    assert max(tokens) - min(tokens) <= max(lengths)
    contiguous = [int(p.attention_mask.sum()) for p in batch.split(ranks)]
    assert max(tokens) <= max(contiguous)
