"""Unit tests for toolrl.algo.losses: the clipped surrogate, masking, KL, aggregation, mismatch
correction, entropy and the critic's loss (hand-computed cases). Run with pytest."""

from __future__ import annotations

import pytest
import torch

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import (
    LossConfig,
    LossScale,
    explained_variance,
    k3_kl,
    kl_estimate,
    mismatch_weights,
    policy_loss,
    value_loss,
)
from toolrl.config import MismatchConfig


def _call(logprobs, old, adv, mask, cfg=None, ref=None, num_tokens=None):  # noqa: ANN001, ANN202
    cfg = cfg or LossConfig(kl_coef=0.0)  # the surrogate alone, no reference
    n = float(mask.sum()) if num_tokens is None else num_tokens
    ids = torch.zeros(mask.shape, dtype=torch.long)
    mb = TrainBatch(ids, torch.ones_like(ids), mask, old, adv, ref)
    return policy_loss(logprobs, mb, cfg, LossScale(n, float(mask.shape[0])))


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


# --- aggregation, mismatch correction, KL, entropy, the critic, by hand ------------------------


def _mb(old, adv, mask, ref=None, is_weights=None, values=None, returns=None) -> TrainBatch:  # noqa: ANN001
    ids = torch.zeros(mask.shape, dtype=torch.long)
    return TrainBatch(ids, torch.ones_like(ids), mask, old, adv, ref, is_weights, values, returns)


def _agg_batch() -> TrainBatch:
    """Ratio 1 everywhere and A = -l, so the per-token loss is l: row 0 l = 1, 2, 3 (3 tokens),
    row 1 l = 4 (1 token; 50 is masked out), row 2 has no sampled token."""
    adv = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -50.0, 0.0], [-7.0, -7.0, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    return _mb(torch.zeros(3, 3), adv, mask)


@pytest.mark.parametrize(
    ("aggregation", "expected"),
    [
        ("token-mean", (1 + 2 + 3 + 4) / 4),  # 10 over 4 tokens = 2.5
        ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),  # row means 2 and 4 over 2 seqs = 3
        ("seq-mean-token-sum", (6 + 4) / 2),  # row sums over 2 seqs = 5
        ("seq-mean-token-sum-norm", 10 / (2 * 8)),  # 10 over 2 seqs x 8 tokens = 0.625
    ],
)
def test_aggregation_modes_by_hand(aggregation: str, expected: float) -> None:
    mb = _agg_batch()
    scale = LossScale.of(mb)
    assert scale == LossScale(num_tokens=4.0, num_seqs=2.0)  # the empty row is no sequence
    cfg = LossConfig(kl_coef=0.0, aggregation=aggregation, norm_tokens=8)
    loss, _ = policy_loss(torch.zeros(3, 3), mb, cfg, scale)
    assert loss.item() == pytest.approx(expected)


def test_unknown_aggregation_raises() -> None:
    mb = _agg_batch()
    with pytest.raises(ValueError, match="aggregation"):
        policy_loss(
            torch.zeros(3, 3), mb, LossConfig(kl_coef=0.0, aggregation="sum"), LossScale.of(mb)
        )


def _random_batch(seed: int) -> tuple[TrainBatch, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, t = 6, 7
    lengths = [7, 1, 4, 0, 6, 3]  # sampled tokens per row; row 3 has none
    mask = torch.zeros(b, t)
    for i, n in enumerate(lengths):
        mask[i, t - n :] = 1.0
    old = -torch.rand(b, t, generator=g) * 2
    logprobs = old + 0.4 * torch.randn(b, t, generator=g)  # ratios inside and outside the clip
    adv = torch.randn(b, t, generator=g) * mask
    ref = old - 0.2 * torch.rand(b, t, generator=g)
    entropy = torch.rand(b, t, generator=g) * 3
    return _mb(old * mask, adv, mask, ref=ref), logprobs, entropy


@pytest.mark.parametrize("mismatch", ["none", "seq-mask-tis"])
@pytest.mark.parametrize(
    "aggregation",
    ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"],
)
def test_row_chunks_sum_to_the_full_batch_loss(aggregation: str, mismatch: str) -> None:
    batch, lp, ent = _random_batch(0)
    cfg = LossConfig(
        kl_coef=0.1,
        entropy_coef=0.01,
        aggregation=aggregation,
        norm_tokens=16,
        mismatch=MismatchConfig(mode=mismatch, low=0.8, high=1.2),
    )
    scale = LossScale.of(batch)  # the one global scale every chunk divides by
    full_lp, full_ent = lp.clone().requires_grad_(), ent.clone().requires_grad_()
    full, _ = policy_loss(full_lp, batch, cfg, scale, full_ent)
    full.backward()
    for chunks in ([[0, 1, 2], [3, 4, 5]], [[5], [0, 3], [4, 1, 2]], [[i] for i in range(6)]):
        c_lp, c_ent = lp.clone().requires_grad_(), ent.clone().requires_grad_()
        total = torch.zeros(())
        for rows in chunks:
            loss, _ = policy_loss(c_lp[rows], batch.select(rows), cfg, scale, c_ent[rows])
            loss.backward()
            total = total + loss.detach()
        assert total.item() == pytest.approx(full.item(), abs=1e-6)
        assert torch.allclose(c_lp.grad, full_lp.grad, atol=1e-6)
        assert torch.allclose(c_ent.grad, full_ent.grad, atol=1e-6)


def test_kl_estimators_by_hand() -> None:
    lp = torch.tensor([[-1.0, -1.5, -0.7]])
    ref = torch.tensor([[-1.5, -1.0, -0.7]])
    # log pi - log ref = 0.5, -0.5, 0
    assert kl_estimate(lp, ref, "k1").tolist() == [pytest.approx([0.5, -0.5, 0.0])]
    # k2 = diff^2 / 2 = 0.125, 0.125, 0
    assert kl_estimate(lp, ref, "k2").tolist() == [pytest.approx([0.125, 0.125, 0.0])]
    # k3 with r = ref - pi = -0.5, 0.5, 0: e^-0.5 + 0.5 - 1 = 0.106531, e^0.5 - 1.5 = 0.148721
    assert kl_estimate(lp, ref, "k3").tolist() == [
        pytest.approx([0.1065307, 0.1487213, 0.0], abs=1e-6)
    ]
    with pytest.raises(ValueError, match="KL estimator"):
        kl_estimate(lp, ref, "k4")


@pytest.mark.parametrize(("estimator", "kl"), [("k1", 0.5), ("k2", 0.125), ("k3", 0.1065307)])
def test_kl_term_joins_the_loss(estimator: str, kl: float) -> None:
    lp, ref = torch.full((1, 2), -1.0), torch.full((1, 2), -1.5)
    cfg = LossConfig(kl_coef=0.1, kl_estimator=estimator)
    # ratio 1, A = 0: the surrogate is 0 and the loss is 0.1 * the per-token KL
    loss, m = _call(lp, lp.clone(), torch.zeros(1, 2), torch.ones(1, 2), cfg, ref=ref)
    assert loss.item() == pytest.approx(0.1 * kl, abs=1e-7)
    assert m["kl_ref"].item() == pytest.approx(kl, abs=1e-6)


def test_entropy_bonus_lowers_the_loss_by_coef_times_mean_entropy() -> None:
    old = torch.tensor([[-1.0, -2.0, 0.0]])
    adv, mask = torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0, 99.0]], requires_grad=True)  # 99 is masked out
    mb, scale = _mb(old, adv, mask), LossScale(2.0, 1.0)
    base, _ = policy_loss(old.clone(), mb, LossConfig(kl_coef=0.0), scale, entropy)
    cfg = LossConfig(kl_coef=0.0, entropy_coef=0.1)
    loss, m = policy_loss(old.clone(), mb, cfg, scale, entropy)
    loss.backward()
    # mean entropy over the 2 sampled tokens = 1.5 -> the loss drops by 0.1 * 1.5 = 0.15
    assert base.item() == pytest.approx(0.0) and loss.item() == pytest.approx(-0.15)
    assert m["entropy"].item() == pytest.approx(1.5)
    assert entropy.grad.tolist() == [pytest.approx([-0.05, -0.05, 0.0])]
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(old.clone(), mb, cfg, scale)


# rho per token (trainer / rollout); columns with mask 0 hold garbage rho = 100
RHO = torch.tensor([[0.4, 1.0, 100.0], [4.0, 1.0, 1.0], [3.0, 3.0, 100.0], [100.0] * 3])
RHO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
# 7 sampled tokens, 3 sequences with tokens (row 3 has none); rho mean 13.4 / 7


@pytest.mark.parametrize(
    ("mode", "weights", "tokens_cut", "seqs_masked"),
    [
        # tis: min(rho, 2); cut where rho > 2: 4.0, 3.0, 3.0 -> 3 of 7
        ("tis", [[0.4, 1.0, 0], [2.0, 1.0, 1.0], [2.0, 2.0, 0], [0, 0, 0]], 3 / 7, 0.0),
        # icepop: rho in [0.5, 2] kept, else 0: 0.4, 4.0, 3.0, 3.0 cut -> 4 of 7
        ("icepop", [[0.0, 1.0, 0], [0.0, 1.0, 1.0], [0.0, 0.0, 0], [0, 0, 0]], 4 / 7, 0.0),
        # seq-mask-tis: geometric means sqrt(0.4) = 0.63 (kept), 4^(1/3) = 1.59 (kept),
        # 3 (> 2: the whole row masked); cut: 4.0 (> 2) and row 2's two tokens -> 3 of 7;
        # 1 of 3 sequences masked
        ("seq-mask-tis", [[0.4, 1.0, 0], [2.0, 1.0, 1.0], [0.0, 0.0, 0], [0, 0, 0]], 3 / 7, 1 / 3),
    ],
)
def test_mismatch_weights_by_hand(
    mode: str, weights: list[list[float]], tokens_cut: float, seqs_masked: float
) -> None:
    log_rho = RHO.log().requires_grad_()
    w, m = mismatch_weights(log_rho, RHO_MASK, MismatchConfig(mode=mode, low=0.5, high=2.0))
    assert w.tolist() == [pytest.approx(r, abs=1e-6) for r in weights]
    assert not w.requires_grad  # weights carry no gradient
    assert m["mismatch/tokens_cut"].item() == pytest.approx(tokens_cut)
    assert m["mismatch/seqs_masked"].item() == pytest.approx(seqs_masked)
    assert m["mismatch/rho_mean"].item() == pytest.approx(13.4 / 7, rel=1e-6)


def test_mismatch_weights_unknown_mode_raises() -> None:
    with pytest.raises(ValueError, match="mismatch mode"):
        mismatch_weights(torch.zeros(1, 1), torch.ones(1, 1), MismatchConfig(mode="none"))


def test_is_weights_multiply_the_per_token_surrogate() -> None:
    old = torch.zeros(1, 2)
    lp = torch.full((1, 2), 0.1)  # ratio e^0.1 = 1.10517, inside [0.8, 1.28]
    adv, mask = torch.tensor([[1.0, -2.0]]), torch.ones(1, 2)
    mb = _mb(old, adv, mask, is_weights=torch.tensor([[0.5, 2.0]]))
    r = torch.tensor(0.1).exp().item()
    # per token -r * A = -1.10517, 2.21034; times the weights 0.5, 2 -> -0.55259, 4.42068
    expected = (-r * 1.0 * 0.5 + r * 2.0 * 2.0) / 2
    loss, m = policy_loss(lp, mb, LossConfig(kl_coef=0.0), LossScale(2.0, 1.0))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # with is_weights (recomputed old logprobs) the rollout-mode correction is not applied again
    cfg = LossConfig(kl_coef=0.0, mismatch=MismatchConfig(mode="tis", high=1.05))
    loss2, m2 = policy_loss(lp, mb, cfg, LossScale(2.0, 1.0))
    assert loss2.item() == pytest.approx(expected, rel=1e-6)
    assert not any(k.startswith("mismatch/") for k in m2)


def test_rollout_mode_tis_gradient_is_truncated_rho_times_advantage() -> None:
    # old logprobs are the rollout's: the ratio is rho itself. Token 0: rho 1.1 (< high 1.2),
    # A = 2; token 1: rho 1.25 (> high 1.2 but inside the clip, 1.25 < 1.28), A = -1.
    old = torch.tensor([[-1.0, -2.0]])
    rho = torch.tensor([[1.1, 1.25]])
    lp = (old + rho.log()).requires_grad_()
    mb = _mb(old, torch.tensor([[2.0, -1.0]]), torch.ones(1, 2))
    cfg = LossConfig(kl_coef=0.0, mismatch=MismatchConfig(mode="tis", low=0.5, high=1.2))
    loss, m = policy_loss(lp, mb, cfg, LossScale(2.0, 1.0))
    loss.backward()
    # per token -ratio * A * w / rho(detached) with w = min(rho, 1.2):
    #   value -w * A = -1.1 * 2 = -2.2 and -1.2 * -1 = 1.2 -> loss (-2.2 + 1.2) / 2 = -0.5
    #   d/dlogp = -ratio * A * w / rho / 2 = -w * A / 2 = -1.1 and 0.6
    assert loss.item() == pytest.approx(-0.5, rel=1e-6)
    assert lp.grad.tolist() == [pytest.approx([-1.1, 0.6], rel=1e-6)]
    assert m["mismatch/tokens_cut"].item() == pytest.approx(0.5)
    # without the correction the gradient is -rho * A / 2 = -1.1 and 0.625
    plain = lp.detach().clone().requires_grad_()
    policy_loss(plain, mb, LossConfig(kl_coef=0.0), LossScale(2.0, 1.0))[0].backward()
    assert plain.grad.tolist() == [pytest.approx([-1.1, 0.625], rel=1e-6)]


def test_rollout_mode_icepop_drops_tokens_outside_the_band() -> None:
    old = torch.zeros(1, 2)
    lp = torch.tensor([[0.1, -1.0]], requires_grad=True)  # rho 1.105 (kept), 0.368 (< 0.5)
    mb = _mb(old, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    cfg = LossConfig(kl_coef=0.0, mismatch=MismatchConfig(mode="icepop", low=0.5, high=2.0))
    loss, m = policy_loss(lp, mb, cfg, LossScale(2.0, 1.0))
    loss.backward()
    # token 0: w = rho, so -ratio * A * rho / rho = -1.105 (grad -1.105 / 2); token 1: w = 0
    r = torch.tensor(0.1).exp().item()
    assert loss.item() == pytest.approx(-r / 2, rel=1e-6)
    assert lp.grad.tolist() == [pytest.approx([-r / 2, 0.0], rel=1e-6)]
    assert m["mismatch/tokens_cut"].item() == pytest.approx(0.5)


# value_loss columns: V (new), V_old (rollout), R (target); clip 0.2
#   c0: V 1.0, V_old 0.5, R 2.0 -> V_clip 0.7; (1 - 2)^2 = 1 < (0.7 - 2)^2 = 1.69: the clipped
#       term wins, 0.5 * 1.69 = 0.845, and it has no gradient (the clamp is saturated)
#   c1: V 0.6, V_old 0.5, R 2.0 -> inside the clip: 0.5 * 1.4^2 = 0.98, grad (0.6 - 2) = -1.4
#   c2: V 1.0, V_old 0.5, R 0.0 -> V_clip 0.7; 1 > 0.49: unclipped wins, 0.5, grad 1.0
#   c3: masked out (garbage)
def test_value_loss_clipping_active_and_inactive() -> None:
    values = torch.tensor([[1.0, 0.6, 1.0, 1e3]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    returns = torch.tensor([[2.0, 2.0, 0.0, -1e3]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    mb = _mb(torch.zeros(1, 4), torch.zeros(1, 4), mask, values=old, returns=returns)
    loss, m = value_loss(values, mb, clip=0.2, scale=LossScale(3.0, 1.0))
    loss.backward()
    assert loss.item() == pytest.approx((0.845 + 0.98 + 0.5) / 3, rel=1e-6)
    assert values.grad.tolist() == [pytest.approx([0.0, -1.4 / 3, 1.0 / 3, 0.0], abs=1e-6)]
    assert m["value_clip_frac"].item() == pytest.approx(1 / 3)
    assert m["value_mean"].item() == pytest.approx(2.6 / 3)


def test_value_loss_without_clipping_is_half_squared_error() -> None:
    values = torch.tensor([[1.0, 3.0]])
    zeros, ones = torch.zeros(1, 2), torch.ones(1, 2)
    mb = _mb(zeros, zeros, ones, values=values.clone(), returns=torch.tensor([[0.0, 1.0]]))
    # V == V_old: both terms equal; 0.5 * (1 + 4) / 2 = 1.25
    loss, m = value_loss(values, mb, clip=0.2, scale=LossScale(2.0, 1.0))
    assert loss.item() == pytest.approx(1.25) and m["value_clip_frac"].item() == 0.0
    with pytest.raises(ValueError, match="values and returns"):
        value_loss(values, _mb(zeros, zeros, ones), 0.2, LossScale(2.0, 1.0))


def test_explained_variance_perfect_mean_and_worse() -> None:
    returns = torch.tensor([[1.0, 2.0, 77.0], [3.0, 4.0, 77.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # 77 is masked out
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)
    # predicting the mean 2.5: the error's variance is the returns' own -> 0
    assert explained_variance(torch.full((2, 3), 2.5), returns, mask) == pytest.approx(0.0)
    # reversed 4, 3, 2, 1: errors -3, -1, 1, 3, variance 20/3 vs 5/3 -> 1 - 4 = -3
    worse = torch.tensor([[4.0, 3.0, 0.0], [2.0, 1.0, 0.0]])
    assert explained_variance(worse, returns, mask) == pytest.approx(-3.0)
    # returns without spread: nothing to explain -> 0
    assert explained_variance(returns, torch.ones(2, 3), mask) == 0.0
