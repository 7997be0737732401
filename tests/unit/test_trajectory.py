"""The trajectory invariant: parallel lists, a 0/1 mask, logprobs only where the policy sampled."""

import pytest

from toolrl.rollout.trajectory import Trajectory, Turn


def _traj():
    t = Trajectory.from_prompt(0, [1, 2, 3])
    s, e = t.append_sampled([4, 5], [-0.1, -0.2])
    t.turns.append(Turn(s, e, 0, "stop"))
    t.append_context([6, 7])
    s, e = t.append_sampled([8], [-0.3])
    t.turns.append(Turn(s, e, 1, "stop"))
    return t


def test_append_keeps_ids_and_masks_in_order():
    t = _traj()
    t.check()
    assert t.token_ids == [1, 2, 3, 4, 5, 6, 7, 8]
    assert t.loss_mask == [0, 0, 0, 1, 1, 0, 0, 1]
    assert t.logprobs == [0, 0, 0, -0.1, -0.2, 0, 0, -0.3]
    assert t.response_len == 5


@pytest.mark.parametrize(
    "corrupt, msg",
    [
        (lambda t: t.loss_mask.append(0), "lengths differ"),
        (lambda t: t.loss_mask.__setitem__(5, 2), "other than 0 and 1"),
        (lambda t: t.loss_mask.__setitem__(0, 1), "prompt ids"),
        (lambda t: t.logprobs.__setitem__(5, -1.0), "masked-out"),
        (lambda t: t.logprobs.__setitem__(3, 0.5), "bad logprob"),
        (lambda t: t.turns.pop(), "turn spans"),
    ],
)
def test_check_catches_broken_invariants(corrupt, msg):
    t = _traj()
    corrupt(t)
    with pytest.raises(AssertionError, match=msg):
        t.check()


def test_sampled_ids_need_one_logprob_each():
    with pytest.raises(ValueError):
        Trajectory.from_prompt(0, [1]).append_sampled([2, 3], [-1.0])
