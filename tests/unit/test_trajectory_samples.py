"""The sample trajectories logged each step: their records, their wandb table rows, and
trajectories.jsonl (trimmed like metrics.jsonl when a run resumes).

    python -m pytest tests/unit/test_trajectory_samples.py
"""

from __future__ import annotations

import json

import pytest

from toolrl.metrics import TRAJECTORY_COLUMNS, MetricsLogger, table_row, trajectory_records
from toolrl.rollout.trajectory import ToolCall, ToolResult, Trajectory, Turn

WORDS = {1: "<prompt>", 4: "<tool_call>mul</tool_call>", 5: "The answer is ", 6: "42"}


def decode(ids: list[int]) -> str:
    return "".join(WORDS.get(i, "?") for i in ids)


def solved(prompt_id: int) -> Trajectory:
    t = Trajectory.from_prompt(prompt_id, [1])
    s, e = t.append_sampled([4], [-0.1])
    call = ToolCall("calculator", {"a": 6, "b": 7})
    answers = [ToolResult("calculator", "42"), ToolResult("error", "Error: bad JSON", ok=False)]
    t.turns.append(Turn(s, e, 0, "stop", [call], answers, ["bad JSON"], content=""))
    t.append_context([9])
    s, e = t.append_sampled([5, 6], [-0.2, -0.3])
    t.turns.append(Turn(s, e, 0, "stop", content="The answer is 42", reward=0.25))
    t.reward = 1.0
    t.info = {"final_text": "The answer is 42", "reward_components": {"product": 1.0}}
    return t


def test_records_hold_the_prompt_every_turn_its_calls_and_answers_and_the_reward():
    messages = {3: [{"role": "user", "content": "What is 6 * 7?"}], 5: []}
    trajs = [solved(3), solved(3), solved(5)]
    recs = trajectory_records(trajs, 7, messages.__getitem__, decode)
    assert [(r["step"], r["prompt_id"], r["sample"]) for r in recs] == [
        (7, 3, 0),
        (7, 3, 1),
        (7, 5, 0),
    ]
    r = recs[0]
    assert r["prompt"] == messages[3]
    assert [u["text"] for u in r["turns"]] == ["<tool_call>mul</tool_call>", "The answer is 42"]
    assert r["turns"][0]["calls"] == [{"name": "calculator", "arguments": {"a": 6, "b": 7}}]
    assert [x["content"] for x in r["turns"][0]["results"]] == ["42", "Error: bad JSON"]
    assert r["turns"][1]["reward"] == 0.25
    assert (r["reward"], r["reward_components"], r["final_text"]) == (
        1.25,
        {"product": 1.0},
        "The answer is 42",
    )
    assert json.loads(json.dumps(r)) == r
    # without a tokenizer, what the parser kept of each turn
    plain = trajectory_records(trajs[:1], 7, messages.__getitem__)[0]
    assert [u["text"] for u in plain["turns"]] == ["", "The answer is 42"]


def test_a_table_row_shows_the_turns_as_text():
    rec = trajectory_records([solved(3)], 2, lambda _: [{"role": "user", "content": "Q?"}], decode)[
        0
    ]
    row = dict(zip(TRAJECTORY_COLUMNS, table_row(rec), strict=True))
    assert row["prompt"] == "user: Q?" and row["reward"] == 1.25
    assert 'call calculator {"a": 6, "b": 7}' in row["turns"]
    assert (
        "answer (calculator): 42" in row["turns"]
        and "error (error): Error: bad JSON" in row["turns"]
    )
    assert json.loads(row["reward_components"]) == {"product": 1.0}


def logger(run_dir, start_step: int = 0) -> MetricsLogger:
    return MetricsLogger(str(run_dir), 4, "disabled", "t", None, {}, False, start_step)


def test_trajectories_jsonl_gets_each_steps_samples_and_a_resume_drops_the_later_ones(tmp_path):
    first = logger(tmp_path)
    assert not (tmp_path / "trajectories.jsonl").exists()  # nothing logged: no file
    for step in range(3):
        first.log_trajectories(step, trajectory_records([solved(0), solved(1)], step, lambda _: []))
    first.close()
    rows = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt_id"]) for r in rows] == [(s, p) for s in range(3) for p in (0, 1)]
    again = logger(tmp_path, start_step=1)  # resumed from the checkpoint after step 0
    again.log_trajectories(1, trajectory_records([solved(4)], 1, lambda _: []))
    again.close()
    rows = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt_id"]) for r in rows] == [(0, 0), (0, 1), (1, 4)]


def test_evaluation_samples_go_to_their_own_jsonl_and_a_resume_trims_it_too(tmp_path):
    first = logger(tmp_path)
    first.log_trajectories(0, trajectory_records([solved(0)], 0, lambda _: []))
    for step in (0, 2):
        records = trajectory_records([solved(7)], step, lambda _: [])
        first.log_trajectories(step, records, "eval_trajectories")
    first.close()
    evals = [json.loads(x) for x in (tmp_path / "eval_trajectories.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt_id"]) for r in evals] == [(0, 7), (2, 7)]
    train = (tmp_path / "trajectories.jsonl").read_text().splitlines()
    assert [json.loads(x)["prompt_id"] for x in train] == [0]  # not mixed with the evals'
    logger(tmp_path, start_step=1).close()  # resumed after step 0: the step-2 eval goes
    evals = (tmp_path / "eval_trajectories.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in evals] == [0]
    other = logger(tmp_path / "other")
    with pytest.raises(ValueError, match="sample table"):
        other.log_trajectories(0, [], "eval")
    other.close()
