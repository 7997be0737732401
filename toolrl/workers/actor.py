"""The trainable policy and the frozen reference, sharded with FSDP2 (`fully_shard`).

Plain classes, one per role, drivable without Ray: every rank of an initialised
torch.distributed group (gloo on CPU, NCCL on GPU) builds the same object and calls the
same methods in the same order. `toolrl.workers.train_group` wraps them in Ray actors.

Data-parallel contract: each rank gets its own rows of the batch plus `num_tokens`, the
masked-in token count of the *global* batch. Every collective (FSDP all-gather,
reduce-scatter) must run the same number of times on every rank, so ranks first agree on
the number of micro-batches and pad with empty ones (mask all 0, zero loss).

Run `python -m pytest tests/integration/test_fsdp_actor.py`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import safetensors.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig, policy_loss
from toolrl.config import OptimConfig

# Files copied from `tokenizer_src` into a saved checkpoint so it loads as a full HF model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
# Metrics averaged over masked-in tokens; "loss" is already a token mean and is summed.
_TOKEN_METRICS = ("clip_frac", "approx_kl", "kl_ref", "ratio_mean")


def shard_model(model: nn.Module, world_size: int) -> nn.Module:
    """fully_shard each decoder layer (HF's `_no_split_modules`), then the root.

    The root group holds the embedding, final norm and lm_head, so a tied lm_head shares
    its parameter with the embedding inside one group.
    """
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world_size,))
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_sharded(model_path: str, device: torch.device, trainable: bool) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    model.requires_grad_(trainable)
    return shard_model(model, dist.get_world_size())


def _token_logprobs(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) at column t; 0 without a target. [b, t].

    Raw logits (no temperature): vLLM reports sampled-token logprobs of the raw model too.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()  # [b, t-1, V]
    targets = input_ids[:, 1:].unsqueeze(-1)  # [b, t-1, 1]
    # gather - logsumexp avoids materialising a second [b, t-1, V] log_softmax tensor
    lp = logits.gather(-1, targets).squeeze(-1) - logits.logsumexp(dim=-1)
    lp = lp * attention_mask[:, 1:]  # 0 where the next token is padding, not a target
    return F.pad(lp, (0, 1))


def _empty_micro_batch() -> TrainBatch:
    """One 2-token row with nothing masked in: runs the collectives, contributes nothing."""
    zeros = torch.zeros(1, 2)
    return TrainBatch(zeros.long(), torch.ones(1, 2, dtype=torch.long), zeros, zeros, zeros, zeros)


def _aligned_micro_batches(batch: TrainBatch, size: int) -> Iterator[tuple[TrainBatch, bool]]:
    """Yield (micro-batch, is_real); every rank yields the same number of micro-batches."""
    local = list(batch.micro_batches(size))
    count = torch.tensor([len(local)], dtype=torch.long, device=_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    for i in range(int(count.item())):
        yield (local[i], True) if i < len(local) else (_empty_micro_batch(), False)


def _batched_logprobs(model: nn.Module, batch: TrainBatch, size: int) -> Tensor:
    """No-grad logprobs of the whole local batch, micro-batch by micro-batch. [B, T] on CPU."""
    model.eval()
    device, width, out = _device(), batch.input_ids.shape[1], []
    with torch.no_grad():
        for mb, real in _aligned_micro_batches(batch, size):
            mb = mb.trimmed().to(device)
            lp = _token_logprobs(model, mb.input_ids, mb.attention_mask)  # [b, t<=T]
            if real:
                out.append(F.pad(lp, (0, width - lp.shape[1])).cpu())
    return torch.cat(out) if out else torch.zeros(0, width)


def _full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Collective: the unsharded weights on rank 0 (CPU), {} elsewhere; keys as HF saves them.

    HF checkpoints of tied models hold only the embedding (vLLM's loader skips lm_head then),
    and safetensors refuses two names for one tensor, so the tied lm_head.weight is dropped.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


class Policy:
    """The trained policy: sharded HF model, AdamW, warm-up schedule."""

    def __init__(
        self, model_path: str, optim: OptimConfig, loss: LossConfig, micro_batch_size: int
    ) -> None:
        self.model = _load_sharded(model_path, _device(), trainable=True)
        self.optim_cfg, self.loss_cfg, self.micro_batch_size = optim, loss, micro_batch_size
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
        )
        warmup = optim.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        )

    def logprobs(self, batch: TrainBatch) -> Tensor:
        """[B, T] logprob of token t+1 at column t (see toolrl.algo.batch), no grad, on CPU."""
        return _batched_logprobs(self.model, batch, self.micro_batch_size)

    def update(self, batch: TrainBatch, num_tokens: float) -> dict[str, float]:
        """One optimizer step over this rank's rows; metrics are global (same on every rank).

        num_tokens: masked-in tokens of the global batch (all ranks together).
        """
        if self.loss_cfg.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 but the batch has no ref_logprobs")
        device, world = _device(), dist.get_world_size()
        num_tokens = max(float(num_tokens), 1.0)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(1 + len(_TOKEN_METRICS), dtype=torch.float64, device=device)
        ratio_max = torch.zeros(1, dtype=torch.float64, device=device)
        for mb, _ in _aligned_micro_batches(batch, self.micro_batch_size):
            mb = mb.trimmed().to(device)
            lp = _token_logprobs(self.model, mb.input_ids, mb.attention_mask)
            rest = (mb.old_logprobs, mb.advantages, mb.loss_mask, self.loss_cfg, mb.ref_logprobs)
            loss, m = policy_loss(lp, *rest, num_tokens)
            # FSDP2 averages gradients over ranks; * world turns that mean back into the sum
            # over ranks, so the step equals one process's token-mean step on the full batch.
            (loss * world).backward()
            tokens = mb.loss_mask.sum()
            sums += torch.stack([loss.detach()] + [m[k] * tokens for k in _TOKEN_METRICS])
            ratio_max = torch.maximum(ratio_max, m["ratio_max"].double().reshape(1))
        grad_norm = self._clip_grads()
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        dist.all_reduce(sums)
        dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX)
        metrics = {"loss": sums[0].item(), "grad_norm": grad_norm, "lr": lr}
        metrics |= {k: (sums[i + 1] / num_tokens).item() for i, k in enumerate(_TOKEN_METRICS)}
        return metrics | {"ratio_max": ratio_max.item(), "num_tokens": num_tokens}

    def _clip_grads(self) -> float:
        """Clip the global grad norm (over all shards); returns the norm before clipping."""
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        return float(norm.item())

    def state_dict_bytes(self) -> bytes | None:
        """Collective. Full weights as safetensors bytes on rank 0 (HF key names); None elsewhere."""
        state = _full_state_dict(self.model)
        if dist.get_rank() != 0:
            return None
        return safetensors.torch.save(state, metadata={"format": "pt"})

    def save_hf(self, out_dir: str, tokenizer_src: str | None) -> None:
        """Collective. Rank 0 writes a loadable HF checkpoint to out_dir, atomically."""
        state = _full_state_dict(self.model)
        if dist.get_rank() == 0:
            out_dir = os.path.abspath(out_dir)
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint should not be
            self.model.config.save_pretrained(tmp)
            if self.model.generation_config is not None:
                self.model.generation_config.save_pretrained(tmp)
            safetensors.torch.save_file(
                state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"}
            )
            for name in TOKENIZER_FILES if tokenizer_src else ():
                src = os.path.join(tokenizer_src, name)
                if os.path.isfile(src):
                    shutil.copy2(src, os.path.join(tmp, name))
            _replace_dir(tmp, out_dir)
        dist.barrier()


def _replace_dir(src: str, dst: str) -> None:
    """Move src to dst; an existing dst is swapped out first, so dst is never half-written."""
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=".old-", dir=os.path.dirname(dst))
        os.rename(dst, os.path.join(old, "x"))
    os.rename(src, dst)
    if old is not None:
        shutil.rmtree(old)


class Reference:
    """Frozen copy of the initial policy, sharded the same way; no optimizer."""

    def __init__(self, model_path: str, micro_batch_size: int) -> None:
        self.model = _load_sharded(model_path, _device(), trainable=False)
        self.micro_batch_size = micro_batch_size

    def logprobs(self, batch: TrainBatch) -> Tensor:
        """[B, T] reference logprob of token t+1 at column t, no grad, on CPU."""
        return _batched_logprobs(self.model, batch, self.micro_batch_size)
