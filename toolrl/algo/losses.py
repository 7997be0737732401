"""The losses: the policy's clipped surrogate (with KL, entropy, mismatch correction and a choice
of aggregation) and the critic's clipped value loss.

Only tokens the policy sampled (mask == 1) count. Every loss is a sum over those tokens
divided by a denominator of the *global* mini-batch (`LossScale`), so the losses of
micro-batches and data-parallel ranks add up to one loss over the whole mini-batch, however
the rows are split. Aggregation (`loss.aggregation`):

    token-mean                 sum_it l_it / tokens                 (DAPO; the default)
    seq-mean-token-mean        sum_i (sum_t l_it / tokens_i) / seqs (the GRPO paper)
    seq-mean-token-sum         sum_it l_it / seqs
    seq-mean-token-sum-norm    sum_it l_it / (seqs * norm_tokens)   (Dr. GRPO: a constant)

Pure tensor functions; run `python -m pytest tests/unit/test_losses.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from toolrl.algo.batch import TrainBatch
from toolrl.algo.checks import AGGREGATIONS, KL_ESTIMATORS, MISMATCH_MODES
from toolrl.config import LossConfig, MismatchConfig


@dataclass(frozen=True)
class LossScale:
    """Counts of the global mini-batch that turn a sum over tokens into its aggregate."""

    num_tokens: float  # masked-in tokens
    num_seqs: float  # rows with at least one masked-in token

    @classmethod
    def of(cls, batch: TrainBatch) -> LossScale:
        seqs = (batch.loss_mask.sum(dim=1) > 0).sum().item()
        return cls(float(batch.num_tokens), float(seqs))


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask == 1 (0 when nothing is masked in). x, mask: [B, T]."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(r) - r - 1 with r = ref - pi. [B, T].

    Non-negative, unbiased for samples from pi, and 0 exactly where the two agree.
    """
    r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # clamp: exp() must not overflow
    return r.exp() - r - 1.0


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || ref) estimate on samples from pi. [B, T].

    k1 = log pi - log ref (unbiased, can be negative), k2 = (log pi - log ref)^2 / 2 (its
    gradient is the true KL's), k3 as in `k3_kl` (unbiased, non-negative).
    """
    if estimator == "k3":
        return k3_kl(logprobs, ref_logprobs)
    diff = logprobs - ref_logprobs
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    raise ValueError(f"KL estimator {estimator!r}; use one of {', '.join(KL_ESTIMATORS)}")


def mismatch_weights(
    log_rho: Tensor, mask: Tensor, cfg: MismatchConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Importance weights correcting for the rollout engine sampling from a slightly different
    policy than the trainer's: log_rho = log pi_trainer - log pi_rollout, [B, T].

        tis           w = min(rho, high)                                 (truncated IS)
        icepop        w = rho where low <= rho <= high, else 0           (token masking)
        seq-mask-tis  w = min(rho, high), and 0 on every token of a sequence whose
                      geometric-mean rho leaves [low, high]              (sequence masking)

    Returns (w [B, T], 0 off the mask; metrics: fraction of tokens clipped / masked, of
    sequences masked, and the mean rho). Weights carry no gradient.
    """
    log_rho = log_rho.detach().clamp(-20.0, 20.0)
    rho = log_rho.exp()  # [B, T]
    seq_keep = torch.ones(mask.shape[0], dtype=torch.bool, device=mask.device)  # [B]
    if cfg.mode == "tis":
        w, cut = rho.clamp(max=cfg.high), rho > cfg.high
    elif cfg.mode == "icepop":
        keep = (rho >= cfg.low) & (rho <= cfg.high)
        w, cut = torch.where(keep, rho, torch.zeros_like(rho)), ~keep
    elif cfg.mode == "seq-mask-tis":
        seq_rho = ((log_rho * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).exp()  # [B]
        seq_keep = (seq_rho >= cfg.low) & (seq_rho <= cfg.high)
        w = rho.clamp(max=cfg.high) * seq_keep[:, None]
        cut = (rho > cfg.high) | ~seq_keep[:, None]
    else:
        raise ValueError(f"mismatch mode {cfg.mode!r}; use one of {', '.join(MISMATCH_MODES)}")
    rows = mask.sum(dim=1) > 0
    metrics = {
        "mismatch/rho_mean": masked_mean(rho, mask),
        "mismatch/tokens_cut": masked_mean(cut.float(), mask),
        "mismatch/seqs_masked": (~seq_keep & rows).float().sum() / rows.sum().clamp(min=1),
    }
    return w * mask, metrics


def policy_loss(
    logprobs: Tensor,
    mb: TrainBatch,
    cfg: LossConfig,
    scale: LossScale,
    entropy: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (+ kl_coef * KL, - entropy_coef * entropy), aggregated per `cfg`.

    logprobs: [B, T] with the gradient; mb holds the micro-batch's [B, T] tensors (see
    algo/batch.py); entropy: [B, T] with the gradient, needed when entropy_coef > 0.
    Returns (scalar loss, metrics); metrics are means over this call's masked tokens
    (ratio_max is a max), detached.
    """
    mask = (mb.loss_mask > 0).to(logprobs.dtype)
    log_ratio = (logprobs - mb.old_logprobs).clamp(-20.0, 20.0)  # clamp: padding can't overflow
    ratio = log_ratio.exp()  # [B, T]
    unclipped = ratio * mb.advantages
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * mb.advantages
    per_token = -torch.minimum(unclipped, clipped)  # pessimistic bound, [B, T]
    extra: dict[str, Tensor] = {}
    if mb.is_weights is not None:  # recomputed old logprobs: weights came from the driver
        per_token = per_token * mb.is_weights
    elif cfg.mismatch.mode != "none":
        # old logprobs are the rollout's, so the ratio already carries rho = pi / pi_rollout:
        # the weight divides it out again (w / rho), keeping only truncation and masking.
        w, extra = mismatch_weights(logprobs - mb.old_logprobs, mask, cfg.mismatch)
        per_token = per_token * w / ratio.detach()
    kl_ref = torch.zeros_like(per_token)
    if cfg.kl_coef > 0:
        if mb.ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl_ref = kl_estimate(logprobs, mb.ref_logprobs, cfg.kl_estimator)
        per_token = per_token + cfg.kl_coef * kl_ref
    elif mb.ref_logprobs is not None:
        kl_ref = k3_kl(logprobs, mb.ref_logprobs)  # still worth logging
    if cfg.entropy_coef > 0:
        if entropy is None:
            raise ValueError("entropy_coef > 0 needs the entropy")
        per_token = per_token - cfg.entropy_coef * entropy
    loss = _aggregate(per_token, mask, cfg, scale)
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "kl_ref": masked_mean(kl_ref, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio * mask).max() if mask.any() else ratio.new_tensor(0.0),
            **extra,
        }
        if entropy is not None:
            metrics["entropy"] = masked_mean(entropy, mask)
    return loss, {k: v.detach() for k, v in metrics.items()}


def _aggregate(per_token: Tensor, mask: Tensor, cfg: LossConfig, scale: LossScale) -> Tensor:
    """Sum per_token [B, T] over mask and divide per the aggregation mode (module docstring)."""
    if cfg.aggregation == "seq-mean-token-mean":
        per_token = per_token / mask.sum(dim=1, keepdim=True).clamp(min=1)
    # where(), not a product, so padding can never leak a NaN into the sum
    total = torch.where(mask > 0, per_token, torch.zeros_like(per_token)).sum()
    if cfg.aggregation == "token-mean":
        return total / scale.num_tokens
    if cfg.aggregation == "seq-mean-token-sum-norm":
        return total / (scale.num_seqs * cfg.norm_tokens)
    if cfg.aggregation in ("seq-mean-token-mean", "seq-mean-token-sum"):
        return total / scale.num_seqs
    raise ValueError(f"aggregation {cfg.aggregation!r}; use one of {', '.join(AGGREGATIONS)}")


def value_loss(
    values: Tensor, mb: TrainBatch, clip: float, scale: LossScale
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss, token-mean over the global mini-batch.

    values: [B, T] with the gradient; mb.values are the critic's values at rollout time and
    mb.returns the targets, both [B, T]. 0.5 * max((V - R)^2, (V_clip - R)^2) with
    V_clip = V_old + clamp(V - V_old, -clip, clip): the value moves at most `clip` per update.
    """
    if mb.values is None or mb.returns is None:
        raise ValueError("the value loss needs the batch's values and returns")
    mask = (mb.loss_mask > 0).to(values.dtype)
    v_clipped = mb.values + (values - mb.values).clamp(-clip, clip)
    unclipped, clipped = (values - mb.returns).square(), (v_clipped - mb.returns).square()
    per_token = 0.5 * torch.maximum(unclipped, clipped)
    loss = torch.where(mask > 0, per_token, torch.zeros_like(per_token)).sum() / scale.num_tokens
    with torch.no_grad():
        metrics = {
            "value_clip_frac": masked_mean((clipped > unclipped).float(), mask),
            "value_mean": masked_mean(values, mask),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over mask == 1: 1 is a perfect critic, 0 one
    that predicts the mean, below 0 worse than that. [B, T] each."""
    n = mask.sum().clamp(min=2)
    r_mean = (returns * mask).sum() / n
    var_r = ((returns - r_mean).square() * mask).sum() / (n - 1)
    err = (returns - values) * mask
    var_e = ((err - err.sum() / n).square() * mask).sum() / (n - 1)
    return float(1.0 - var_e / var_r) if var_r > 0 else 0.0
