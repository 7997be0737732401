"""Scoring sampled tokens cheaply: packed rows, and the LM head only where a token is scored.

The trainer needs log p(token t+1 | tokens ..t) only at the columns the policy sampled
(loss_mask 1); in a tool-calling trajectory most columns are prompt, tool answers and
template glue. Three savings over one padded HF forward with full-vocabulary logits:

- packing: a micro-batch's trajectories are laid end to end in rows as wide as its longest
  one (first-fit decreasing), each restarting its position ids at 0. With no attention mask,
  transformers turns reset position ids into a block-diagonal causal mask, so no token sees
  another trajectory's; padding shrinks to what the rows cannot fill.
- the head only at scored positions: hidden states [N, H] are gathered first, then the
  logits [N, V] computed from them.
- in chunks of HEAD_CHUNK_TOKENS rows, recomputed in backward (torch.utils.checkpoint):
  autograd keeps [N, H] and one chunk's logits at a time, never [N, V] float32.

A model whose logits are not `lm_head(last hidden state)` (soft-capping, logit scaling) is
detected at load by comparing both on a probe input, and scored through HF's own forward.
Likewise, packing is used only if a probe shows that a packed sequence scores as it does
alone (an attention implementation or remote code that ignores reset positions does not).

Run `python -m pytest tests/unit/test_scoring.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from toolrl.algo.batch import TrainBatch

HEAD_CHUNK_TOKENS = 1024  # [1024, 152k] float32 logits: 0.6 GB, a chunk adds a few (log-softmax)


@dataclass
class Packed:
    """A micro-batch's trajectories packed into rows, and where its scored columns are."""

    input_ids: Tensor  # [R, W]
    position_ids: Tensor  # [R, W], 0.. within each trajectory (and within the padding tail)
    index: Tensor  # [N] flat index into [R * W] of each scored column
    targets: Tensor  # [N] the token each scored column predicts (the next one)
    rows: Tensor  # [N] row of each scored column in the [B, T] micro-batch
    cols: Tensor  # [N] its column there

    def to(self, device: torch.device) -> Packed:
        return Packed(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    def unpack(self, values: Tensor, shape: torch.Size) -> Tensor:
        """values [N] (with their gradient) placed back at [rows, cols] of a zero [B, T]."""
        return values.new_zeros(shape).index_put((self.rows, self.cols), values)


def pack(mb: TrainBatch, packing: bool = True) -> Packed:
    """Pack the micro-batch's rows (first-fit decreasing into rows of its longest length;
    one per row without `packing`); the scored columns are those with loss_mask > 0."""
    lengths = mb.attention_mask.sum(dim=1).tolist()
    width = max(max(lengths, default=1), 1)
    bins: list[list[int]] = []  # rows of the batch in each packed row, in order
    free: list[int] = []
    for i in sorted(range(mb.size), key=lambda i: -lengths[i]):
        slot = next((r for r, f in enumerate(free) if lengths[i] <= f and packing), None)
        if slot is None:
            bins.append([])
            free.append(width)
            slot = len(bins) - 1
        bins[slot].append(i)
        free[slot] -= lengths[i]
    input_ids = torch.zeros(len(bins), width, dtype=torch.long)
    position_ids = torch.zeros(len(bins), width, dtype=torch.long)
    index, rows, cols = [], [], []
    for r, members in enumerate(bins):
        offset = 0
        for i in members:
            n = lengths[i]
            input_ids[r, offset : offset + n] = mb.input_ids[i, :n]
            position_ids[r, offset : offset + n] = torch.arange(n)
            c = mb.loss_mask[i, :n].nonzero().flatten()  # column c scores token c + 1
            index.append(r * width + offset + c)
            rows.append(torch.full_like(c, i))
            cols.append(c)
            offset += n
        position_ids[r, offset:] = torch.arange(width - offset)  # the tail: its own segment
    cat = lambda parts: torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)  # noqa: E731
    index, rows, cols = cat(index), cat(rows), cat(cols)
    targets = mb.input_ids[rows, cols + 1] if len(rows) else torch.zeros(0, dtype=torch.long)
    return Packed(input_ids, position_ids, index, targets, rows, cols)


def _logprobs_of(
    logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor]:
    """(logprob of targets, entropy or 0) under softmax(logits / temperature). logits [n, V]
    float32, targets [n]; returns [n] each.

    Through cross_entropy, PyTorch's fused log-softmax + gather: on this project's CPU its
    forward + backward over a head chunk took 1.1-1.2x less time than gather - logsumexp,
    its forward about the same (`python bench/head.py`)."""
    if temperature != 1.0:
        logits = logits / temperature
    if not with_entropy:
        logprobs = -nn.functional.cross_entropy(logits, targets, reduction="none")
        return logprobs, torch.zeros_like(logprobs)
    log_p = logits.log_softmax(dim=-1)  # [n, V]
    return log_p.gather(-1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(dim=-1)


def _head_chunk(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor]:
    logits = nn.functional.linear(hidden, weight, bias).float()  # [n, V]
    return _logprobs_of(logits, targets, temperature, with_entropy)


def head_logprobs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[Tensor, Tensor | None]:
    """Logprobs (and entropies) of targets [N] from hidden states [N, H], chunk by chunk; with
    the gradient, each chunk's logits are recomputed in backward instead of kept."""
    lps, ents = [], []
    for start in range(0, max(hidden.shape[0], 1), HEAD_CHUNK_TOKENS):
        args = (hidden[start : start + HEAD_CHUNK_TOKENS], weight, bias)
        args += (targets[start : start + HEAD_CHUNK_TOKENS], temperature, with_entropy)
        if torch.is_grad_enabled():
            lp, ent = checkpoint(_head_chunk, *args, use_reentrant=False)
        else:
            lp, ent = _head_chunk(*args)
        lps.append(lp)
        ents.append(ent)
    return torch.cat(lps), torch.cat(ents) if with_entropy else None


def _plain_head(lm: nn.Module) -> bool:
    """True when lm's logits are exactly its output embedding applied to the last hidden state."""
    config = lm.config
    scaled = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    if any(getattr(config, k, None) not in (None, 1, 1.0) for k in scaled):
        return False
    device = next(lm.parameters()).device
    probe = (torch.arange(8, device=device)[None] * 7919 + 11) % config.vocab_size
    with torch.no_grad():
        logits = lm(input_ids=probe, use_cache=False).logits
        hidden = lm.base_model(input_ids=probe, use_cache=False).last_hidden_state
        head = lm.get_output_embeddings()(hidden)
    return torch.allclose(logits, head, atol=1e-5, rtol=1e-5)


def _packing_isolates(lm: nn.Module) -> bool:
    """True when a sequence packed behind another (reset position ids, no attention mask)
    gets the logits it gets alone: the attention honours the packing."""
    device = next(lm.parameters()).device
    a = (torch.arange(5, device=device) * 31 + 7) % lm.config.vocab_size
    b = (torch.arange(7, device=device) * 17 + 3) % lm.config.vocab_size
    positions = torch.cat([torch.arange(5), torch.arange(7)]).to(device)[None]
    with torch.no_grad():
        packed = lm(input_ids=torch.cat([a, b])[None], position_ids=positions, use_cache=False)
        alone = lm(input_ids=b[None], use_cache=False)
    return torch.allclose(packed.logits[0, 5:], alone.logits[0], atol=1e-4, rtol=1e-4)


class ScoredLM(nn.Module):
    """A Hugging Face causal LM whose forward scores packed, scored columns: the root module
    that FSDP2 shards last, so the embedding, final norm and head are gathered for it.

    state_dict keys carry the prefix `lm.` (toolrl.workers.actor cuts it off when saving)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config
        self.plain_head = _plain_head(lm)
        self.packing = _packing_isolates(lm)
        self._no_split_modules = getattr(lm, "_no_split_modules", None)

    def forward(
        self,
        input_ids: Tensor,  # [R, W]
        position_ids: Tensor,  # [R, W]
        index: Tensor,  # [N]
        targets: Tensor,  # [N]
        temperature: float = 1.0,
        with_entropy: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """(logprob [N], entropy [N] or None) of each target at its scored column."""
        kwargs = {"input_ids": input_ids, "position_ids": position_ids, "use_cache": False}
        if self.plain_head:
            hidden = self.lm.base_model(**kwargs).last_hidden_state  # [R, W, H]
            scored = hidden.flatten(0, 1)[index]  # [N, H]
            head = self.lm.get_output_embeddings()
            return head_logprobs(scored, head.weight, head.bias, targets, temperature, with_entropy)
        logits = self.lm(**kwargs).logits.flatten(0, 1)[index].float()  # [N, V]
        lp, ent = _logprobs_of(logits, targets, temperature, with_entropy)
        return lp, ent if with_entropy else None

    def score(
        self, mb: TrainBatch, temperature: float, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """[B, T] logprob of token t+1 at each sampled column t of mb (0 elsewhere), and the
        entropy there when asked; with the gradient when enabled."""
        device = next(self.parameters()).device
        p = pack(mb.to("cpu"), self.packing).to(device)
        lp, ent = self(p.input_ids, p.position_ids, p.index, p.targets, temperature, with_entropy)
        shape = mb.input_ids.shape
        return p.unpack(lp, shape), None if ent is None else p.unpack(ent, shape)
