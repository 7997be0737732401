"""The README's table of bad configs and the error each prints, generated here so it cannot
drift: each row goes through what `toolrl.main` does before Ray starts (compose, type,
validate, then `prepare`: the checkpoint, the model, the template, the task, the budget).

    python -m pytest tests/unit/test_bad_configs.py
    python tests/unit/test_bad_configs.py --write     # regenerate the README's table
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BEGIN, END = "<!-- bad-configs:begin -->", "<!-- bad-configs:end -->"

# (overrides, what is wrong): every one must fail before Ray starts.
BAD_CONFIGS = [
    ("trainer.totl_steps=3", "a misspelt key"),
    ("+trainer.totl_steps=3", "a misspelt key added with +"),
    ("rollout.n=many", "a wrong type"),
    ("tools=[calculater]", "an unknown tool"),
    ("parser=hermse", "an unknown parser"),
    ("tools.calculator._target_=toolrl.tools.calc.Calculator", "a `_target_` that does not import"),
    ("+tools.calculator.max_digitz=3", "an argument the tool does not take"),
    ("tools.calculator.max_digits=-1", "an argument value the tool refuses"),
    ("trainer.prompts_per_step=1 rollout.n=2", "a batch that does not split across ranks"),
    ("model.path=/models/missing", "a missing model folder"),
    (
        "task=dataset task.train_files=data/train.jsonl task.eval_files=data/test.jsonl "
        "task.prompt_column=question",
        "missing data files",
    ),
    ("rollout.max_total_tokens=64", "a budget the prompts do not fit in"),
    ("parser=llama3_json", "a parser that does not read the template's calls"),
    ("rollout.num_cpus_per_worker=8 ray.num_cpus=2", "more CPUs than Ray can grant"),
    ("rollout.num_gpus_per_worker=1", "a GPU on a machine without one"),
    ("trainer.max_staleness=1", "overlap without an off-policy correction"),
    ("trainer.resume=runs/no-such-run", "a checkpoint that is not there"),
    ("algorithm.loss.clip_low=1.5", "an out-of-range loss setting"),
    ("trainer.eval_pass_k=[1,4]", "pass@k beyond the samples per eval prompt"),
    (
        "trainer.eval_samples=4 rollout.eval_sampler.temperature=0",
        "several eval samples drawn greedily",
    ),
]


def error_of(overrides: str, run_dir: str) -> str:
    """What `python -m toolrl.main OVERRIDES` reports before Ray starts, or '' if nothing."""
    from hydra import compose, initialize_config_dir

    from toolrl.config import register, to_config
    from toolrl.main import prepare
    from toolrl.validate import validate

    register()
    try:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = to_config(compose("config", overrides=overrides.split()))
        validate(cfg)
        cfg.run_dir = run_dir
        prepare(cfg)
    except Exception as e:  # Hydra's own errors and toolrl's ConfigError alike
        text = str(e).split("\nConfig search path:")[0]  # Hydra appends its search path
        if e.__cause__ is not None:  # Hydra prints the cause's first line too
            text += "; " + str(e.__cause__).splitlines()[0]
        return text.replace("\n", " ").replace("\t", "").strip()
    return ""


def table(run_dir: str) -> str:
    lines = ["| what is wrong | overrides | what toolrl prints |", "|---|---|---|"]
    for overrides, what in BAD_CONFIGS:
        message = error_of(overrides, run_dir).replace("|", "\\|")
        lines.append(f"| {what} | `{overrides}` | {message} |")
    return "\n".join(lines)


def readme_table() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split(BEGIN)[1].split(END)[0].strip()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, embedded_model: str) -> str:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the GPU row reads 0 GPUs on any machine
    try:
        return table(str(tmp_path_factory.mktemp("run")))
    finally:
        del os.environ["CUDA_VISIBLE_DEVICES"]


def test_every_bad_config_fails_before_ray_starts_with_a_message(rendered: str) -> None:
    for line, (overrides, _) in zip(rendered.splitlines()[2:], BAD_CONFIGS, strict=True):
        assert line.rstrip(" |").split(" | ")[-1].strip(), f"{overrides} passed"
    assert len(BAD_CONFIGS) >= 12


def test_the_readme_table_is_what_the_checks_print(rendered: str) -> None:
    assert readme_table() == rendered, (
        "the README's bad-config table is stale: python tests/unit/test_bad_configs.py --write"
    )


if __name__ == "__main__" and "--write" in sys.argv:
    import tempfile

    sys.path.insert(0, str(ROOT))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    with tempfile.TemporaryDirectory() as d:
        new = table(d)
    readme = ROOT / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN)
    readme.write_text(head + BEGIN + "\n" + new + "\n" + END + rest.split(END)[1])
    print(new)
