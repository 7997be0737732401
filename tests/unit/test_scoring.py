"""The lean scoring path (packed rows, head only at sampled columns, chunks recomputed in
backward) against the straightforward one it replaced: a padded HF forward with float32
logits over the whole vocabulary at every position. Losses and gradients must agree.

Run `python -m pytest tests/unit/test_scoring.py`.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig, LossScale, policy_loss
from toolrl.rollout.trajectory import Trajectory
from toolrl.workers import scoring
from toolrl.workers.scoring import ScoredLM, pack

VOCAB = 257


def _qwen3(tied: bool = True) -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
    )
    return Qwen3ForCausalLM(config).float()


def _batch(seed: int, n: int = 7) -> TrainBatch:
    """n ragged trajectories: prompt, then 1-3 sampled turns separated by tool answers."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: torch.randint(lo, hi, (1,), generator=gen).item()  # noqa: E731
    ids = lambda k: torch.randint(0, VOCAB, (k,), generator=gen).tolist()  # noqa: E731
    trajs = []
    for i in range(n):
        traj = Trajectory.from_prompt(i // 2, ids(rand(1, 30)))
        for turn in range(rand(1, 4)):
            if turn:
                traj.append_context(ids(rand(1, 12)))
            k = rand(1, 15)
            traj.append_sampled(ids(k), [-1.0] * k)
        trajs.append(traj)
    adv = torch.randn(n, generator=gen)
    batch = TrainBatch.from_trajectories(trajs, adv, pad_id=0)
    batch.old_logprobs = (
        batch.old_logprobs + 0.1 * torch.randn(batch.input_ids.shape, generator=gen)
    ) * batch.loss_mask
    batch.ref_logprobs = batch.old_logprobs - 0.05
    return batch


def _reference_scores(lm, mb: TrainBatch, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The replaced path: padded rows, float32 logits over the vocabulary at every position."""
    logits = lm(input_ids=mb.input_ids, attention_mask=mb.attention_mask).logits[:, :-1].float()
    logits = logits / temperature
    lse = logits.logsumexp(dim=-1)
    lp = logits.gather(-1, mb.input_ids[:, 1:, None])[..., 0] - lse
    ent = lse - (logits.softmax(dim=-1) * logits).sum(dim=-1)
    mask = mb.loss_mask[:, :-1]
    return F.pad(lp * mask, (0, 1)), F.pad(ent * mask, (0, 1))


def _loss_and_grads(score, params, mb: TrainBatch, cfg: LossConfig):
    for p in params:
        p.grad = None
    lp, ent = score(mb)
    loss, _ = policy_loss(lp, mb, cfg, LossScale.of(mb), ent)
    loss.backward()
    ent = None if ent is None else ent.detach()
    return lp.detach(), ent, loss.item(), [p.grad.clone() for p in params]


def _compare(lm, mb: TrainBatch, cfg: LossConfig, temperature: float) -> None:
    """The lean path (entropies only when the loss uses them, as the update asks) against the
    full-vocabulary one."""
    scored, entropy = ScoredLM(lm), cfg.entropy_coef > 0
    params = list(lm.parameters())
    lean = _loss_and_grads(lambda b: scored.score(b, temperature, entropy), params, mb, cfg)
    ref = _loss_and_grads(lambda b: _reference_scores(lm, b, temperature), params, mb, cfg)
    torch.testing.assert_close(lean[0], ref[0], atol=1e-5, rtol=0)
    if entropy:
        torch.testing.assert_close(lean[1], ref[1], atol=1e-5, rtol=0)
    else:
        assert lean[1] is None
    assert lean[2] == pytest.approx(ref[2], abs=1e-5)
    for g_lean, g_ref in zip(lean[3], ref[3], strict=True):
        torch.testing.assert_close(g_lean, g_ref, atol=1e-7, rtol=1e-4)  # grads ~1e-3
    assert max(g.abs().max().item() for g in ref[3]) > 1e-4  # the comparison is not vacuous


@pytest.mark.parametrize("seed", range(6))
def test_lean_scores_losses_and_gradients_equal_the_full_vocabulary_path(seed: int) -> None:
    aggregation = ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"][seed % 3]
    entropy_coef = 0.01 if seed < 3 else 0.0  # log_softmax + entropy, or cross_entropy alone
    cfg = LossConfig(kl_coef=0.01 * (seed % 2), entropy_coef=entropy_coef, aggregation=aggregation)
    lm = _qwen3(tied=seed % 2 == 0)
    assert ScoredLM(lm).plain_head
    _compare(lm, _batch(seed), cfg, temperature=[1.0, 0.7][seed % 2])


def test_chunks_recomputed_in_backward_give_the_same_gradients(monkeypatch) -> None:
    monkeypatch.setattr(scoring, "HEAD_CHUNK_TOKENS", 5)  # many chunks, a ragged last one
    for entropy_coef in (0.02, 0.0):
        _compare(_qwen3(), _batch(11), LossConfig(kl_coef=0.0, entropy_coef=entropy_coef), 1.0)


def test_a_soft_capped_head_is_detected_and_scored_through_hf() -> None:
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=5.0,
        attn_implementation="eager",
    )
    lm = Gemma2ForCausalLM(config).float()
    assert not ScoredLM(lm).plain_head
    _compare(lm, _batch(3), LossConfig(kl_coef=0.0), 1.0)


def test_packing_fills_rows_and_restarts_positions() -> None:
    mb = _batch(5, n=9)
    p = pack(mb)
    lengths = mb.attention_mask.sum(dim=1)
    width = int(lengths.max())
    assert p.input_ids.shape[1] == width
    assert p.input_ids.shape[0] < mb.size  # short rows share a packed row
    assert p.input_ids.shape[0] * width >= int(lengths.sum())
    # every segment starts at position 0, so the positions restart once per trajectory (and
    # once more per padded tail)
    starts = int((p.position_ids == 0).sum())
    assert mb.size <= starts <= mb.size + p.input_ids.shape[0]
    # the scored columns are exactly the sampled ones, each with the next token as target
    assert len(p.index) == mb.num_tokens
    flat = p.input_ids.flatten()
    assert torch.equal(flat[p.index + 1], p.targets)
    assert torch.equal(p.targets, mb.input_ids[p.rows, p.cols + 1])
    assert (mb.loss_mask[p.rows, p.cols] == 1).all()


def test_an_empty_micro_batch_scores_nothing_but_keeps_the_graph() -> None:
    """Ranks pad with empty micro-batches; their backward must still reach every parameter
    (FSDP reduces gradients in the parameters' backward hooks on every rank)."""
    lm = _qwen3()
    mb = _batch(2, n=2)
    mb.loss_mask.zero_()
    lp, _ = ScoredLM(lm).score(mb, 1.0)
    assert lp.abs().sum() == 0
    lp.sum().backward()
    assert all(p.grad is not None for p in lm.parameters())


def test_packing_is_off_when_the_attention_ignores_reset_positions() -> None:
    """The default attention honours reset positions (transformers builds the block mask); a model
    whose attention does not (here: every mask made plain causal) is scored one per row."""
    lm = _qwen3()
    assert ScoredLM(lm).packing
    import transformers.masking_utils as mu

    real = mu.find_packed_sequence_indices
    mu.find_packed_sequence_indices = lambda position_ids: None  # packing goes unnoticed
    try:
        scored = ScoredLM(lm)
        assert not scored.packing
        _compare(lm, _batch(4), LossConfig(kl_coef=0.0), 1.0)  # still exact: one per row
        mb = _batch(4)
        assert pack(mb, scored.packing).input_ids.shape[0] == mb.size
    finally:
        mu.find_packed_sequence_indices = real
