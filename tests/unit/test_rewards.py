"""The reward input view, the shipped rewards (hand-computed values) and the config stack.

python -m pytest tests/unit/test_rewards.py
"""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from toolrl.rewards.base import PerTurn, Scored
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.format import FormatMatch, tool_error_penalty
from toolrl.rewards.math import math_answer
from toolrl.rewards.qa import exact_match, f1, normalize_answer, token_f1
from toolrl.rollout.trajectory import ToolCall, ToolResult, Trajectory, Turn

CONF = Path(__file__).resolve().parents[2] / "conf" / "reward"


def scored(final_text: str | None, tool_errors: int = 0, **row) -> Scored:
    return Scored(messages=[], final_text=final_text, row=row, tool_errors=tool_errors)


# --- the input view -------------------------------------------------------------------------


def test_scored_from_trajectory():
    traj = Trajectory.from_prompt(0, [1, 2, 3])
    traj.turns = [
        Turn(3, 5, 0, "stop", [ToolCall("calculator", {"expression": "47*83"})],
             [ToolResult("calculator", "3901")]),
        Turn(6, 8, 0, "stop", [ToolCall("search", {"q": "x"}, id="abcdefghi")],
             [ToolResult("search", "unknown tool", ok=False, call_id="abcdefghi")]),
        Turn(9, 10, 0, "length"),
    ]  # fmt: skip
    traj.info["final_text"] = None
    prompt = [{"role": "user", "content": "What is 47 * 83?"}]
    x = Scored.from_trajectory(traj, prompt, {"answer": "3901", "id": 7}, ["c1", "c2", "c3"])
    assert x.final_text is None
    assert x.finish_reasons == ["stop", "stop", "length"]
    assert (x.tool_calls, x.tool_errors, x.turn_tool_errors) == (2, 1, [0, 1, 0])
    assert x.row == {"answer": "3901", "id": 7}
    assert [m["role"] for m in x.messages] == ["user", "assistant", "tool", "assistant", "tool",
                                               "assistant"]  # fmt: skip
    first_call = x.messages[1]["tool_calls"][0]
    assert first_call == {
        "id": "call_0",
        "type": "function",
        "function": {"name": "calculator", "arguments": '{"expression": "47*83"}'},
    }
    assert x.messages[2] == {"role": "tool", "name": "calculator", "content": "3901"}
    assert x.messages[3]["tool_calls"][0]["id"] == "abcdefghi"
    assert x.messages[4]["tool_call_id"] == "abcdefghi"
    assert x.messages[5] == {"role": "assistant", "content": "c3"}  # no calls: no tool_calls key
    assert pickle.loads(pickle.dumps(x)) == x  # it travels to pool workers
    traj.turns[2].observation = "Higher."  # an environment's answer is the next user message
    seen = Scored.from_trajectory(traj, prompt, {}, ["c1", "c2", "c3"]).messages
    assert seen[-1] == {"role": "user", "content": "Higher."}
    with pytest.raises(ValueError, match="2 turn contents for 3 turns"):
        Scored.from_trajectory(traj, prompt, {}, ["c1", "c2"])


# --- math -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "answer", "expected"),
    [
        ("The answer is \\boxed{\\frac{1}{2}}", "1/2", 1.0),
        ("so it is 0.5", "\\frac{1}{2}", 1.0),
        ("The answer is 3901.", "3901", 1.0),
        ("47*83 = 3901, so \\boxed{3900}", "3901", 0.0),  # the boxed answer wins over the last
        ("I think \\boxed{4/6}", "\\frac{2}{3}", 1.0),
        ("$\\boxed{2^{1/2}}$", "\\sqrt{2}", 1.0),
        ("first 7 then 12", "12", 1.0),  # no box: the last expression
        ("no number here", "5", 0.0),
        (None, "5", 0.0),
    ],
)
def test_math_answer(final, answer, expected):
    assert math_answer(scored(final, answer=answer)) == expected


def test_math_answer_other_column_and_missing_column():
    assert math_answer(scored("\\boxed{7}", solution="7"), answer_key="solution") == 1.0
    with pytest.raises(KeyError, match="solution"):
        math_answer(scored("\\boxed{7}", answer="7"), answer_key="solution")


def test_math_verify_needs_a_main_thread():
    # Why the runner calls math_answer in a pool worker's main thread: elsewhere it raises.
    errors = []

    def run():
        try:
            math_answer(scored("\\boxed{7}", answer="7"))
        except ValueError as e:
            errors.append(str(e))

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert errors and "thread" in errors[0]


# --- qa -------------------------------------------------------------------------------------


def test_normalize_answer():
    assert normalize_answer("  The  Eiffel-Tower! ") == "eiffeltower"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("Theory of the atom") == "theory of atom"  # "the" only as a word


def test_exact_match():
    assert exact_match(scored("<answer>The Eiffel Tower!</answer>", answer="eiffel tower")) == 1.0
    assert exact_match(scored("Eiffel Tower", answer=["Paris", "eiffel tower"])) == 1.0
    assert exact_match(scored("<answer>Eiffel Tower in Paris</answer>", answer="Eiffel")) == 0.0
    # several <answer> blocks: the last one counts
    text = "<answer>Paris</answer> no wait <answer>Lyon</answer>"
    assert exact_match(scored(text, answer="Paris")) == 0.0
    assert exact_match(scored(text, answer="lyon")) == 1.0
    assert exact_match(scored(None, answer="Paris")) == 0.0


def test_f1_partial_overlap():
    # pred [eiffel, tower, in, paris] vs ref [eiffel, tower]: 2 shared,
    # P = 2/4, R = 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3
    assert f1(scored("<answer>The Eiffel Tower in Paris</answer>", answer="Eiffel Tower")) == (
        pytest.approx(2 / 3)
    )
    # pred [barack, obama, jr]; vs [obama]: P = 1/3, R = 1, F1 = (2/3) / (4/3) = 0.5;
    # vs [michelle, obama]: P = 1/3, R = 1/2, F1 = (1/3) / (5/6) = 0.4; the max is 0.5
    x = scored("<answer>Barack Obama Jr.</answer>", answer=["Michelle Obama", "Obama"])
    assert f1(x) == pytest.approx(0.5)
    # repeated tokens count once per match: [paris, paris] vs [paris]: P = 1/2, R = 1 -> 2/3
    assert token_f1("Paris Paris", "paris") == pytest.approx(2 / 3)
    assert f1(scored("London", answer="Paris")) == 0.0
    assert f1(scored("the", answer="Paris")) == 0.0  # nothing left after normalising
    assert f1(scored(None, answer="Paris")) == 0.0


def test_qa_bad_reference_column():
    with pytest.raises(ValueError, match="string or a list"):
        exact_match(scored("x", answer=3))


# --- format and tool shaping ----------------------------------------------------------------


def test_format_match():
    fmt = FormatMatch(r"(?s).*<answer>.+?</answer>\s*")
    assert fmt(scored("think...\n<answer>42</answer>\n")) == 1.0
    assert fmt(scored("<answer>42</answer> and more")) == 0.0  # fullmatch: nothing after it
    assert fmt(scored("<answer></answer>")) == 0.0
    assert fmt(scored(None)) == 0.0
    assert FormatMatch(r"\d+", mode="search")(scored("it is 42")) == 1.0
    with pytest.raises(ValueError, match="bad format pattern"):
        FormatMatch("(")


@pytest.mark.parametrize(("errors", "expected"), [(0, 0.0), (2, -0.2), (5, -0.5), (10, -0.5)])
def test_tool_error_penalty(errors, expected):
    assert tool_error_penalty(scored("x", tool_errors=errors), 0.1, 0.5) == pytest.approx(expected)


def test_tool_error_penalty_per_turn_charges_the_turns_that_erred_up_to_the_cap():
    x = Scored([], "x", turn_tool_errors=[0, 2, 0, 4, 1], tool_errors=7)
    credit = tool_error_penalty(x, 0.1, 0.5, per_turn=True)
    # turn 1 pays 0.2, turn 3 the 0.3 left of the cap, turn 4 nothing: the same -0.5 in total
    assert credit.values == pytest.approx((0.0, -0.2, 0.0, -0.3, 0.0))
    assert sum(credit.values) == pytest.approx(tool_error_penalty(x, 0.1, 0.5))


# --- the stack --------------------------------------------------------------------------------


def test_stack_weights_and_mapping_components():
    stack = RewardStack(
        [
            {"_target_": "tests.unit.reward_fixtures.constant", "value": 0.5, "weight": 2.0},
            {"_target_": "tests.unit.reward_fixtures.async_behave", "name": "judge", "weight": 0.5},
            {"_target_": "tests.unit.reward_fixtures.AsyncJudge", "score": 0.3, "name": "obj"},
        ]
    )
    assert [c.name for c in stack.components] == ["constant", "judge", "obj"]
    assert [c.is_async for c in stack.components] == [False, True, True]
    assert stack.components[0].fn(scored("x")) == 0.5  # `value` was bound
    score = stack.combine({"constant": 0.5, "judge": {"chars": 4.0, "one": 1.0}, "obj": 0.3})
    # 2.0 * 0.5 + 0.5 * (4 + 1) + 1.0 * 0.3 = 1.0 + 2.5 + 0.3
    assert score.total == pytest.approx(3.8)
    assert score.components == {"constant": 0.5, "judge/chars": 4.0, "judge/one": 1.0, "obj": 0.3}
    assert score.failed == ()
    failed = stack.combine({"constant": None, "judge": {"chars": 2.0, "one": 1.0}, "obj": 0.3})
    assert failed.total == pytest.approx(0.5 * 3 + 0.3)
    assert failed.components["constant"] == 0.0 and failed.model_failures == 1


def test_stack_keeps_per_turn_credit_apart_from_the_final_reward():
    stack = RewardStack(
        {
            "answer": {"_target_": "tests.unit.reward_fixtures.constant", "value": 1.0},
            "shaping": {"_target_": "tests.unit.reward_fixtures.constant", "weight": 0.5},
        }
    )
    score = stack.combine({"answer": 1.0, "shaping": PerTurn([-0.2, 0.0, -0.4])}, num_turns=3)
    assert score.outcome == 1.0 and score.per_turn == pytest.approx((-0.1, 0.0, -0.2))
    assert score.total == pytest.approx(0.7)
    assert score.components == pytest.approx({"answer": 1.0, "shaping": -0.6})  # logged as sum
    plain = stack.combine({"answer": 1.0, "shaping": 0.25}, num_turns=3)
    assert (plain.outcome, plain.per_turn) == (1.125, ())  # nothing credited per turn
    with pytest.raises(ValueError, match="2 per-turn values for 3 turns"):
        stack.combine({"answer": 1.0, "shaping": PerTurn([0.0, 0.0])}, num_turns=3)
    with pytest.raises(ValueError, match="not a finite number"):
        stack.combine({"answer": 1.0, "shaping": PerTurn([float("nan")])}, num_turns=1)


def test_stack_rejects_bad_specs():
    with pytest.raises(ValueError, match="toolrl.rewards.nope.missing"):
        RewardStack([{"_target_": "toolrl.rewards.nope.missing"}])
    with pytest.raises(ValueError, match="math_answer.*bad arguments"):
        RewardStack([{"_target_": "toolrl.rewards.math.math_answer", "answer_col": "x"}])
    with pytest.raises(ValueError, match="FormatMatch"):
        RewardStack([{"_target_": "toolrl.rewards.format.FormatMatch", "pattern": "("}])
    with pytest.raises(ValueError, match="weight"):
        RewardStack([{"_target_": "tests.unit.reward_fixtures.constant", "weight": "heavy"}])
    with pytest.raises(ValueError, match="unique"):
        RewardStack([{"_target_": "tests.unit.reward_fixtures.constant"}] * 2)
    with pytest.raises(ValueError, match="_target_"):
        RewardStack([{"weight": 1.0}])


def test_shipped_configs_build_and_compose():
    files = sorted(CONF.glob("*.yaml"))
    assert {f.stem for f in files} >= {"math", "qa_em", "qa_f1", "format", "tool_shaping"}
    # Hydra merges the chosen options of the group into one mapping name -> spec
    merged = OmegaConf.merge(*(OmegaConf.load(f) for f in files))
    stack = RewardStack(merged)
    by_name = {c.name: c for c in stack.components}
    assert set(by_name) >= {"math", "qa_em", "qa_f1", "format", "tool_shaping"}
    x = scored("<answer>42</answer>", tool_errors=1, answer="42", golden_answers=["42"])
    assert by_name["qa_em"].fn(x) == 1.0
    assert by_name["qa_f1"].fn(x) == 1.0
    assert by_name["format"].fn(x) == 1.0
    assert by_name["tool_shaping"].fn(x) == pytest.approx(-0.1)
    assert by_name["math"].fn(scored("so \\boxed{42}", answer="42")) == 1.0
    assert by_name["format"].weight == 0.1 and by_name["math"].timeout_s == 10.0
