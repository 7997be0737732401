"""Each recipe's reward stack, composed from its config, scores known-good and known-bad
trajectories built from its own sample rows as expected (not just "runs").

    python -m pytest tests/unit/test_recipes.py
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from hydra import compose, initialize_config_dir

from toolrl.config import instantiate, register, to_config
from toolrl.rewards.base import Scored
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register()


def recipe(name: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose("config", overrides=[f"+experiment={name}"]))


def score_all(cfg, scored: list[Scored]) -> list:
    async def go():
        async with RewardRunner(RewardStack(cfg.reward)) as runner:
            return await asyncio.gather(*(runner.score(x) for x in scored))

    return asyncio.run(go())


def scores_good_then_bad(cfg, good: list[Scored], bad: list[Scored]) -> list:
    """Score both lists with the recipe's stack; assert every good one totals 1, every bad 0."""
    scores = score_all(cfg, good + bad)
    assert [s.total for s in scores] == [1.0] * len(good) + [0.0] * len(bad)
    return scores


def answered(prompt, text: str, calls: list[dict] | None = None) -> Scored:
    messages = list(prompt.messages)
    if calls:
        tool_calls = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {**c, "arguments": json.dumps(c["arguments"])},
            }
            for i, c in enumerate(calls)
        ]
        messages.append({"role": "assistant", "content": "", "tool_calls": tool_calls})
    messages.append({"role": "assistant", "content": text})
    return Scored(messages, text, prompt.row, ["stop"] * (1 + bool(calls)), 0, len(calls or []))


def test_math_python_rewards_the_right_answer_only():
    cfg = recipe("math_python")
    prompts = instantiate(cfg.task).prompts("train")
    good = [answered(p, f"So the answer is $\\boxed{{{p.answer}}}$.") for p in prompts]
    bad = [answered(p, f"So the answer is $\\boxed{{{int(p.answer) + 1}}}$.") for p in prompts]
    scores = scores_good_then_bad(cfg, good, bad)
    assert all(s.components["tool_shaping"] == 0.0 for s in scores)


def test_function_calling_rewards_the_expected_call_only():
    cfg = recipe("function_calling")
    prompts = instantiate(cfg.task).prompts("train")
    good = [answered(p, "Done.", [p.row["expected_call"]]) for p in prompts]
    wrong = [{"name": "calculator" if p.row["expected_call"]["name"] != "calculator" else "search",
              "arguments": {"x": "y"}} for p in prompts]  # fmt: skip
    bad = [answered(p, "Done.", [w]) for p, w in zip(prompts, wrong, strict=True)]
    scores = score_all(cfg, good + bad)
    n = len(prompts)
    assert [s.total for s in scores] == [3.0] * n + [0.0] * n  # name + keys + values
    assert all(s.components["tool_calls/values"] == 1.0 for s in scores[:n])


def test_a_run_drops_prompts_over_the_token_budget_at_load(embedded_base, caplog):
    # The run hands the dataset task a tokenizer-based count_tokens (main.token_counter).
    from transformers import AutoTokenizer

    from toolrl.config import build_task
    from toolrl.main import token_counter

    tok = AutoTokenizer.from_pretrained(embedded_base)
    spec = dict(recipe("math_python").task, system_prompt=None)
    render = lambda m: tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)  # noqa: E731
    lengths = [len(tok.encode(render(p.messages), add_special_tokens=False))
               for p in instantiate(spec).prompts("train")]  # fmt: skip
    budget = sorted(lengths)[len(lengths) // 2]
    with caplog.at_level("WARNING"):
        task = build_task({**spec, "max_prompt_tokens": budget}, count_tokens=token_counter(tok))
        kept = task.prompts("train")
    assert len(kept) == sum(n <= budget for n in lengths) < len(lengths)
    assert f"dropped {len(lengths) - len(kept)} of {len(lengths)}" in caplog.text


def test_search_r1_rewards_a_golden_answer_in_answer_tags_only():
    cfg = recipe("search_r1")
    prompts = instantiate(cfg.task).prompts("train")
    first = lambda p: p.row["golden_answers"][0]  # noqa: E731
    good = [answered(p, f"<search> x </search> so <answer> {first(p)} </answer>") for p in prompts]
    bad = [answered(p, f"It is {first(p)}.") for p in prompts]  # no answer tags: not an answer
    scores_good_then_bad(cfg, good, bad)
    assert all("Question: " in p.messages[-1]["content"] for p in prompts)


def test_code_inline_and_guess_number_reward_the_right_answer_only():
    cfg = recipe("code_inline")
    prompts = instantiate(cfg.task).prompts("train")
    good = [answered(p, f"<code>print(1)</code> so \\boxed{{{p.answer}}}") for p in prompts]
    bad = [answered(p, f"\\boxed{{{int(p.answer) + 1}}}") for p in prompts]
    scores_good_then_bad(cfg, good, bad)
    cfg = recipe("guess_number")
    prompts = instantiate(cfg.task).prompts("train")
    good = [answered(p, str(p.row["secret"])) for p in prompts]
    bad = [answered(p, str(p.row["secret"] % 10 + 1)) for p in prompts]
    scores_good_then_bad(cfg, good, bad)
