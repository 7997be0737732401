"""A guessing game: the model guesses a secret number, the environment says higher or lower.

The small example of the environment protocol: `reset(row)` reads the secret and the range
from the dataset row; `step(text)` reads the last integer the model wrote and answers with
the next user message. A wrong guess costs `miss_penalty` (credited to that turn); the game
is done at the right guess (`hit_reward`). The `solved` reward scores the outcome from the
conversation (the environment's last answer), so the recipe's total is the outcome plus the
per-turn costs.

    python -m toolrl.main +experiment=guess_number
    python -m pytest tests/unit/test_protocols.py -k guess
"""

from __future__ import annotations

import re
from typing import Any

from toolrl.rewards.base import Scored
from toolrl.rollout.protocols.environment import EnvStep

CORRECT = "Correct!"
_INTEGER = re.compile(r"-?\d+")


class GuessNumber:
    """One game per trajectory (the protocol builds one per trajectory)."""

    def __init__(self, miss_penalty: float = 0.1, hit_reward: float = 0.0) -> None:
        self.miss_penalty, self.hit_reward = miss_penalty, hit_reward
        self.secret, self.low, self.high = 0, 0, 0

    def reset(self, row: dict[str, Any]) -> str | None:
        self.secret = int(row["secret"])
        self.low, self.high = int(row.get("low", 1)), int(row.get("high", 100))
        return None  # the dataset's prompt opens the game

    def step(self, text: str) -> EnvStep:
        found = _INTEGER.findall(text)
        if not found:
            hint = f"Answer with one number between {self.low} and {self.high}."
            return EnvStep(hint, -self.miss_penalty)
        guess = int(found[-1])
        if guess == self.secret:
            return EnvStep(CORRECT, self.hit_reward, done=True)
        return EnvStep("Higher." if guess < self.secret else "Lower.", -self.miss_penalty)


def solved(x: Scored) -> float:
    """1.0 when the game ended with the right guess: the final answer names the secret."""
    if x.final_text is None:
        return 0.0
    found = _INTEGER.findall(x.final_text)
    return float(bool(found) and int(found[-1]) == int(x.row["secret"]))
