"""The default task: multiply two 2-digit numbers, which only the calculator tool does reliably.

A prompt is one user message ("What is 47 * 83?"); the reward is 1.0 when the last integer
in the model's final answer equals the product. Which operand pairs are held out for
evaluation depends only on the pair itself (a fixed hash), not on the seed, so the
warm-start of the embedded model (`toolrl.models.warmstart`) and any RL run agree on it:
no eval pair ever appears in a train prompt or a warm-start trace, in either order.

    task = ArithmeticTask(ArithmeticConfig(num_train=500))
    p = task.prompts("eval")[0]; task.reward("The answer is 3901.", p.answer)

    python -m pytest tests/unit/test_arithmetic.py
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass, field, replace
from typing import Any

from toolrl.rewards.base import Scored
from toolrl.tools.calculator import CALCULATOR_SCHEMA

# `{a}` and `{b}` are the operands; every phrasing asks for a * b.
PHRASINGS: tuple[str, ...] = (
    "What is {a} * {b}?",
    "Compute {a} * {b}.",
    "Multiply {a} by {b}.",
)

_INT = re.compile(r"-?\d+")


@dataclass
class ArithmeticConfig:
    """Sizes and ranges of the multiplication task."""

    seed: int = 0
    num_train: int = 2000
    num_eval: int = 200
    min_operand: int = 10
    max_operand: int = 99
    # Share of unordered operand pairs held out for eval (chosen by a fixed hash of the pair).
    eval_fraction: float = 0.1
    phrasings: tuple[str, ...] = field(default_factory=lambda: PHRASINGS)


@dataclass
class Prompt:
    """One prompt: the chat messages the model sees (tools are added by the template), the
    answer, the row a reward reads (`{"answer": ...}` here) and the tools it offers (all)."""

    messages: list[dict[str, Any]]
    answer: str
    row: dict[str, Any] = field(default_factory=dict)
    tools: list[str] | None = None  # the names of the tools this prompt offers; None: all

    def __post_init__(self) -> None:
        self.row = self.row or {"answer": self.answer}


def is_eval_pair(a: int, b: int, eval_fraction: float) -> bool:
    """Whether the unordered pair {a, b} is held out; depends on the pair only."""
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.sha256(f"toolrl-arith:{lo}*{hi}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def last_integer(text: str) -> int | None:
    """The last integer written in `text` (e.g. 3901 in "The answer is 3901."), or None."""
    found = _INT.findall(text)
    return int(found[-1]) if found else None


class ArithmeticTask:
    """Train/eval prompts, the reward and the tool schemas of the multiplication task.

    Accepts a config or its fields as keywords, so YAML can say
    `task: {_target_: toolrl.data.arithmetic.ArithmeticTask, num_train: 500}`.
    """

    def __init__(self, cfg: ArithmeticConfig | None = None, **overrides: Any) -> None:
        cfg = cfg or ArithmeticConfig()
        if "phrasings" in overrides:
            overrides["phrasings"] = tuple(overrides["phrasings"])
        self.cfg = replace(cfg, **overrides)
        if not 0.0 < self.cfg.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in (0, 1), got {self.cfg.eval_fraction}")
        if self.cfg.min_operand > self.cfg.max_operand:
            raise ValueError("min_operand must be <= max_operand")
        self._pairs = {split: self._split_pairs(split) for split in ("train", "eval")}
        if not self._pairs["train"] or not self._pairs["eval"]:
            raise ValueError("the operand range is too small to hold out eval pairs")
        self._prompts: dict[str, list[Prompt]] = {}

    @property
    def tools_schemas(self) -> list[dict[str, Any]]:
        """The OpenAI function schemas the chat template renders: the calculator only."""
        return [CALCULATOR_SCHEMA]

    def pairs(self, split: str) -> tuple[tuple[int, int], ...]:
        """All unordered operand pairs (lo, hi) of a split, in ascending order."""
        if split not in self._pairs:
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._pairs[split]

    def _split_pairs(self, split: str) -> tuple[tuple[int, int], ...]:
        c = self.cfg
        want_eval = split == "eval"
        return tuple(
            (a, b)
            for a in range(c.min_operand, c.max_operand + 1)
            for b in range(a, c.max_operand + 1)
            if is_eval_pair(a, b, c.eval_fraction) == want_eval
        )

    def make_prompt(self, a: int, b: int, phrasing: int = 0) -> Prompt:
        text = self.cfg.phrasings[phrasing % len(self.cfg.phrasings)].format(a=a, b=b)
        return Prompt([{"role": "user", "content": text}], str(a * b))

    def sample_prompts(self, split: str, n: int, rng: random.Random) -> list[Prompt]:
        """`n` prompts from a split's pairs: each pass over the pairs is shuffled, order and
        phrasing are random, so pairs repeat only once all have been used."""
        pool = self.pairs(split)
        out: list[Prompt] = []
        while len(out) < n:
            order = list(pool)
            rng.shuffle(order)
            for lo, hi in order[: n - len(out)]:
                a, b = (lo, hi) if rng.random() < 0.5 else (hi, lo)
                out.append(self.make_prompt(a, b, rng.randrange(len(self.cfg.phrasings))))
        return out

    def prompts(self, split: str) -> list[Prompt]:
        """The fixed prompts of a split ("train" or "eval"); the same for the same config."""
        self.pairs(split)  # validates the name
        if split not in self._prompts:
            n = self.cfg.num_train if split == "train" else self.cfg.num_eval
            rng = random.Random(f"{self.cfg.seed}:{split}")
            self._prompts[split] = self.sample_prompts(split, n, rng)
        return self._prompts[split]

    def reward(self, final_text: str, answer: str) -> float:
        """1.0 if the last integer in the final answer text equals the answer, else 0.0."""
        return answer_reward(final_text, answer)


def answer_reward(final_text: str, answer: str) -> float:
    """1.0 if the last integer in the final answer text equals the answer, else 0.0."""
    got = last_integer(final_text)
    return 1.0 if got is not None and got == int(answer) else 0.0


def product_reward(x: Scored) -> float:
    """The task's reward as a config reward (conf/reward/product.yaml): 0.0 without a final
    answer, else whether its last integer is the row's answer."""
    return 0.0 if x.final_text is None else answer_reward(x.final_text, x.row["answer"])
