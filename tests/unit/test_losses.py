"""Unit tests for toolrl.algo.losses: the clipped surrogate, masking and the k3 KL."""

from __future__ import annotations

import pytest
import torch

from toolrl.algo.losses import LossConfig, k3_kl, policy_loss


def _call(logprobs, old, adv, mask, cfg=None, ref=None, num_tokens=None):  # noqa: ANN001, ANN202
    cfg = cfg or LossConfig(kl_coef=0.0)  # the surrogate alone, no reference
    n = float(mask.sum()) if num_tokens is None else num_tokens
    return policy_loss(logprobs, old, adv, mask, cfg, ref, n)


def test_ratio_one_gives_minus_mean_advantage_on_masked_tokens() -> None:
    old = torch.randn(2, 4)
    adv = torch.tensor([[1.0, 2.0, 3.0, 100.0], [-1.0, 5.0, 7.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    loss, m = _call(old.clone(), old, adv, mask)
    assert loss.item() == pytest.approx(-(1 + 2 + 3 - 1 + 5) / 5)
    assert m["ratio_mean"].item() == pytest.approx(1.0)
    assert m["clip_frac"].item() == 0.0 and m["approx_kl"].item() == 0.0


def test_num_tokens_is_the_global_denominator() -> None:
    old = torch.zeros(1, 3)
    adv, mask = torch.ones(1, 3), torch.ones(1, 3)
    loss, _ = _call(old.clone(), old, adv, mask, num_tokens=6.0)  # another half elsewhere
    assert loss.item() == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("log_ratio", "adv", "clipped", "grad_zero"),
    [
        (0.5, 1.0, True, True),  # ratio 1.65 > 1.28 with A > 0: clipped, no gradient
        (0.5, -1.0, False, False),  # ratio high with A < 0: unclipped (pessimistic), gradient
        (-0.5, -1.0, True, True),  # ratio 0.61 < 0.8 with A < 0: clipped
        (-0.5, 1.0, False, False),  # ratio low with A > 0: unclipped
        (0.2, 1.0, False, False),  # 1.22 < 1 + clip_high 1.28: inside the asymmetric band
    ],
)
def test_clipping_both_sides(log_ratio: float, adv: float, clipped: bool, grad_zero: bool) -> None:
    logprobs = torch.tensor([[log_ratio]], requires_grad=True)
    loss, m = _call(logprobs, torch.zeros(1, 1), torch.tensor([[adv]]), torch.ones(1, 1))
    loss.backward()
    ratio = torch.tensor(log_ratio).exp().item()
    bound = 1.28 if log_ratio > 0 else 0.8
    expected = -(bound if clipped else ratio) * adv
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["clip_frac"].item() == float(clipped)
    assert (logprobs.grad.abs().item() == 0.0) == grad_zero


def test_symmetric_clip_when_clip_high_equals_clip_low() -> None:
    cfg = LossConfig(clip_low=0.2, clip_high=0.2, kl_coef=0.0)
    loss, m = _call(
        torch.tensor([[0.2]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1), cfg
    )
    assert loss.item() == pytest.approx(-1.2) and m["clip_frac"].item() == 1.0


def test_masked_positions_get_zero_gradient_even_with_garbage() -> None:
    logprobs = torch.tensor([[-1.0, -2.0, 50.0], [-0.5, -3.0, -1e4]], requires_grad=True)
    old = torch.tensor([[-1.1, -2.0, 0.0], [-0.4, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.9, 0.0], [-0.6, 0.0, 0.0]])
    loss, m = _call(logprobs, old, torch.randn(2, 3), mask, LossConfig(kl_coef=0.5), ref)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in m.values())
    assert (logprobs.grad[mask == 0] == 0).all()
    assert (logprobs.grad[mask == 1] != 0).all()
    assert m["ratio_max"].item() == pytest.approx(torch.tensor(0.1).exp().item())


def test_k3_kl_zero_at_reference_and_positive_elsewhere() -> None:
    lp = torch.randn(3, 5)
    assert torch.equal(k3_kl(lp, lp), torch.zeros(3, 5))
    assert (k3_kl(lp, lp + 0.3) > 0).all()
    cfg = LossConfig(kl_coef=1.0)
    loss, m = _call(lp.clone(), lp, torch.zeros(3, 5), torch.ones(3, 5), cfg, ref=lp.clone())
    assert loss.item() == 0.0 and m["kl_ref"].item() == 0.0
    loss, m = _call(lp.clone(), lp, torch.zeros(3, 5), torch.ones(3, 5), cfg, ref=lp - 0.1)
    k3 = torch.tensor(-0.1).exp().item() + 0.1 - 1
    assert loss.item() == pytest.approx(k3, rel=1e-4) and m["kl_ref"].item() == pytest.approx(
        k3, rel=1e-4
    )


def test_kl_needs_reference() -> None:
    with pytest.raises(ValueError):
        _call(
            torch.zeros(1, 1),
            torch.zeros(1, 1),
            torch.ones(1, 1),
            torch.ones(1, 1),
            LossConfig(kl_coef=0.1),
        )
