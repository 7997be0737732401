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
from collections.abc import Callable, Iterator

import safetensors.torch
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig, LossScale, mismatch_weights, policy_loss
from toolrl.config import OptimConfig
from toolrl.workers.scoring import ScoredLM
from toolrl.workers.weights import new_weights_file, shm_dir

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


def shard_model(model: nn.Module, world_size: int) -> nn.Module:
    """fully_shard each decoder layer (HF's `_no_split_modules`), then the root.

    The root group holds the embedding, final norm and lm_head, so a tied lm_head shares
    its parameter with the embedding inside one group. On GPU the layers compute in bfloat16
    from float32 master weights (gradients reduced in float32); on CPU all is float32.
    """
    device_type = next(model.parameters()).device.type
    mesh = init_device_mesh(device_type, (world_size,))
    mp = MixedPrecisionPolicy()
    if device_type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layer_types = set(getattr(model, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in layer_types:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def train_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _load_sharded(model_path: str, device: torch.device, trainable: bool) -> ScoredLM:
    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    lm.requires_grad_(trainable)
    return shard_model(ScoredLM(lm), dist.get_world_size())


def _empty_like(batch: TrainBatch) -> TrainBatch:
    """One 2-token row with nothing masked in, with the same fields set as `batch`: runs the
    collectives, contributes nothing."""
    empty = batch._map(lambda t: torch.zeros(1, 2, dtype=t.dtype))
    empty.attention_mask = torch.ones(1, 2, dtype=torch.long)
    return empty


def aligned_micro_batches(
    batch: TrainBatch, size: int, max_tokens: int | None
) -> Iterator[tuple[TrainBatch, list[int] | None]]:
    """Yield (micro-batch, its rows in batch; None for padding); every rank yields the same
    number of micro-batches (see micro_batch_rows for size vs max_tokens)."""
    local = batch.micro_batch_rows(size, max_tokens)
    count = torch.tensor([len(local)], dtype=torch.long, device=train_device())
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    for i in range(int(count.item())):
        if i < len(local):
            yield batch.select(local[i]), local[i]
        else:
            yield _empty_like(batch), None


def forward_rows(
    fn: Callable[[TrainBatch], Tensor], batch: TrainBatch, size: int, max_tokens: int | None
) -> Tensor:
    """No-grad `fn(micro-batch) -> [b, t]` over the whole local batch, put back in row order.
    [B, T] on CPU."""
    device, width = train_device(), batch.input_ids.shape[1]
    out = torch.zeros(batch.size, width)
    with torch.no_grad():
        for mb, rows in aligned_micro_batches(batch, size, max_tokens):
            part = fn(mb.trimmed().to(device)).cpu()  # [b, t<=T]
            if rows is not None:
                out[torch.tensor(rows), : part.shape[1]] = part
    return out


def make_optimizer(
    model: nn.Module, optim: OptimConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW with a linear warm-up over optim.warmup_steps updates."""
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay
    )
    warmup = optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    )
    return optimizer, scheduler


def clip_grads(model: nn.Module, grad_clip: float) -> float:
    """Clip the global grad norm (over all shards); returns the norm before clipping."""
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm.item())


def _full_state_dict(model: ScoredLM) -> dict[str, Tensor]:
    """Collective: the unsharded weights on rank 0 (CPU), {} elsewhere; keys as HF saves them
    (without the `lm.` under which a ScoredLM holds the HF model).

    HF checkpoints of tied models hold only the embedding (vLLM's loader skips lm_head then),
    and safetensors refuses two names for one tensor, so the tied lm_head.weight is dropped.
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    state = {k.removeprefix("lm."): v.contiguous() for k, v in state.items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


class _Scorer:
    """A sharded causal LM that scores sampled tokens at the rollout's temperature (only the
    sampled columns: see toolrl.workers.scoring)."""

    def __init__(
        self,
        model_path: str,
        trainable: bool,
        micro_batch_size: int,
        micro_batch_tokens: int | None,
        temperature: float,
    ) -> None:
        self.model = _load_sharded(model_path, train_device(), trainable=trainable)
        self.micro_batch_size, self.micro_batch_tokens = micro_batch_size, micro_batch_tokens
        self.temperature = temperature

    def logprobs(self, batch: TrainBatch) -> Tensor:
        """[B, T] logprob of token t+1 at each sampled column t (see toolrl.algo.batch), 0 at
        the others; no grad, on CPU."""
        return forward_rows(self._logprobs, batch, self.micro_batch_size, self.micro_batch_tokens)

    def _logprobs(self, mb: TrainBatch) -> Tensor:
        self.model.eval()
        return self.model.score(mb, self.temperature)[0]


class Policy(_Scorer):
    """The trained policy: sharded HF model, AdamW, warm-up schedule."""

    def __init__(
        self,
        model_path: str,
        optim: OptimConfig,
        micro_batch_size: int,
        micro_batch_tokens: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(model_path, True, micro_batch_size, micro_batch_tokens, temperature)
        self.optim_cfg = optim
        self.optimizer, self.scheduler = make_optimizer(self.model, optim)

    def update(
        self,
        batch: TrainBatch,
        scale: LossScale,
        loss_cfg: LossConfig,
        old_out: Tensor | None = None,
    ) -> dict[str, float]:
        """One optimizer step over this rank's rows; metrics are global (same on every rank).

        scale: counts of the global mini-batch (all ranks together), see algo/losses.py;
        loss_cfg: the algorithm's loss settings. old_out: a zero [B, T] tensor, given when
        pi_old is the policy as it stands (the first step on a rollout batch): each
        micro-batch's own forward is then its pi_old (ratio 1, so the gradient is the plain
        policy gradient), and the forward's logprobs are written to old_out, saving the
        scoring pass before the update. batch.old_logprobs then hold the engine's logprobs,
        read only for the IS weights of a mismatch mode, computed here from that pi_old as
        the trainer computes them for the other rows. That forward runs in train mode: the
        same as the pass's eval mode for models without dropout (HF LMs' attention and
        hidden dropout default to 0).
        """
        if loss_cfg.kl_coef > 0 and batch.ref_logprobs is None:
            raise ValueError("kl_coef > 0 but the batch has no ref_logprobs")
        if old_out is not None and batch.is_weights is not None:
            raise ValueError("pi_old from the update's own forward: its IS weights come after")
        device, world = train_device(), dist.get_world_size()
        num_tokens = max(scale.num_tokens, 1.0)
        scale = LossScale(num_tokens, max(scale.num_seqs, 1.0))
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        ratio_max = torch.zeros(1, dtype=torch.float64, device=device)
        entropy = loss_cfg.entropy_coef > 0
        scored_old: list[tuple[list[int], Tensor]] = []  # copied to old_out after the loop
        for mb, rows in aligned_micro_batches(
            batch, self.micro_batch_size, self.micro_batch_tokens
        ):
            mb = mb.trimmed().to(device)
            lp, ent = self.model.score(mb, self.temperature, entropy)
            if old_out is not None:
                self._score_old(mb, lp.detach(), loss_cfg)
                if rows is not None:
                    scored_old.append((rows, mb.old_logprobs))
            loss, m = policy_loss(lp, mb, loss_cfg, scale, ent)
            # FSDP2 averages gradients over ranks; * world turns that mean back into the sum
            # over ranks, so the step equals one process's step on the full batch.
            (loss * world).backward()
            tokens = mb.loss_mask.sum()
            parts = {"loss": loss.detach()} | {
                k: v * tokens for k, v in m.items() if k != "ratio_max"
            }
            for k, v in parts.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=device)) + v
            ratio_max = torch.maximum(ratio_max, m["ratio_max"].double().reshape(1))
        for rows, old in scored_old:
            old_out[torch.tensor(rows), : old.shape[1]] = old.cpu()
        grad_norm = clip_grads(self.model, self.optim_cfg.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        keys = list(sums)  # the same on every rank: they follow from the config
        total = torch.stack([sums[k] for k in keys])
        dist.all_reduce(total)
        dist.all_reduce(ratio_max, op=dist.ReduceOp.MAX)
        metrics = {"loss": total[0].item(), "grad_norm": grad_norm, "lr": lr}
        metrics |= {k: (total[i] / num_tokens).item() for i, k in enumerate(keys) if i > 0}
        return metrics | {"ratio_max": ratio_max.item(), "num_tokens": num_tokens}

    @staticmethod
    def _score_old(mb: TrainBatch, old: Tensor, loss_cfg: LossConfig) -> None:
        """pi_old [b, t] from the update's own forward becomes the micro-batch's, and weighs
        it against the engine's logprobs the batch held (toolrl.algo.algorithm.mismatch)."""
        if loss_cfg.mismatch.mode != "none":
            log_rho = old - mb.old_logprobs  # trainer vs engine, [b, t]
            mb.is_weights, _ = mismatch_weights(log_rho, mb.loss_mask, loss_cfg.mismatch)
        mb.old_logprobs = old  # 0 off the sampled columns

    def state_dict_bytes(self) -> bytes | None:
        """Collective. Full weights as safetensors bytes on rank 0 (HF key names); None elsewhere."""
        state = _full_state_dict(self.model)
        if dist.get_rank() != 0:
            return None
        return safetensors.torch.save(state, metadata={"format": "pt"})

    def write_weights(self) -> str | None:
        """Collective. Rank 0 writes the full weights (HF key names) to a new safetensors file
        in shared memory (/dev/shm, else the temp folder) and returns its path; None elsewhere,
        and on rank 0 when the folder has no room for them."""
        state = _full_state_dict(self.model)
        if dist.get_rank() != 0:
            return None
        size = sum(t.numel() * t.element_size() for t in state.values())
        stat = os.statvfs(shm_dir())
        if stat.f_bavail * stat.f_frsize < 1.1 * size:  # a container's small /dev/shm
            return None
        path = new_weights_file()
        try:
            safetensors.torch.save_file(state, path, metadata={"format": "pt"})
        except BaseException:
            os.unlink(path)
            raise
        return path

    def save_hf(self, out_dir: str, tokenizer_src: str | None) -> None:
        """Collective. Rank 0 writes a loadable HF checkpoint to out_dir, atomically."""
        state = _full_state_dict(self.model)
        if dist.get_rank() == 0:
            out_dir = os.path.abspath(out_dir)
            os.makedirs(os.path.dirname(out_dir), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(out_dir))
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the checkpoint should not be
            lm = self.model.lm
            lm.config.save_pretrained(tmp)
            if lm.generation_config is not None:
                lm.generation_config.save_pretrained(tmp)
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


class Reference(_Scorer):
    """Frozen copy of the initial policy, sharded the same way; no optimizer."""

    def __init__(
        self,
        model_path: str,
        micro_batch_size: int,
        micro_batch_tokens: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        super().__init__(model_path, False, micro_batch_size, micro_batch_tokens, temperature)
