"""The critic: the policy's architecture with a scalar value head, sharded with FSDP2.

A plain class like `Policy` (toolrl.workers.actor), drivable without Ray by every rank of an
initialised torch.distributed group. `TrainWorker` holds one when the algorithm needs a critic,
either beside the policy in the same processes or in a group of its own.

The model is transformers' `AutoModelForTokenClassification` with one label: the backbone
loads from a causal-LM folder (the policy's, by default), the `score` head is new and starts
at zero, so the first values are 0. Column t's value is read at position t, the state before
token t+1, the same alignment as the logprobs (toolrl.algo.batch).

Run `python -m pytest tests/integration/test_algorithms.py`.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForTokenClassification

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossScale, value_loss
from toolrl.config import OptimConfig
from toolrl.workers.actor import (
    aligned_micro_batches,
    clip_grads,
    forward_rows,
    make_optimizer,
    shard_model,
    train_device,
)


def _load_value_model(path: str, fresh_head: bool, device: torch.device) -> nn.Module:
    config = AutoConfig.from_pretrained(path, num_labels=1)
    config.classifier_dropout = 0.0  # values must not depend on dropout noise
    torch.manual_seed(0)  # every rank must start from the same head when one is missing
    model = AutoModelForTokenClassification.from_pretrained(
        path, config=config, dtype=torch.float32
    )
    if fresh_head:
        with torch.no_grad():
            model.score.weight.zero_()
            model.score.bias.zero_()
    return shard_model(model.to(device), dist.get_world_size())


class Critic:
    """The value model, its AdamW and the clipped value loss."""

    def __init__(
        self,
        model_path: str,
        fresh_head: bool,
        optim: OptimConfig,
        value_clip: float,
        micro_batch_size: int,
        micro_batch_tokens: int | None = None,
    ) -> None:
        # transformers' token-classification head returns a view; `_values` never writes into
        # it in place, which is what FSDP2's warning is about.
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view")
        self.model = _load_value_model(model_path, fresh_head, train_device())
        self.optim_cfg, self.value_clip = optim, value_clip
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.optimizer, self.scheduler = make_optimizer(self.model, optim)

    def _values(self, mb: TrainBatch) -> Tensor:
        """[b, t] value at each column (0 at padding)."""
        out = self.model(
            input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False
        ).logits
        return out.squeeze(-1).float() * mb.attention_mask

    def values(self, batch: TrainBatch) -> Tensor:
        """[B, T] the value before token t+1 at column t, no grad, on CPU."""
        self.model.eval()
        return forward_rows(self._values, batch, self.micro_batch_size, self.micro_batch_tokens)

    def update(self, batch: TrainBatch, scale: LossScale) -> dict[str, float]:
        """One optimizer step on the clipped value loss over this rank's rows (batch.values are
        the values at rollout time, batch.returns the targets); metrics are global."""
        device, world = train_device(), dist.get_world_size()
        num_tokens = max(scale.num_tokens, 1.0)
        scale = LossScale(num_tokens, max(scale.num_seqs, 1.0))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        for mb, _ in aligned_micro_batches(batch, self.micro_batch_size, self.micro_batch_tokens):
            mb = mb.trimmed().to(device)
            loss, m = value_loss(self._values(mb), mb, self.value_clip, scale)
            (loss * world).backward()  # FSDP2 averages over ranks; * world makes it the sum
            tokens = mb.loss_mask.sum()
            sums += torch.stack([loss.detach(), m["value_clip_frac"] * tokens])
        grad_norm = clip_grads(self.model, self.optim_cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        dist.all_reduce(sums)
        return {
            "value_loss": sums[0].item(),
            "value_clip_frac": (sums[1] / num_tokens).item(),
            "value_grad_norm": grad_norm,
            "value_lr": lr,
        }
