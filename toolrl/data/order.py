"""The order training prompts are drawn in: seeded, epoch by epoch, resumable from a small state.

Any task's train prompts are walked the same way, so the order and its state live here, in the
trainer, not in each task. Epoch `e` is a fresh permutation of the prompt indices, drawn from
`random.Random(seed + e * 2**32)` (so epoch 0 is `random.Random(seed)`); a batch that runs
past the end of an epoch continues into the next one.

    order = PromptOrder(num_prompts=2000, seed=0)
    ids = order.next_indices(16)        # prompt indices of the next training step
    state = order.state_dict()          # JSON-able; PromptOrder(2000, 0).load_state_dict(state)

    python -m pytest tests/unit/test_prompt_order.py
"""

from __future__ import annotations

import random

# Epochs of one seed never share a stream: Python seeds a Random from every 32-bit chunk of
# an int, so seed + e * 2**32 differs from seed + e' * 2**32 for any seed below 2**32.
_EPOCH_STRIDE = 2**32


class PromptOrder:
    """Walks `num_prompts` indices in a seeded permutation per epoch."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        if num_prompts < 1:
            raise ValueError(f"there are no training prompts to draw from (got {num_prompts})")
        self.num_prompts, self.seed = num_prompts, seed
        self.epoch = 0  # full passes completed
        self.position = 0  # index into the current epoch's permutation
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(self.seed + epoch * _EPOCH_STRIDE).shuffle(order)
        return order

    def next_indices(self, n: int) -> list[int]:
        """The next `n` prompt indices; crossing the end of an epoch starts the next one."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        out: list[int] = []
        while len(out) < n:
            take = self._perm[self.position : self.position + n - len(out)]
            out.extend(take)
            self.position += len(take)
            if self.position == self.num_prompts:  # move on at once, so the state is canonical
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
        return out

    def state_dict(self) -> dict[str, int]:
        """Where the walk stands: with the same seed and prompts, enough to continue exactly."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_prompts": self.num_prompts,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state_dict()`. The seed and the number of prompts must match, since
        another permutation would silently repeat some prompts and skip others."""
        if state["seed"] != self.seed or state["num_prompts"] != self.num_prompts:
            raise ValueError(
                f"the saved prompt order (seed {state['seed']}, {state['num_prompts']} prompts) "
                f"does not match this run (seed {self.seed}, {self.num_prompts} prompts); "
                "resume with the same trainer.seed and task data"
            )
        if not 0 <= state["position"] < self.num_prompts or state["epoch"] < 0:
            raise ValueError(f"bad prompt-order state {state}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._perm = self._permutation(self.epoch)
