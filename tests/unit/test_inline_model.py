"""The embedded model's inline variant (`model.embedded_tool=calculator_inline`): its warm-start
traces are exactly what the inline protocol builds, and its recipe inserts what they show.

    python -m pytest tests/unit/test_inline_model.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import re
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir

from tests.unit.test_protocols import StreamingEngine
from toolrl.config import Config, ConfigError, ModelConfig, register, to_config
from toolrl.models import tiny
from toolrl.models import warmstart as ws
from toolrl.models import warmstart_inline as wi
from toolrl.rewards.combine import RewardStack
from toolrl.rewards.runner import RewardRunner
from toolrl.rollout.agent_loop import AgentLoop, Episode, LoopConfig
from toolrl.rollout.protocols.inline import InlineTags
from toolrl.rollout.sampler import Sampler
from toolrl.rollout.text import PlainText
from toolrl.tools.calculator import Calculator
from toolrl.validate import validate

CONF = str(Path(__file__).resolve().parents[2] / "conf")
SMALL = dataclasses.replace(
    tiny.EmbeddedModelConfig(hidden_size=64, intermediate_size=128, corpus_conversations=60),
    warmstart=ws.WarmStartConfig(tool="calculator_inline", steps=4, batch_size=2, log_every=0),
)


@pytest.fixture(scope="module")
def recipe() -> Config:
    register()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return to_config(compose("config", overrides=["+experiment=inline_calculator"]))


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    path = tiny.build_embedded_model(SMALL, tmp_path_factory.mktemp("cache"), warm_start=False)
    return AutoTokenizer.from_pretrained(path)


def test_the_variant_has_its_own_build_and_leaves_the_default_alone() -> None:
    cfg = tiny.embedded_config("calculator_inline")
    assert cfg.warmstart.tool == "calculator_inline" and ws.tool_style(cfg.warmstart.tool).inline
    assert tiny.config_hash(cfg) != tiny.config_hash(tiny.embedded_config("calculator"))
    assert tiny.config_hash(tiny.embedded_config("calculator")) == "9ab2b9f6e0046959"


def test_the_recipe_inserts_what_the_warm_start_showed(recipe: Config) -> None:
    validate(recipe)
    assert recipe.model.embedded_tool == "calculator_inline" and list(recipe.tools) == [
        "calculator"
    ]
    assert recipe.protocol["chat_template"] is False and recipe.protocol["end_tags"] == []
    (tag,) = recipe.protocol["tags"]
    assert (tag["open"], tag["close"], tag["tool"]) == (wi.OPEN, wi.CLOSE, "calculator")
    assert tag["answer"] == wi.RESULT
    with pytest.raises(ConfigError, match="set model.embedded_tool=python"):
        validate(dataclasses.replace(recipe, tools={"python": recipe.tools["calculator"]}))
    validate(dataclasses.replace(recipe, model=ModelConfig(embedded_tool="calculator")))


@pytest.mark.parametrize(("p_correct", "p_wrong_op"), [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_a_trace_is_the_inline_rollout_of_its_own_text(
    recipe: Config, tok: Any, p_correct: float, p_wrong_op: float
) -> None:
    """Replaying a trace's model pieces through the recipe's protocol and the real calculator
    gives exactly the trace's ids and mask, and the product reward the trace earns."""
    cfg = ws.WarmStartConfig(p_correct=p_correct, p_wrong_op=p_wrong_op, p_wide=0.0)
    segments = wi.make_segments(ws._task(cfg), cfg, random.Random(0))
    ids, mask = wi.encode_segments(tok, segments)
    written = [text for text, mine in segments if mine]
    written[-1] += tok.eos_token
    a, b = (int(x) for x in re.findall(r"\d+", segments[0][0]))

    kwargs = {k: v for k, v in recipe.protocol.items() if not k.startswith("_")}
    protocol = InlineTags(tok, [Calculator().schema()], **kwargs)
    engine = StreamingEngine(tok, lambda context: written[min(context.count("<result>"), 1)])
    rewards = RewardRunner(RewardStack(recipe.reward))
    loop = AgentLoop(engine, protocol, {"calculator": Calculator()}, rewards, LoopConfig(),
                     PlainText(tok).truncate)  # fmt: skip
    ep = Episode(0, [{"role": "user", "content": segments[0][0]}], row={"answer": str(a * b)})
    t = asyncio.run(loop.run(ep, Sampler(max_new_tokens=64)))
    assert t.token_ids == ids and t.loss_mask == mask
    calls = [c.arguments for turn in t.turns for c in turn.calls]
    op = "*" if p_correct else "+"
    assert calls == ([{"expression": f"{a} {op} {b}"}] if p_correct or p_wrong_op else [])
    assert t.reward == (1.0 if p_correct else 0.0)
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "".join(written)
