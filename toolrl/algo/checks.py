"""Checks of the algorithm settings before Ray starts (called by `toolrl.validate.validate`).

No torch here: validating a config must stay cheap. The estimator is built (it is a small
dataclass) so that what it needs (a critic, groups, token rewards) is checked against the
rest of the config.
"""

from __future__ import annotations

import os

from toolrl.config import Config, CriticConfig, build_target, resolve_target
from toolrl.validate import check, check_micro_batches

# The choices of string settings, here so that checking a config needs no torch.
AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
KL_ESTIMATORS = ("k1", "k2", "k3")
MISMATCH_MODES = ("none", "tis", "icepop", "seq-mask-tis")
OLD_LOGPROBS = ("recompute", "rollout")


def check_algorithm(cfg: Config) -> bool:
    """The estimator builds and says what it needs; the loss settings are known values.
    Returns whether the run keeps a critic."""
    a, r, loss = cfg.algorithm, cfg.rollout, cfg.algorithm.loss
    resolve_target("algorithm.advantages", a.advantages)
    est = build_target("algorithm.advantages", a.advantages)
    name = type(est).__name__
    for attr in ("needs_critic", "needs_groups", "token_level"):
        check(
            hasattr(est, attr),
            "algorithm.advantages",
            f"{name} has no `{attr}`; an estimator says what it needs (see Estimator in "
            "toolrl/algo/advantages.py)",
        )
    check(
        r.n >= 2 or not (est.needs_groups or a.dynamic_sampling),
        "rollout.n",
        f"is {r.n}; {name} compares the samples of a prompt with each other, use >= 2",
    )
    one_of(a.old_logprobs, OLD_LOGPROBS, "algorithm.old_logprobs")
    check(0 < loss.clip_low < 1, "algorithm.loss.clip_low", "must be in (0, 1)")
    check(loss.clip_high > 0, "algorithm.loss.clip_high", "must be > 0")
    check(loss.kl_coef >= 0, "algorithm.loss.kl_coef", "must be >= 0")
    one_of(loss.kl_estimator, KL_ESTIMATORS, "algorithm.loss.kl_estimator")
    check(loss.entropy_coef >= 0, "algorithm.loss.entropy_coef", "must be >= 0")
    one_of(loss.aggregation, AGGREGATIONS, "algorithm.loss.aggregation")
    check(
        loss.aggregation != "seq-mean-token-sum-norm" or (loss.norm_tokens or 0) >= 1,
        "algorithm.loss.norm_tokens",
        "seq-mean-token-sum-norm divides by this constant; set it, e.g. to the token budget "
        "${rollout.max_total_tokens}",
    )
    m = loss.mismatch
    one_of(m.mode, MISMATCH_MODES, "algorithm.loss.mismatch.mode")
    check(0 < m.low <= 1 <= m.high, "algorithm.loss.mismatch", "needs 0 < low <= 1 <= high")
    check(a.kl_in_reward >= 0, "algorithm.kl_in_reward", "must be >= 0")
    check(
        a.kl_in_reward == 0 or est.token_level,
        "algorithm.kl_in_reward",
        f"{name} scores whole trajectories and never reads token rewards; use "
        "algorithm.loss.kl_coef (KL as a loss term) instead",
    )
    check(a.max_sampling_rounds >= 1, "algorithm.max_sampling_rounds", "must be >= 1")
    check(a.overlong_penalty >= 0, "algorithm.overlong_penalty", "must be >= 0")
    check(
        0 <= a.overlong_buffer < r.max_total_tokens,
        "algorithm.overlong_buffer",
        f"must be in [0, rollout.max_total_tokens={r.max_total_tokens})",
    )
    if est.needs_critic:
        check_critic(a.critic)
    return bool(est.needs_critic)


def check_critic(c: CriticConfig) -> None:
    check(c.value_clip > 0, "algorithm.critic.value_clip", "must be > 0")
    check(c.optim.lr > 0, "algorithm.critic.optim.lr", "must be > 0")
    check(c.group.world_size >= 1, "algorithm.critic.group.world_size", "must be >= 1")
    check_micro_batches(c.group, "algorithm.critic.group")
    check(
        c.path is None or os.path.isfile(os.path.join(c.path, "config.json")),
        "algorithm.critic.path",
        f"{c.path!r} is not a Hugging Face model folder (no config.json); use null to start "
        "from the policy's weights",
    )


def one_of(value: str, choices: tuple[str, ...], key: str) -> None:
    check(value in choices, key, f"is {value!r}; use one of {', '.join(choices)}")
