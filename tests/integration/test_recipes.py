"""The shipped recipes (conf/experiment/math_python.yaml, function_calling.yaml) end to end:
`python -m toolrl.main +experiment=<recipe>` for two steps on the embedded model and the
recipe's sample rows, with every reward component in metrics.jsonl.

    python -m pytest tests/integration/test_recipes.py            # math_python
    python -m pytest tests/integration/test_recipes.py -m slow    # function_calling too
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import run_main

COMPONENTS = {
    "math_python": ["math", "tool_shaping"],
    "function_calling": ["tool_calls/name", "tool_calls/keys", "tool_calls/values", "tool_shaping"],
}


# math_python runs in the default suite; function_calling's run (about a minute more, its
# reward and per-row tools are covered by tests/unit/test_recipes.py and test_agent_loop.py)
# runs on request: python -m pytest -m slow
RECIPES = [
    "math_python",
    pytest.param("function_calling", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_two_steps_and_logs_every_reward_component(recipe, tmp_path, embedded_model):
    rows = run_main(
        tmp_path / recipe,
        f"+experiment=[{recipe},smoke]",
        "trainer.save_checkpoint=false",
        "trainer.prompts_per_step=2",
        "trainer.eval_prompts=4",
    )
    steps = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for prefix, row in (("train", steps[0]), ("eval", rows[-1])):
        for name in COMPONENTS[recipe]:
            assert f"{prefix}/reward/{name}" in row, (prefix, name, sorted(row))
        assert row[f"{prefix}/infra_errors"] == 0.0 and row[f"{prefix}/reward_failures"] == 0.0
