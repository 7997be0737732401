"""Every shipped config composes, types and validates; bad configs fail early and say what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from toolrl.config import ConfigError, build_parser, instantiate, register, to_config
from toolrl.rollout.parsers.reasoning import Reasoned
from toolrl.validate import validate

CONF = str(Path(__file__).resolve().parents[2] / "conf")
register()


def load(*overrides: str):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose("config", overrides=list(overrides)))


def test_default_config_validates_and_every_target_instantiates():
    cfg = load()
    validate(cfg)
    assert cfg.trainer.train_group.world_size >= 1
    tools = [instantiate(spec) for spec in cfg.tools.values()]
    assert [t.name for t in tools] == ["calculator"]
    parser, reasoning = build_parser(cfg.parser, [t.schema() for t in tools])
    assert callable(parser) and reasoning("<think>x</think>y").text == "y"
    assert instantiate(cfg.rollout.sampler).temperature == cfg.rollout.sampler["temperature"]
    task = instantiate(cfg.task)
    assert task.prompts("train") and task.prompts("eval")
    adv = instantiate(cfg.algorithm.advantages)
    assert not adv.needs_critic and adv.needs_groups


@pytest.mark.parametrize("algorithm", [p.stem for p in Path(CONF, "algorithm").glob("*.yaml")])
def test_every_algorithm_composes_and_says_what_it_needs(algorithm):
    from toolrl.algo.algorithm import Algorithm

    cfg = load(f"algorithm={algorithm}")
    validate(cfg)
    algo = Algorithm(cfg.algorithm, cfg.rollout.max_total_tokens)
    assert algo.needs_critic == (algorithm == "ppo")
    assert algo.needs_reference == (cfg.algorithm.loss.kl_coef + cfg.algorithm.kl_in_reward > 0)


@pytest.mark.parametrize("experiment", [p.stem for p in Path(CONF, "experiment").glob("*.yaml")])
def test_every_experiment_composes(experiment):
    validate(load(f"+experiment={experiment}"))


def test_overrides_reach_the_typed_config():
    cfg = load("trainer.total_steps=7", "rollout.n=4", "algorithm.loss.kl_coef=0")
    assert (cfg.trainer.total_steps, cfg.rollout.n, cfg.algorithm.loss.kl_coef) == (7, 4, 0.0)


def test_unknown_key_and_wrong_type_fail_at_composition():
    with pytest.raises(ConfigCompositionException, match="totl_steps"):
        load("trainer.totl_steps=3")
    with pytest.raises(ConfigError, match=r"trainer\.totl_steps: unknown key"):
        load("+trainer.totl_steps=3")  # `+` adds it past Hydra; the schema still refuses it
    with pytest.raises(ConfigCompositionException, match="rollout.n"):
        load("rollout.n=many")


@pytest.mark.parametrize(
    "override, key",
    [
        ("rollout.n=1", "rollout.n"),
        ("rollout.max_total_tokens=4096", "rollout.max_total_tokens"),
        ("algorithm.loss.clip_low=1.5", "algorithm.loss.clip_low"),
        ("logger.wandb_mode=sometimes", "logger.wandb_mode"),
        ("algorithm.mini_batches=1000", "algorithm.mini_batches"),
        ("parser._target_=toolrl.rollout.parsers.nope.Parser", "parser._target_"),
        ("parser.max_parallel_calls=0", "parser"),
        ("parser.reasoning._target_=nope.Step", "parser.reasoning._target_"),
        ("parser.reasoning.end=''", "parser.reasoning"),
        ("+tools.calculator.max_digitz=3", "tools.calculator"),
        ("rollout.sampler.top_p=0.9", "rollout.sampler"),
        ("rollout.sampler.temperature=0", "rollout.sampler"),
        (
            "rollout.sampler.temperature=0.7 rollout.engine.logprobs_mode=raw_logprobs",
            "rollout.engine.logprobs_mode",
        ),
        ("rollout.eval_sampler.top_p=0", "rollout.eval_sampler.top_p"),
        ("trainer.train_group.micro_batch_size=0", "trainer.train_group.micro_batch_size"),
        ("model.path=/nonexistent", "model.path"),
        ("algorithm.old_logprobs=sometimes", "algorithm.old_logprobs"),
        ("algorithm.loss.aggregation=token-max", "algorithm.loss.aggregation"),
        ("algorithm.loss.kl_estimator=k4", "algorithm.loss.kl_estimator"),
        ("algorithm.loss.mismatch.mode=tis", "algorithm.loss.mismatch"),  # low/high fine: passes
        ("algorithm.loss.mismatch.low=1.5", "algorithm.loss.mismatch"),
        ("algorithm.kl_in_reward=0.1", "algorithm.kl_in_reward"),  # GRPO never reads it
        ("algorithm.overlong_buffer=512", "algorithm.overlong_buffer"),
        ("algorithm.advantages._target_=toolrl.algo.advantages.rloo_advantages", "algorithm.adv"),
    ],
)
def test_validation_names_the_key(override, key):
    if override == "algorithm.loss.mismatch.mode=tis":
        validate(load(override))  # a valid mode with the default bounds
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load(*override.split()))


def test_overlapped_training_validates_with_a_mismatch_correction():
    validate(load("trainer.max_staleness=1", "algorithm.loss.mismatch.mode=tis"))


def test_training_temperature_other_than_one_is_allowed():
    validate(load("rollout.sampler.temperature=0.7"))  # the trainer divides logits by it


@pytest.mark.parametrize(
    "overrides, key",
    [
        (("algorithm=drgrpo", "algorithm.loss.norm_tokens=null"), "algorithm.loss.norm_tokens"),
        (("algorithm=ppo", "algorithm.critic.path=/nonexistent"), "algorithm.critic.path"),
        (("algorithm=ppo", "algorithm.critic.value_clip=0"), "algorithm.critic.value_clip"),
        (("algorithm=dapo", "rollout.n=1"), "rollout.n"),
        (("algorithm=ppo", "algorithm.advantages.lam=1.5"), "algorithm.advantages"),
        (("algorithm=ppo", "algorithm.critic.group.micro_batch_size=0"), "critic.group.micro"),
        (("trainer.train_group.micro_batch_tokens=0",), "trainer.train_group.micro_batch_tokens"),
        (("algorithm=dapo", "algorithm.overlong_penalty=-1"), "algorithm.overlong_penalty"),
        (("trainer.max_staleness=2",), "trainer.max_staleness"),
        (("trainer.max_staleness=1",), "algorithm.loss.mismatch.mode"),  # stale: correct it
        (
            ("algorithm=dapo", "trainer.max_staleness=1", "algorithm.loss.mismatch.mode=tis"),
            "algorithm.dynamic_sampling",
        ),
        (("rollout.max_inflight_per_worker=0",), "rollout.max_inflight_per_worker"),
        (("tools=search", "tools.search.max_concurrency=0"), "tools.search.max_concurrency"),
        (
            ("algorithm=ppo", "algorithm.critic.colocate=false", "ray.num_cpus=2"),
            "rollout.num_cpus_per_worker",  # its own group's CPUs count too
        ),
    ],
)
def test_algorithm_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(load(*overrides))


def test_ppo_needs_no_groups():
    validate(load("algorithm=ppo", "rollout.n=1"))  # a critic is the baseline


def test_python_tool_sandbox_is_checked_before_ray_starts():
    validate(load("+experiment=python_tool"))
    with pytest.raises(ConfigError, match=r"tools\.python: .*isolation is 'docker'"):
        validate(load("+experiment=python_tool", "tools.python.sandbox.isolation=docker"))
    with pytest.raises(ConfigError, match=r"tools\.python: .*not an executable"):
        validate(load("+experiment=python_tool", "tools.python.sandbox.python=/no/python"))
    with pytest.raises(ConfigError, match=r"tools\.python: .*memory_gb"):
        validate(load("+experiment=python_tool", "+tools.python.sandbox.memory_gb=1"))
    with pytest.raises(ConfigError, match="model.embedded_tool"):
        validate(load("tools=[python]"))  # the default model calls the calculator


def test_asking_for_more_cpus_than_the_local_cluster_has_fails_early():
    with pytest.raises(ConfigError, match="ask for 9 CPUs but this machine has 2"):
        validate(load("ray.num_cpus=2", "rollout.num_workers=8"))
    validate(load("ray.num_cpus=2", "rollout.eval_sampler.temperature=0.5"))  # eval may temper


def test_a_row_naming_an_unconfigured_tool_fails_validation():
    # The function_calling rows name calculator and search; configuring calculator alone must
    # fail here, naming the row and the column, not as a KeyError inside a rollout worker.
    with pytest.raises(ConfigError, match=r"row \d+.*'tools'.*\['search'\].*does not configure"):
        validate(load("+experiment=function_calling", "tools=[calculator]"))


def test_a_reward_that_cannot_run_on_this_machine_fails_validation():
    # The code reward's preflight checks the sandbox here, not at the first scoring in a worker.
    with pytest.raises(ConfigError, match=r"reward\.code: .*/nope/python.*not an executable"):
        validate(load("reward=code", "+reward.code.sandbox.python=/nope/python"))


def test_bad_config_fails_before_ray_starts(tmp_path):
    # The CLI exits with code 2 and a readable message; no Ray session is created.
    out = subprocess.run(
        [sys.executable, "-m", "toolrl.main", "rollout.n=1", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    assert "rollout.n" in out.stderr and "ray" not in out.stderr.lower()


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run(
        [sys.executable, "-m", "toolrl.main", "--cfg", "job", "trainer.total_steps=5"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "total_steps: 5" in out.stdout and "_target_: toolrl.tools.calculator" in out.stdout


@pytest.mark.parametrize("name", [p.stem for p in Path(CONF, "tools").glob("*.yaml")])
def test_every_shipped_tool_instantiates(name):
    # The embedded model is warm-started for one tool-call style; the python tool has its own.
    cfg = load(
        f"tools=[{name}]", f"model.embedded_tool={'python' if name == 'python' else 'calculator'}"
    )
    validate(cfg)
    for spec in cfg.tools.values():
        tool = instantiate(spec)
        assert tool.schema()["function"]["name"] == tool.name


@pytest.mark.parametrize("name", [p.stem for p in Path(CONF, "parser").glob("*.yaml")])
@pytest.mark.parametrize("reasoning", ["none", "qwen3", "mistral"])
def test_every_shipped_parser_instantiates(name, reasoning):
    cfg = load(f"parser={name}", f"parser/reasoning={reasoning}")
    validate(cfg)
    parser, step = build_parser(cfg.parser, [])
    parsed = parser(step("plain text, no calls").text)
    assert parsed.calls == [] and parsed.errors == []
    thought = {"none": "", "qwen3": "<think>a</think>", "mistral": "[THINK]a[/THINK]"}[reasoning]
    assert step(thought + "b") == Reasoned(
        "a" if thought else "", thought + "b" if not thought else "b"
    )


def test_the_tools_schemas_reach_a_parser_that_takes_them():
    schema = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer"}, "s": {"type": "string"}},
            },
        },
    }
    text = "<tool_call>\n<function=f>\n<parameter=n>\n5\n</parameter>\n<parameter=s>\n5\n</parameter>\n</function>\n</tool_call>"
    parser, _ = build_parser(load("parser=qwen3_coder").parser, [schema])
    assert parser(text).calls[0].arguments == {"n": 5, "s": "5"}
    parser, _ = build_parser(load("parser=qwen3_coder").parser, [])  # no schema: strings
    assert parser(text).calls[0].arguments == {"n": "5", "s": "5"}
    # a parser that takes no schemas (a user's function) is built without them
    spec = {"_target_": "toolrl.rollout.parsers.hermes.HermesParser", "max_parallel_calls": 2}
    assert build_parser(spec, [schema])[0].max_parallel_calls == 2


def _disagreements(yaml: object, code: object, path: str) -> list[str]:
    """Leaves where the composed YAML and the dataclass defaults differ. A `_target_` mapping
    may leave arguments to the target's own defaults, so only keys both give are compared."""
    if isinstance(yaml, dict) and isinstance(code, dict):
        keys = set(yaml) & set(code) if "_target_" in yaml else set(yaml) | set(code)
        return [
            d for k in sorted(keys) for d in _disagreements(yaml.get(k), code.get(k), f"{path}.{k}")
        ]
    same = yaml == code or (isinstance(code, tuple) and list(code) == yaml)
    return [] if same else [f"{path}: YAML {yaml!r}, dataclass {code!r}"]


def test_dataclass_defaults_agree_with_the_shipped_yaml():
    # One value per default: a Config built in Python and the composed default run agree.
    import dataclasses

    from omegaconf import OmegaConf

    from toolrl.config import Config

    with initialize_config_dir(config_dir=CONF, version_base=None):
        yaml = OmegaConf.to_container(compose("config"), resolve=True)
    code = dataclasses.asdict(Config())
    for group in ("tools", "reward"):  # mappings the YAML picks (calculator, product); Python none
        yaml.pop(group), code.pop(group)
    assert _disagreements(yaml, code, "") == []


def test_the_config_is_a_leaf_that_imports_no_engine_or_trainer():
    # Validating a config (before Ray starts) must not pay for torch, vLLM, Ray or transformers.
    code = "import sys, toolrl.config; print(sorted(m for m in ('torch', 'ray', 'vllm', "
    code += "'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
