"""The policy loss: token-level clipped surrogate with an optional KL penalty to a reference.

Only tokens the policy sampled (mask == 1) count. The sum over those tokens is divided
by `num_tokens`, the number of masked-in tokens in the *global* batch, so the losses of
micro-batches and data-parallel ranks add up to one token-mean over the whole batch.
Pure tensor functions; run `python -m pytest tests/unit/test_losses.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from toolrl.config import LossConfig


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over mask == 1 (0 when nothing is masked in). x, mask: [B, T]."""
    return (x * mask).sum() / mask.sum().clamp(min=1)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi || ref): exp(r) - r - 1 with r = ref - pi. [B, T].

    Non-negative, unbiased for samples from pi, and 0 exactly where the two agree.
    """
    r = (ref_logprobs - logprobs).clamp(-20.0, 20.0)  # clamp: exp() must not overflow
    return r.exp() - r - 1.0


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    ref_logprobs: Tensor | None,
    num_tokens: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped surrogate (+ kl_coef * k3 KL) summed over masked tokens, divided by num_tokens.

    All inputs [B, T]; `logprobs` carries the gradient. Returns (scalar loss, metrics);
    metrics are means over this call's masked tokens (ratio_max is a max), detached.
    """
    mask = (mask > 0).to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # clamp: padding must not overflow
    ratio = log_ratio.exp()  # [B, T]
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)  # pessimistic bound, [B, T]
    kl_ref = torch.zeros_like(per_token)
    if cfg.kl_coef > 0:
        if ref_logprobs is None:
            raise ValueError("kl_coef > 0 needs ref_logprobs")
        kl_ref = k3_kl(logprobs, ref_logprobs)
        per_token = per_token + cfg.kl_coef * kl_ref
    elif ref_logprobs is not None:
        kl_ref = k3_kl(logprobs, ref_logprobs)  # still worth logging
    # where(), not a product, so padding can never leak a NaN into the sum
    loss = torch.where(mask > 0, per_token, torch.zeros_like(per_token)).sum() / num_tokens
    with torch.no_grad():
        metrics = {
            "clip_frac": masked_mean((clipped < unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio.square(), mask),
            "kl_ref": masked_mean(kl_ref, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": (ratio * mask).max() if mask.any() else ratio.new_tensor(0.0),
        }
    return loss, {k: v.detach() for k, v in metrics.items()}
