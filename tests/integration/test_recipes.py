"""The shipped recipes (conf/experiment/) end to end: `python -m toolrl.main +experiment=<recipe>`
for two steps on the embedded model and the recipe's sample rows, with every reward component
in metrics.jsonl.

    python -m pytest tests/integration/test_recipes.py            # math_python, search_r1
    python -m pytest tests/integration/test_recipes.py -m slow    # the others too
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import run_main

COMPONENTS = {
    "math_python": ["math", "tool_shaping"],
    "function_calling": ["tool_calls/name", "tool_calls/keys", "tool_calls/values", "tool_shaping"],
    "search_r1": ["qa_em"],
    "code_inline": ["math"],
    "guess_number": ["solved"],
    "inline_calculator": ["product"],
}


# One recipe per protocol family runs in the default suite (chat tool turns: math_python;
# inline tags: search_r1). The others take about a minute each and run on request
# (python -m pytest -m slow); their parts are covered by tests/unit/test_recipes.py,
# test_agent_loop.py and test_protocols.py.
RECIPES = [
    "math_python",
    "search_r1",
    pytest.param("function_calling", marks=pytest.mark.slow),
    pytest.param("code_inline", marks=pytest.mark.slow),
    pytest.param("guess_number", marks=pytest.mark.slow),
    pytest.param("inline_calculator", marks=pytest.mark.slow),
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
