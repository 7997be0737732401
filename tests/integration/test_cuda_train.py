"""The FSDP2 training roles on a GPU: NCCL, bfloat16 compute over float32 master weights.

Skipped where torch sees no CUDA device (CI, the CPU machines). On a GPU machine, in this
process as rank 0 of a one-rank NCCL group (NCCL refuses two ranks on one GPU):

    python -m pytest tests/integration/test_cuda_train.py

The CPU twin, tests/integration/test_fsdp_actor.py, checks the same roles in float32 against
an unsharded HF model to 1e-5; here the reference is the same float32 HF model on the CPU,
and the tolerances are those of bfloat16 compute (8 bits of mantissa).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
from transformers import Qwen2ForCausalLM

from tests.integration.test_fsdp_actor import _hf_logprobs, _hf_model, _make_batch
from tests.integration.test_fsdp_actor import model_dir as model_dir  # the tiny Qwen2 fixture
from tests.net import free_port
from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig, LossScale
from toolrl.workers.actor import OptimConfig, Policy, Reference, train_device
from toolrl.workers.critic import Critic
from toolrl.workers.train_state import load_train_state, save_train_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16_LOGPROB_ATOL = 0.02  # measured worst: 0.0027 on an H200 (torch 2.11, this tiny model)


@pytest.fixture(scope="module", autouse=True)
def nccl_group() -> Iterator[None]:
    port = free_port()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def batch(model_dir: str) -> TrainBatch:
    return _make_batch(model_dir, seed=1)


def test_roles_train_on_the_gpu_in_bfloat16_over_float32_masters(model_dir: str) -> None:
    policy = Policy(model_dir, OptimConfig(lr=1e-4), micro_batch_size=2)
    assert train_device().type == "cuda"
    params = list(policy.model.parameters())
    assert all(p.device.type == "cuda" and p.dtype == torch.float32 for p in params)
    # the probes ran on the GPU in float32 before sharding: both savings stay on
    assert policy.model.packing and policy.model.plain_head
    seen: list[torch.dtype] = []
    layer = policy.model.lm.model.layers[0]
    hook = layer.mlp.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    policy.logprobs(_make_batch(model_dir, seed=3, n=2, with_old=False))
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_bf16_logprobs_track_the_float32_model(model_dir: str, batch: TrainBatch) -> None:
    policy = Policy(model_dir, OptimConfig(), micro_batch_size=2)
    got = policy.logprobs(batch)
    expected = _hf_logprobs(_hf_model(model_dir), batch)
    sampled = batch.loss_mask.bool()
    worst = (got[sampled] - expected[sampled]).abs().max().item()
    print(f"bf16 vs float32 logprobs: worst |diff| {worst:.4f} over {int(sampled.sum())}")
    assert worst < BF16_LOGPROB_ATOL
    assert (got[~sampled] == 0).all()
    hot = Policy(model_dir, OptimConfig(), micro_batch_size=2, temperature=0.7).logprobs(batch)
    tempered = _hf_logprobs(_hf_model(model_dir), batch, temperature=0.7)
    assert (hot[sampled] - tempered[sampled]).abs().max() < BF16_LOGPROB_ATOL


def test_update_weights_and_hf_checkpoint_load_on_the_cpu(
    model_dir: str, batch: TrainBatch, tmp_path: Path
) -> None:
    policy = Policy(model_dir, OptimConfig(lr=1e-4), micro_batch_size=2, micro_batch_tokens=24)
    metrics = policy.update(batch, LossScale.of(batch), LossConfig(kl_coef=0.0))
    assert metrics["num_tokens"] == batch.num_tokens and metrics["grad_norm"] > 0
    assert metrics["ratio_mean"] == pytest.approx(1.0, abs=0.02)  # on-policy, up to bf16
    state = safetensors.torch.load(policy.state_dict_bytes())
    before = _hf_model(model_dir).state_dict()
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in state.values())
    moved = max((state[k] - before[k]).abs().max().item() for k in state)
    assert 5e-5 < moved < 1e-3  # Adam's first step moves a weight by about lr
    path = policy.write_weights()
    assert path is not None
    try:
        shm = safetensors.torch.load_file(path)
    finally:
        os.unlink(path)
    assert all(torch.equal(shm[k], state[k]) for k in state)
    fresh = Qwen2ForCausalLM(_hf_model(model_dir).config)
    fresh.load_state_dict(state, strict=False)
    probe = _make_batch(model_dir, seed=7, with_old=False)
    mask = probe.loss_mask.bool()
    on_gpu = policy.logprobs(probe)
    on_cpu = _hf_logprobs(fresh.eval(), probe)
    assert (on_gpu[mask] - on_cpu[mask]).abs().max() < BF16_LOGPROB_ATOL
    policy.save_hf(str(tmp_path / "hf"), tokenizer_src=None)
    saved = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.equal(saved[k], state[k]) for k in state)


def test_grpo_with_reference_raises_positive_advantage_tokens(model_dir: str) -> None:
    part = _make_batch(model_dir, seed=1)
    policy = Policy(model_dir, OptimConfig(lr=3e-3), micro_batch_size=2)
    reference = Reference(model_dir, micro_batch_size=3)
    mask, adv = part.loss_mask.bool(), part.advantages
    start = policy.logprobs(part)
    for _ in range(4):
        part.old_logprobs = policy.logprobs(part) * part.loss_mask
        part.ref_logprobs = reference.logprobs(part)
        metrics = policy.update(part, LossScale.of(part), LossConfig(kl_coef=0.01))
    gain = policy.logprobs(part) - start
    assert gain[mask & (adv > 0)].mean() > 0.05
    assert gain[mask & (adv < 0)].mean() < -0.05
    assert metrics["kl_ref"] > 0


def test_critic_regresses_and_train_state_resumes_on_the_gpu(
    model_dir: str, tmp_path: Path
) -> None:
    batch = _make_batch(model_dir, seed=1)
    scale, loss = LossScale.of(batch), LossConfig(kl_coef=0.0)
    optim = OptimConfig(lr=1e-3, warmup_steps=4)
    batch.values = torch.zeros_like(batch.loss_mask, dtype=torch.float32)
    batch.returns = batch.loss_mask.float()

    def roles() -> tuple[Policy, Critic]:
        return Policy(model_dir, optim, 2), Critic(model_dir, True, optim, 10.0, 2)

    policy, critic = roles()
    assert critic.values(batch).abs().max() == 0  # a fresh head predicts 0
    policy.update(batch, scale, loss)
    first = critic.update(batch, scale)["value_loss"]
    save_train_state(str(tmp_path / "policy"), policy)
    save_train_state(str(tmp_path / "critic"), critic)
    straight = policy.update(batch, scale, loss)
    history = [critic.update(batch, scale)["value_loss"] for _ in range(5)]
    assert history[-1] < 0.75 * first  # lr warms up over 4 steps: 0.5 -> 0.31 on the CPU
    weights = safetensors.torch.load(policy.state_dict_bytes())

    policy, critic = roles()
    load_train_state(str(tmp_path / "policy"), policy)
    load_train_state(str(tmp_path / "critic"), critic)
    resumed = policy.update(batch, scale, loss)
    assert resumed["lr"] == pytest.approx(1e-3 * 2 / 4)  # the warm-up resumed at step 2
    assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5, abs=1e-7)
    again = safetensors.torch.load(policy.state_dict_bytes())
    worst = max((again[k] - weights[k]).abs().max().item() for k in weights)
    assert worst < 1e-6
    assert critic.update(batch, scale)["value_loss"] == pytest.approx(history[0], rel=1e-4)
