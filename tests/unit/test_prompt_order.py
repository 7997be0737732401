"""PromptOrder: the seeded, epoch-by-epoch, resumable order the trainer draws prompts in."""

from __future__ import annotations

import json
import random

import pytest

from toolrl.data.order import PromptOrder


def walk(order: PromptOrder, batches: int, n: int = 3) -> list[int]:
    return [i for _ in range(batches) for i in order.next_indices(n)]


def test_epoch_zero_is_the_plain_seeded_shuffle():
    # The default run's prompts (and so its README metrics) were drawn this way before the
    # order moved out of the trainer: it must stay so.
    expected = list(range(50))
    random.Random(7).shuffle(expected)
    assert walk(PromptOrder(50, seed=7), 5, n=10) == expected


def test_each_epoch_is_a_fresh_permutation_of_every_prompt():
    a, b, other = PromptOrder(8, 1), PromptOrder(8, 1), PromptOrder(8, 2)
    seq = walk(a, 8)  # 24 indices: three epochs of 8, batches crossing epoch ends
    assert seq == walk(b, 8) and seq != walk(other, 8)
    epochs = [seq[i : i + 8] for i in range(0, 24, 8)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    assert a.state_dict() == {"seed": 1, "epoch": 3, "position": 0, "num_prompts": 8}


def test_resume_continues_exactly_and_refuses_another_order():
    first = PromptOrder(8, 1)
    reference = walk(PromptOrder(8, 1), 8)
    walk(first, 3)  # 9 indices: into the second epoch
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON checkpoint
    resumed = PromptOrder(8, 1)
    resumed.load_state_dict(state)
    assert walk(resumed, 5) == walk(first, 5) == reference[9:24]
    with pytest.raises(ValueError, match="does not match"):
        PromptOrder(8, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="does not match"):
        PromptOrder(9, 1).load_state_dict(state)
    with pytest.raises(ValueError, match="bad prompt-order state"):
        PromptOrder(8, 1).load_state_dict({**state, "position": 8})


def test_batches_larger_than_the_data_and_bad_sizes():
    order = PromptOrder(3, 0)
    seq = order.next_indices(7)  # two full epochs and one more
    assert sorted(seq[:3]) == sorted(seq[3:6]) == [0, 1, 2]
    assert order.state_dict()["epoch"] == 2 and order.state_dict()["position"] == 1
    with pytest.raises(ValueError, match="n must be"):
        order.next_indices(0)
    with pytest.raises(ValueError, match="no training prompts"):
        PromptOrder(0, 0)
