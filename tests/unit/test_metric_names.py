"""Every metric key the code logs matches a row of docs/metrics.md, the one list of them.

Keys come from three places: the rollout summaries run on fake trajectories, the loss's and the
update's own keys (the loss run on a tiny batch; the dict keys the actors' `update` methods
write), and every key family string literal under toolrl/ (plain, or an f-string whose parts
are filled in). A new key fails here until the page documents it.

    python -m pytest tests/unit/test_metric_names.py
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossScale, mismatch_weights, policy_loss
from toolrl.config import LossConfig, MismatchConfig, TrainerConfig
from toolrl.metrics import rollout_metrics
from toolrl.rollout.trajectory import ToolCall, ToolResult, Trajectory, Turn
from toolrl.trainer import eval_metrics

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("train", "eval", "time", "perf", "rollout", "faults", "critic")


def to_regex(key: str) -> re.Pattern:
    """A documented key as a regex: `{a,b}` is either word, `<name>` any text."""
    parts = re.findall(r"\{[^}]*\}|<[^>]*>|[^{<]+", key)
    out = ""
    for p in parts:
        if p.startswith("{"):
            out += "(?:" + "|".join(map(re.escape, p[1:-1].split(","))) + ")"
        elif p.startswith("<"):
            out += ".+"
        else:
            out += re.escape(p)
    return re.compile(out)


DOCUMENTED = [
    to_regex(m.group(1))
    for line in (ROOT / "docs" / "metrics.md").read_text().splitlines()
    if (m := re.match(r"\| `([^`]+)` \|", line))
]


def undocumented(keys) -> list[str]:
    return sorted(k for k in keys if not any(p.fullmatch(k) for p in DOCUMENTED))


def fake_batch() -> list[Trajectory]:
    out = []
    for pid in range(2):
        t = Trajectory.from_prompt(pid, [1, 2, 3])
        for _ in range(2):  # two turns
            s, e = t.append_sampled([4, 5], [-0.1, -0.2])
            calls = [ToolCall("calculator", {"a": 1})]
            t.turns.append(Turn(s, e, 0, "stop", calls, [ToolResult("calculator", "1")]))
            t.turns[-1].cached_tokens = 2
            t.append_context([6])
        t.reward = float(pid)
        t.info = {
            "final_text": "1",
            "reward_components": {"product": float(pid), "format/tags": 0.5},
            "reward_failures": 0,
        }
        out.append(t)
    return out


def test_the_rollout_summaries_are_documented():
    trajs = fake_batch()
    keys = set(rollout_metrics(trajs, "train"))
    keys |= set(eval_metrics(trajs, TrainerConfig(eval_samples=1, eval_pass_k=[1])))
    assert {"train/reward/format/tags", "train/prefix_hit_turn1", "eval/pass@1"} <= keys
    assert undocumented(keys) == []


def test_the_loss_keys_are_documented():
    trajs = fake_batch()
    batch = TrainBatch.from_trajectories(trajs, torch.tensor([1.0, -1.0]), pad_id=0)
    batch.ref_logprobs = batch.old_logprobs.clone()
    lp = batch.old_logprobs + 0.01
    cfg = LossConfig(entropy_coef=0.1, mismatch=MismatchConfig(mode="seq-mask-tis"))
    _, m = policy_loss(lp, batch, cfg, LossScale.of(batch), torch.ones_like(lp))
    _, w = mismatch_weights(lp - batch.old_logprobs, batch.loss_mask, cfg.mismatch)
    keys = {f"train/{k}" for k in (*m, *w)}  # as the trainer and the algorithm prefix them
    assert "train/mismatch/rho_mean" in keys and "train/entropy" in keys
    assert undocumented(keys) == []


def dict_keys_in(path: Path, function: str) -> set[str]:
    """String keys of the dict literals inside every function `function` of a module."""
    keys = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            for d in ast.walk(node):
                if isinstance(d, ast.Dict):
                    keys |= {k.value for k in d.keys if isinstance(k, ast.Constant)}
    return keys


def test_the_update_keys_are_documented():
    workers = ROOT / "toolrl" / "workers"
    policy = {f"train/{k}" for k in dict_keys_in(workers / "actor.py", "update")}
    critic = {f"critic/{k}" for k in dict_keys_in(workers / "critic.py", "update")}
    assert {"train/grad_norm", "critic/value_loss"} <= policy | critic
    assert undocumented(policy | critic) == []


FAMILY = "|".join(FAMILIES)
KEY = re.compile(rf"(?:{FAMILY})/[\w@/]+")
PLAIN = re.compile(rf"""(?<![\w])["']({KEY.pattern})["']""")
FSTRING = re.compile(r"""\bf(["'])(.*?)\1""")


def literal_keys(text: str) -> set[tuple[str, ...]]:
    """Key literals of the families, each as its alternatives: a plain string is one; an
    f-string has its fields filled with `x`, and one over `{prefix}` is a train/ or an eval/
    key. A field right after the family (f"train/{k}") forwards another dict's keys, which the
    tests above cover."""
    keys = {(k,) for k in PLAIN.findall(text)}
    for _, body in FSTRING.findall(text):
        ways = (
            [body.replace("{prefix}", s) for s in ("train", "eval")]
            if "{prefix}" in body
            else [body]
        )
        filled = tuple(re.sub(r"\{[^}]*\}", "x", w) for w in ways)
        if all(KEY.fullmatch(k) and not k.endswith("/x") for k in filled):
            keys.add(filled)
    return keys


def test_literal_keys_find_plain_and_formatted_ones():
    text = 'a = "time/step_s"; b = f"{prefix}/pass@{k}"; c = f"train/{k}"; d = "rollout/x.py"'
    assert literal_keys(text) == {("time/step_s",), ("train/pass@x", "eval/pass@x")}


@pytest.mark.parametrize("path", sorted((ROOT / "toolrl").rglob("*.py")), ids=str)
def test_every_key_literal_in_the_code_is_documented(path):
    missing = [
        ways for ways in literal_keys(path.read_text()) if undocumented(ways) == sorted(ways)
    ]
    assert missing == [], f"{path}: document these in docs/metrics.md"
