"""Unit tests for the arithmetic task: splits, prompts, reward, and held-out pairs.

python -m pytest tests/unit/test_arithmetic.py
"""

from __future__ import annotations

import random
import re

import pytest

from toolrl.data.arithmetic import (
    ArithmeticConfig,
    ArithmeticTask,
    Prompt,
    is_eval_pair,
    last_integer,
)
from toolrl.tools.calculator import CALCULATOR_SCHEMA


def _operands(p: Prompt) -> tuple[int, int]:
    a, b = (int(x) for x in re.findall(r"\d+", p.messages[0]["content"]))
    return a, b


@pytest.fixture(scope="module")
def task() -> ArithmeticTask:
    return ArithmeticTask()


def test_splits_partition_the_unordered_pairs(task: ArithmeticTask) -> None:
    train, ev = set(task.pairs("train")), set(task.pairs("eval"))
    assert not train & ev
    assert len(train) + len(ev) == 90 * 91 // 2  # unordered pairs of 10..99, squares included
    assert 0.05 < len(ev) / (len(train) + len(ev)) < 0.15  # eval_fraction 0.1
    assert all(lo <= hi for lo, hi in train | ev)


def test_prompts_use_only_their_split(task: ArithmeticTask) -> None:
    train, ev = task.prompts("train"), task.prompts("eval")
    assert len(train) == 2000 and len(ev) == 200
    eval_pairs = set(task.pairs("eval"))
    for p in ev:
        a, b = _operands(p)
        assert (min(a, b), max(a, b)) in eval_pairs
    for p in train:
        a, b = _operands(p)
        assert (min(a, b), max(a, b)) not in eval_pairs
        assert 10 <= a <= 99 and 10 <= b <= 99
    # eval prompts are distinct pairs while the pool lasts
    assert len({tuple(sorted(_operands(p))) for p in ev}) == len(ev)


def test_prompt_shape_and_answer(task: ArithmeticTask) -> None:
    p = task.make_prompt(47, 83, 0)
    assert p.messages == [{"role": "user", "content": "What is 47 * 83?"}]
    assert p.answer == "3901"
    phrasings = {re.sub(r"\d+", "N", p.messages[0]["content"]) for p in task.prompts("train")}
    assert len(phrasings) == 3


def test_prompts_deterministic_and_seeded() -> None:
    a, b = ArithmeticTask(seed=1), ArithmeticTask(seed=1)
    assert [p.messages for p in a.prompts("train")] == [p.messages for p in b.prompts("train")]
    c = ArithmeticTask(seed=2)
    assert [p.messages for p in a.prompts("eval")] != [p.messages for p in c.prompts("eval")]
    # which pairs are held out does not depend on the seed (the warm-start relies on it)
    assert a.pairs("eval") == c.pairs("eval")


def test_config_and_keyword_overrides() -> None:
    t = ArithmeticTask(ArithmeticConfig(num_train=10), num_eval=5, phrasings=["Compute {a} * {b}."])
    assert len(t.prompts("train")) == 10 and len(t.prompts("eval")) == 5
    assert all(p.messages[0]["content"].startswith("Compute") for p in t.prompts("train"))
    with pytest.raises(ValueError, match="split"):
        t.prompts("test")
    with pytest.raises(ValueError, match="eval_fraction"):
        ArithmeticTask(eval_fraction=0.0)
    with pytest.raises(TypeError):
        ArithmeticTask(no_such_field=1)


def test_eval_pair_is_symmetric() -> None:
    for a in range(10, 100):
        for b in range(10, 100):
            assert is_eval_pair(a, b, 0.1) == is_eval_pair(b, a, 0.1)


@pytest.mark.parametrize(
    ("text", "reward"),
    [
        ("The answer is 3901.", 1.0),
        ("3901", 1.0),
        ("The answer is 3901.<|im_end|>", 1.0),
        ("47 * 83 = 3901", 1.0),
        ("The answer is 3900.", 0.0),
        ("3901, or maybe 3902", 0.0),  # the last integer counts
        ("The answer is 39010.", 0.0),
        ("", 0.0),
        ("I do not know.", 0.0),
        ("-3901", 0.0),
    ],
)
def test_reward(task: ArithmeticTask, text: str, reward: float) -> None:
    assert task.reward(text, "3901") == reward


def test_last_integer() -> None:
    assert last_integer("a -12 b 7") == 7
    assert last_integer("x = -12") == -12
    assert last_integer("none") is None


def test_tools_schemas(task: ArithmeticTask) -> None:
    assert task.tools_schemas == [CALCULATOR_SCHEMA]


def test_warm_start_traces_never_use_eval_pairs(task: ArithmeticTask) -> None:
    from toolrl.models.warmstart import WarmStartConfig, make_trace

    cfg, rng = WarmStartConfig(), random.Random(0)
    eval_pairs = set(task.pairs("eval"))
    seen_wide = 0
    for _ in range(3000):
        msgs = make_trace(task, cfg, rng)
        a, b = (int(x) for x in re.findall(r"\d+", msgs[0]["content"]))
        assert (min(a, b), max(a, b)) not in eval_pairs
        seen_wide += not (10 <= a <= 99 and 10 <= b <= 99)
        for m in msgs[1:]:  # the operands reappear in calls, never another pair
            for call in m.get("tool_calls", []):
                x, _, y = call["function"]["arguments"]["expression"].split()
                assert (int(x), int(y)) == (a, b)
    assert 0.2 < seen_wide / 3000 < 0.4  # p_wide = 0.3
