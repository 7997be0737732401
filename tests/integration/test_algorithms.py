"""Every shipped algorithm (conf/algorithm/*.yaml) takes a real training step: vLLM rollouts
through Ray, the FSDP2 policy, reference and critic, on the embedded model.

One rollout group and one training group (policy + reference + colocated critic) are shared
by all algorithms; the algorithm passes its own loss settings with each update. A second run
of PPO uses a critic in its own group. Run `python -m pytest tests/integration/test_algorithms.py`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from toolrl.config import Config, register, to_config
from toolrl.validate import validate

CONF = str(Path(__file__).resolve().parents[2] / "conf")
ALGORITHMS = sorted(p.stem for p in Path(CONF, "algorithm").glob("*.yaml"))
SMALL = ["trainer.prompts_per_step=2", "rollout.n=4", "trainer.train_group.micro_batch_size=4"]


def load(*overrides: str) -> Config:
    register()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = to_config(compose("config", overrides=[*SMALL, *overrides]))
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def groups(embedded_model: str, tmp_path_factory: pytest.TempPathFactory):
    """(rollout group, train group with policy + reference + critic, a critic-only group)."""
    ray = pytest.importorskip("ray")
    from toolrl.config import CriticConfig, TrainGroupConfig
    from toolrl.main import rollout_spec
    from toolrl.workers.rollout import RolloutGroup
    from toolrl.workers.train_group import CriticRole, PolicyRole, TrainGroup

    cfg = load()
    ray.init(num_cpus=2, include_dashboard=False)
    c = CriticConfig()
    critic = CriticRole(embedded_model, True, c.optim, c.value_clip)
    t = cfg.trainer
    try:
        rollout = RolloutGroup(rollout_spec(cfg, embedded_model, None), 1, 0.5, 0.0)
        train = TrainGroup(t.train_group, embedded_model, PolicyRole(t.optim, True), critic)
        own = TrainGroup(TrainGroupConfig(world_size=1, num_cpus_per_worker=0.25), "", None, critic)
        yield rollout, train, own
        rollout.shutdown()  # also removes the last pushed weights file from /dev/shm
    finally:
        ray.shutdown()


def _trainer(groups, embedded_model: str, tmp_path: Path, *overrides: str, own_critic=False):
    from transformers import AutoTokenizer

    from toolrl.algo.algorithm import Algorithm
    from toolrl.config import build_task
    from toolrl.metrics import MetricsLogger
    from toolrl.trainer import Trainer

    rollout, train, own = groups
    cfg = load(*overrides)
    algorithm = Algorithm(cfg.algorithm, cfg.rollout.max_total_tokens)
    logger = MetricsLogger(str(tmp_path), 1, "disabled", "t", None, {}, progress_bar=False)
    tokenizer = AutoTokenizer.from_pretrained(embedded_model)
    trainer = Trainer(
        cfg,
        build_task(cfg.task),
        algorithm,
        rollout,
        train,
        logger,
        tokenizer.pad_token_id,
        embedded_model,
        critic=own if own_critic else train,
    )
    return trainer, algorithm, logger


def _one_step(groups, embedded_model: str, tmp_path: Path, *overrides: str, own_critic=False):
    rollout, train, _ = groups
    # the policy as the cases before left it, in the engines too: this step starts on-policy
    rollout.load_weights(train.weights(), version=0)
    trainer, algorithm, logger = _trainer(
        groups, embedded_model, tmp_path, *overrides, own_critic=own_critic
    )
    metrics = trainer.step(0)
    logger.close()
    return algorithm, metrics


# Every shipped algorithm once; the mismatch corrections and the critic's own group ride on
# some of them, so the module takes one step per algorithm plus one.
CASES = {
    "grpo": ("algorithm.loss.mismatch.mode=seq-mask-tis",),
    "ppo": (),
    # its own group's CPUs count in validation: 1 + 2 x 0.25 + 0.25 fit the 2 cores
    "ppo-own-critic": (
        "algorithm.critic.colocate=false",
        "trainer.train_group.num_cpus_per_worker=0.25",
    ),
    "dapo": (),
    "drgrpo": (),
    "rloo": ("algorithm.old_logprobs=rollout", "algorithm.loss.mismatch.mode=icepop"),
    "reinforce_pp": (),
    "gdpo": (),
}


def test_every_shipped_algorithm_has_a_case():
    assert sorted({case.split("-")[0] for case in CASES}) == ALGORITHMS


@pytest.mark.parametrize("case", CASES)
def test_algorithm_takes_a_training_step(case, groups, embedded_model, tmp_path):
    name, extra = case.split("-")[0], CASES[case]
    own_critic = "algorithm.critic.colocate=false" in extra
    algorithm, m = _one_step(
        groups, embedded_model, tmp_path, f"algorithm={name}", *extra, own_critic=own_critic
    )
    assert m["train/num_tokens"] > 0 and math.isfinite(m["train/loss"])
    # the loss reached the weights, unless every group's samples scored alike (no signal)
    assert m["train/grad_norm"] > 0 or m["train/advantage_abs"] == 0
    assert ("critic/value_loss" in m) == algorithm.needs_critic
    if algorithm.needs_critic:
        assert math.isfinite(m["critic/explained_variance"]) and m["critic/value_grad_norm"] > 0
        assert m["critic/value_loss"] > 0
    if name == "dapo":
        assert 1 <= m["train/sampling_rounds"] <= 3 and m["train/groups_kept"] <= 2
        assert m["train/overlong_penalty"] <= 0
    if algorithm.cfg.loss.mismatch.mode != "none":
        # engine and trainer agree on CPU float32: nothing cut, rho ~ 1. In rollout mode the
        # metrics are the last mini-batch's, one update (lr 3e-4) after the rollout: a rare
        # low-probability token moves more than 2x (1 of 68 after the cases before this one)
        recomputed = algorithm.cfg.old_logprobs == "recompute"
        assert m["train/mismatch/tokens_cut"] < (0.001 if recomputed else 0.05)
        assert m["train/mismatch/rho_mean"] == pytest.approx(1.0, abs=0.05)
    if algorithm.cfg.old_logprobs == "rollout":
        assert "rollout/logprob_diff_max" not in m  # no recompute pass
    else:
        assert m["rollout/logprob_diff_max"] < 1e-3


def test_overlapped_steps_train_on_batches_one_update_old(groups, embedded_model, tmp_path):
    """max_staleness=1: batch k+1 is rolled out during update k with the weights before it;
    every turn records the version that sampled it, and none is more than one update old."""
    rollout, train, _ = groups
    rollout.load_weights(train.weights(), version=0)  # the shared engines: start on-policy
    overrides = ("trainer.max_staleness=1", "algorithm.loss.mismatch.mode=tis")
    trainer, _, logger = _trainer(
        groups, embedded_model, tmp_path, *overrides, "trainer.total_steps=3"
    )
    seen = []
    real_update = trainer._update

    def update(batch, kept):  # what each update trains on, and what is in flight meanwhile
        seen.append(({t.weight_version for tr in kept for t in tr.turns}, trainer.next_rollout))
        return real_update(batch, kept)

    trainer._update = update
    metrics = [trainer.step(k) for k in range(3)]
    logger.close()
    assert [versions for versions, _ in seen] == [{0}, {0}, {1}]
    assert [m["train/staleness_max"] for m in metrics] == [0, 1, 1]
    assert seen[0][1] is not None and seen[1][1] is not None  # the next rollout was running
    assert seen[2][1] is None and trainer.next_rollout is None  # no rollout past the end
    assert "time/weight_sync_s" in metrics[1] and trainer.engine_version == 2
    for m in metrics[1:]:  # one update old: the correction sees rho != 1, and stays near it
        assert m["train/mismatch/rho_mean"] == pytest.approx(1.0, abs=0.05)
        assert math.isfinite(m["train/loss"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_ppo_learns_on_the_embedded_default(seed, tmp_path, embedded_model):
    """The issue's bar: step-0 held-out eval reward <= 0.5, the final one >= 0.25 higher within
    30 steps, and a critic that explains some of the returns' variance by the end."""
    from tests.integration.conftest import run_main

    rows = run_main(
        tmp_path / "ppo",
        "algorithm=ppo",
        "trainer.total_steps=30",
        f"trainer.seed={seed}",
        "trainer.save_checkpoint=false",
        "logger.wandb_mode=disabled",
        "logger.progress_bar=false",
        timeout=3600,
    )
    evals = [r["eval/reward"] for r in rows if "eval/reward" in r]
    assert evals[0] <= 0.5 and evals[-1] >= evals[0] + 0.25, evals
    critic = [r for r in rows if "critic/explained_variance" in r]
    assert critic[-1]["critic/explained_variance"] > 0 and "critic/value_loss" in critic[-1]


def test_a_rollout_worker_killed_mid_rollout_is_restarted_and_its_episodes_rerun(
    groups, embedded_model, tmp_path
):
    """The rollout actor dies while it samples a batch: a new one (with the last pushed
    weights) runs the same episodes, so the batch comes back whole and equal to a rollout
    that never failed (same seeds); the restart is counted."""
    import ray

    rollout, train, _ = groups
    trainer, _, logger = _trainer(groups, embedded_model, tmp_path)
    logger.close()
    trainer._push_weights(1)  # a restarted worker must load these, not the start weights
    episodes = trainer._train_episodes(0)
    before = rollout.restarts
    clean = rollout.rollout(episodes)
    pending = rollout.start(episodes)
    time.sleep(0.05)  # the call is on its way to the worker, or in it
    ray.kill(rollout.workers[0], no_restart=True)
    rerun = pending.result(timeout=600)
    assert rollout.restarts == before + 1
    assert [t.token_ids for t in rerun] == [t.token_ids for t in clean]
    assert all(turn.weight_version == 1 for t in rerun for turn in t.turns)
