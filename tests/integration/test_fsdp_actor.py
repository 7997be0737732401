"""FSDP2 Policy/Reference on real torch.distributed (gloo, 2 ranks) and the Ray TrainGroup.

Ranks are spawned with torch.multiprocessing; each scenario writes its results to files
that the test (the parent process) compares against a plain, unsharded HF model.
Run `python -m pytest tests/integration/test_fsdp_actor.py` (about a minute on 2 cores).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.net import free_port
from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig, LossScale, mismatch_weights
from toolrl.config import MismatchConfig
from toolrl.rollout.trajectory import Trajectory
from toolrl.workers.actor import OptimConfig, Policy, Reference
from toolrl.workers.critic import Critic
from toolrl.workers.train_state import load_train_state, save_train_state

VOCAB = 300


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny_qwen2")
    Qwen2ForCausalLM(config).float().save_pretrained(path)
    return str(path)


def _make_batch(model_dir: str, seed: int, n: int = 5, with_old: bool = True) -> TrainBatch:
    """n trajectories: prompt, sampled turn, tool answer (mask 0), sampled turn; ragged lengths.

    Rollout logprobs are the model's own (on-policy), as vLLM would report them.
    """
    gen = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, VOCAB, (k,), generator=gen).tolist()  # noqa: E731
    trajs = []
    for i in range(n):
        traj = Trajectory.from_prompt(i // 2, rand(4 + i))
        traj.append_sampled(rand(3 + i % 3), [-1.0] * (3 + i % 3))
        traj.append_context(rand(2))
        traj.append_sampled(rand(2 + i), [-1.0] * (2 + i))
        trajs.append(traj)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 1.0, -1.0, 0.7][:n])
    batch = TrainBatch.from_trajectories(trajs, adv, pad_id=0)
    if with_old:
        batch.old_logprobs = _hf_logprobs(_hf_model(model_dir), batch) * batch.loss_mask
    return batch


def _hf_model(path: str) -> Qwen2ForCausalLM:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _hf_logprobs(
    model: torch.nn.Module, batch: TrainBatch, temperature: float = 1.0
) -> torch.Tensor:
    """Unsharded reference: log_softmax over the vocabulary of logits / temperature, target =
    next token. [B, T]."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lp = torch.log_softmax(logits[:, :-1] / temperature, dim=-1)
    lp = lp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    has_target = torch.nn.functional.pad(batch.attention_mask[:, 1:], (0, 1))  # [B, T]
    return torch.nn.functional.pad(lp, (0, 1)) * has_target


def _probe_logprobs(policy: Policy, model_dir: str) -> torch.Tensor:
    """The sharded policy's scores of a fixed batch (its logits are not exposed: the lean
    path computes the head only at sampled columns)."""
    return policy.logprobs(_make_batch(model_dir, seed=7, with_old=False))


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _finish() -> None:
    """Leave the group and exit without interpreter teardown.

    Measured: about 1 exit in 20 (under load) aborted with "terminate called without an
    active exception" *after* destroy_process_group, while Python finalised objects still
    holding the gloo group (FSDP's mesh). All results are on disk by then; skip teardown.
    """
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _scenario_update(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """Logprobs, one update, weights, save_hf. Rank r gets rows split(world)[r] (uneven)."""
    _init(rank, world, port)
    batch: TrainBatch = torch.load(f"{out}/../batch.pt", weights_only=False)
    policy = Policy(model_dir, OptimConfig(lr=1e-4), micro_batch_size=2)
    part = batch.split(world)[rank]
    torch.save(policy.logprobs(part), f"{out}/logprobs{rank}.pt")
    metrics = policy.update(part, LossScale.of(batch), LossConfig(kl_coef=0.0))
    probe = _probe_logprobs(policy, model_dir)
    weights = policy.state_dict_bytes()
    policy.save_hf(f"{out}/hf", tokenizer_src=f"{out}/../tok")
    if rank == 0:
        Path(f"{out}/weights.safetensors").write_bytes(weights)
        torch.save(probe, f"{out}/probe.pt")
        Path(f"{out}/metrics.json").write_text(json.dumps(metrics))
    else:
        assert weights is None
    _finish()


def _scenario_grpo(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """A few on-policy GRPO steps with a KL penalty; logs positive/negative-token logprobs."""
    _init(rank, world, port)
    batch: TrainBatch = torch.load(f"{out}/../batch.pt", weights_only=False)
    part = batch.split(world)[rank]
    loss = LossConfig(kl_coef=0.01)
    policy = Policy(model_dir, OptimConfig(lr=3e-3), micro_batch_size=2)
    reference = Reference(model_dir, micro_batch_size=3)
    history = []
    for _ in range(4):
        part.old_logprobs = policy.logprobs(part) * part.loss_mask
        part.ref_logprobs = reference.logprobs(part)
        history.append((part.old_logprobs.clone(), part.ref_logprobs.clone()))
        metrics = policy.update(part, LossScale.of(batch), loss)
    history.append((policy.logprobs(part) * part.loss_mask, None))
    torch.save((history, metrics), f"{out}/grpo{rank}.pt")
    _finish()


def _grads_of_one_update(
    policy: Policy, part: TrainBatch, scale: LossScale, loss: LossConfig, **kwargs: object
):
    """The full (unsharded) gradients one update computes; the optimizer step is skipped."""
    policy.optimizer.step = lambda: None  # keep the weights: every policy starts equal
    policy.update(part, scale, loss, **kwargs)
    return {n: p.grad.full_tensor().clone() for n, p in policy.model.named_parameters()}


def _old_from_the_update(model_dir: str, part: TrainBatch, scale: LossScale, out: str) -> None:
    """The same first update with pi_old from a scoring pass, and from the update's own forward
    (`old_out`, the rollout's logprobs in the batch are then not read); a KL term in both."""
    loss, optim = LossConfig(kl_coef=0.05), OptimConfig(lr=1e-3, grad_clip=0.0)
    passed = Policy(model_dir, optim, micro_batch_size=2, micro_batch_tokens=24)
    scored = passed.logprobs(part)  # [b, T]
    ref = scored - 0.3 * torch.rand(scored.shape, generator=torch.Generator().manual_seed(3))
    base = dataclasses.replace(part, ref_logprobs=ref * part.loss_mask)
    with_pass = _grads_of_one_update(
        passed, dataclasses.replace(base, old_logprobs=scored), scale, loss
    )
    own = Policy(model_dir, optim, micro_batch_size=2, micro_batch_tokens=24)
    old_out = torch.zeros(part.input_ids.shape)
    stale = dataclasses.replace(base, old_logprobs=base.old_logprobs - 0.5 * part.loss_mask)
    from_update = _grads_of_one_update(own, stale, scale, loss, old_out=old_out)
    # with IS weights: pi_old against the engine's logprobs, weighed by the trainer before a
    # pass's update, by the update itself when it scores pi_old (tis at 1.1 cuts some rho)
    tis = dataclasses.replace(loss, mismatch=MismatchConfig(mode="tis", high=1.1))
    noise = torch.rand(scored.shape, generator=torch.Generator().manual_seed(4))
    engine = (scored - 0.2 * noise) * part.loss_mask
    weights, _ = mismatch_weights(scored - engine, part.loss_mask, tis.mismatch)
    weighed = dataclasses.replace(base, old_logprobs=scored, is_weights=weights)
    weighed_pass = _grads_of_one_update(passed, weighed, scale, tis)
    own_engine = dataclasses.replace(base, old_logprobs=engine)
    weighed_own = _grads_of_one_update(
        own, own_engine, scale, tis, old_out=torch.zeros_like(old_out)
    )
    grads = (with_pass, from_update, weighed_pass, weighed_own)
    torch.save((grads, scored, old_out), out)


def _scenario_budget(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """Gradients of micro_batch_size vs micro_batch_tokens micro-batches, per aggregation; and
    a critic (fresh value head) regressing on returns for a few steps."""
    _init(rank, world, port)
    batch: TrainBatch = torch.load(f"{out}/../batch.pt", weights_only=False)
    part, scale = batch.split(world)[rank], LossScale.of(batch)
    grads = {}
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        loss = LossConfig(kl_coef=0.0, aggregation=agg)
        optim = OptimConfig(lr=1e-3, grad_clip=0.0)
        rows = Policy(model_dir, optim, micro_batch_size=2)
        budget = Policy(model_dir, optim, micro_batch_size=2, micro_batch_tokens=24)
        grads[agg] = (
            _grads_of_one_update(rows, part, scale, loss),
            _grads_of_one_update(budget, part, scale, loss),
        )
        assert len(part.micro_batch_rows(2, 24)) != len(part.micro_batch_rows(2))
    _old_from_the_update(model_dir, part, scale, f"{out}/own_old{rank}.pt")
    hot = Policy(model_dir, OptimConfig(), micro_batch_size=2, temperature=0.7).logprobs(part)
    torch.save(hot, f"{out}/hot{rank}.pt")
    critic = Critic(model_dir, True, OptimConfig(lr=1e-2), 10.0, micro_batch_size=2)
    part.values = critic.values(part)
    part.returns = torch.where(part.loss_mask > 0, 1.0, 0.0)
    history = [critic.update(part, scale)["value_loss"] for _ in range(6)]
    torch.save((grads, part.values, history, critic.values(part)), f"{out}/budget{rank}.pt")
    _finish()


def _scenario_resume(rank: int, world: int, port: int, model_dir: str, out: str) -> None:
    """World 2 (`out` ends in /save): update, save_state, update again, keeping the weights;
    then a fresh policy loads the state and takes the second update. Any world size (the
    /load run): only load and take the second update. The critic saves and loads alike."""
    _init(rank, world, port)
    batch: TrainBatch = torch.load(f"{out}/../batch.pt", weights_only=False)
    part, scale, loss = batch.split(world)[rank], LossScale.of(batch), LossConfig(kl_coef=0.0)
    optim = OptimConfig(lr=1e-3, warmup_steps=4)  # the schedule must resume too
    ckpt = f"{out}/../save/ckpt"
    if out.endswith("save"):
        policy = Policy(model_dir, optim, micro_batch_size=2)
        critic = Critic(model_dir, True, optim, 10.0, micro_batch_size=2)
        part.values = torch.zeros_like(part.loss_mask, dtype=torch.float32)
        part.returns = part.loss_mask.float()
        policy.update(part, scale, loss)
        critic.update(part, scale)
        save_train_state(f"{ckpt}/policy", policy)
        save_train_state(f"{ckpt}/critic", critic)
        policy.update(part, scale, loss)
        critic.update(part, scale)
        weights, values = policy.state_dict_bytes(), critic.values(part)
        torch.save(values, f"{out}/straight_values{rank}.pt")
        if rank == 0:
            Path(f"{out}/straight.safetensors").write_bytes(weights)
    policy = Policy(model_dir, optim, micro_batch_size=2)
    critic = Critic(model_dir, True, optim, 10.0, micro_batch_size=2)
    load_train_state(f"{ckpt}/policy", policy)
    load_train_state(f"{ckpt}/critic", critic)
    part.values = torch.zeros_like(part.loss_mask, dtype=torch.float32)
    part.returns = part.loss_mask.float()
    metrics = policy.update(part, scale, loss)
    critic.update(part, scale)
    weights, values = policy.state_dict_bytes(), critic.values(part)
    torch.save(values, f"{out}/resumed_values{rank}.pt")
    if rank == 0:
        Path(f"{out}/resumed.safetensors").write_bytes(weights)
        Path(f"{out}/metrics.json").write_text(json.dumps(metrics))
    _finish()


def _spawn(fn, world: int, model_dir: str, out: Path) -> Path:  # noqa: ANN001
    out.mkdir(parents=True)
    mp.spawn(fn, args=(world, free_port(), model_dir, str(out)), nprocs=world, join=True)
    return out


@pytest.fixture(scope="module")
def runs(model_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    torch.save(_make_batch(model_dir, seed=1), root / "batch.pt")
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    (root / "tok" / "chat_template.jinja").write_text("{{ messages }}")
    return {
        "w2": _spawn(_scenario_update, 2, model_dir, root / "w2"),
        "w1": _spawn(_scenario_update, 1, model_dir, root / "w1"),
        "grpo": _spawn(_scenario_grpo, 2, model_dir, root / "grpo"),
        "budget": _spawn(_scenario_budget, 2, model_dir, root / "budget"),
        "save": _spawn(_scenario_resume, 2, model_dir, root / "save"),
        "load": _spawn(_scenario_resume, 1, model_dir, root / "load"),
        "root": root,
    }


def test_train_state_resumes_bitwise_and_reshards(runs: dict[str, Path]) -> None:
    """A saved and reloaded policy and critic take the same next update as ones that never
    stopped: bitwise on the same world size, within float error on another (1 rank)."""
    straight = safetensors.torch.load_file(runs["save"] / "straight.safetensors")
    resumed = safetensors.torch.load_file(runs["save"] / "resumed.safetensors")
    resharded = safetensors.torch.load_file(runs["load"] / "resumed.safetensors")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
        assert torch.allclose(straight[k], resharded[k], atol=1e-6), k
    lr = json.loads((runs["save"] / "metrics.json").read_text())["lr"]
    assert lr == pytest.approx(1e-3 * 2 / 4, rel=1e-6)  # the warm-up's second step
    for r in (0, 1):
        a = torch.load(runs["save"] / f"straight_values{r}.pt")
        b = torch.load(runs["save"] / f"resumed_values{r}.pt")
        assert torch.equal(a, b)
    whole = torch.cat([torch.load(runs["save"] / f"straight_values{r}.pt") for r in (0, 1)])
    alone = torch.load(runs["load"] / "resumed_values0.pt")
    assert torch.allclose(whole[:, : alone.shape[1]], alone[:, : whole.shape[1]], atol=1e-5)


def test_sharded_logprobs_match_unsharded_hf(runs: dict[str, Path], model_dir: str) -> None:
    batch = torch.load(runs["root"] / "batch.pt", weights_only=False)
    sharded = torch.cat([torch.load(runs["w2"] / f"logprobs{r}.pt") for r in (0, 1)])
    assert sharded.shape == batch.input_ids.shape
    expected = _hf_logprobs(_hf_model(model_dir), batch)
    sampled = batch.loss_mask.bool()  # only sampled columns are scored (workers/scoring.py)
    assert torch.allclose(sharded[sampled], expected[sampled], atol=1e-5)
    assert (sharded[~sampled] == 0).all()


def test_update_world2_equals_world1(runs: dict[str, Path], model_dir: str) -> None:
    before = _hf_model(model_dir).state_dict()
    w1 = safetensors.torch.load_file(runs["w1"] / "weights.safetensors")
    w2 = safetensors.torch.load_file(runs["w2"] / "weights.safetensors")
    assert w1.keys() == w2.keys()
    moved = max((w1[k] - before[k]).abs().max().item() for k in w1)
    assert moved > 5e-5  # lr 1e-4: Adam's first step moves weights by about lr
    worst = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert worst < 1e-5
    m1 = json.loads((runs["w1"] / "metrics.json").read_text())
    m2 = json.loads((runs["w2"] / "metrics.json").read_text())
    # Adam hides a wrong loss scale in the weights; the grad norm does not.
    for key in ("loss", "grad_norm", "clip_frac", "ratio_mean", "num_tokens"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-4, abs=1e-7), key
    assert m1["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # on-policy: ratio 1


def test_weights_bytes_and_save_hf_load_into_hf(runs: dict[str, Path], model_dir: str) -> None:
    probe = torch.load(runs["w2"] / "probe.pt")
    probe_batch = _make_batch(model_dir, seed=7, with_old=False)
    fresh = Qwen2ForCausalLM(_hf_model(model_dir).config)
    state = safetensors.torch.load((runs["w2"] / "weights.safetensors").read_bytes())
    assert "lm_head.weight" not in state  # tied: HF and vLLM expect only the embedding
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()
    mask = probe_batch.loss_mask
    assert probe.abs().sum() > 0
    assert torch.allclose(_hf_logprobs(fresh.eval(), probe_batch) * mask, probe, atol=1e-5)
    saved = runs["w2"] / "hf"
    assert (saved / "chat_template.jinja").read_text() == "{{ messages }}"
    assert (saved / "tokenizer_config.json").exists()
    reloaded = _hf_logprobs(_hf_model(str(saved)), probe_batch) * mask
    assert torch.allclose(reloaded, probe, atol=1e-5)
    before = _hf_logprobs(_hf_model(model_dir), probe_batch) * mask
    assert not torch.allclose(before, probe, atol=1e-5)  # the saved weights are the trained ones
    assert not any(p.name.startswith(".tmp-") for p in saved.parent.iterdir())


def test_grpo_updates_raise_positive_advantage_tokens(runs: dict[str, Path]) -> None:
    batch = torch.load(runs["root"] / "batch.pt", weights_only=False)
    parts = batch.split(2)
    grpo = [torch.load(runs["grpo"] / f"grpo{r}.pt", weights_only=False) for r in (0, 1)]
    start = torch.cat([h[0][0] for h, _ in grpo])  # [B, T] policy logprobs before training
    ref = torch.cat([h[0][1] for h, _ in grpo])
    end = torch.cat([h[-1][0] for h, _ in grpo])
    mask = torch.cat([p.loss_mask for p in parts]).bool()
    adv = torch.cat([p.advantages for p in parts])
    assert torch.allclose(start[mask], ref[mask], atol=1e-6)  # reference == initial policy
    gain = end - start
    assert gain[mask & (adv > 0)].mean() > 0.05
    assert gain[mask & (adv < 0)].mean() < -0.05
    metrics = grpo[0][1]
    assert metrics["kl_ref"] > 0 and metrics == grpo[1][1]  # drifted; metrics global


def test_token_budget_micro_batches_give_the_fixed_split_gradients(runs: dict[str, Path]) -> None:
    grads = torch.load(runs["budget"] / "budget0.pt", weights_only=False)[0]
    for agg, (rows, budget) in grads.items():
        worst = max((rows[n] - budget[n]).abs().max().item() for n in rows)
        assert worst < 1e-6, (agg, worst)
        assert max(g.abs().max().item() for g in rows.values()) > 1e-4  # not vacuous


def test_old_logprobs_from_the_update_give_the_scoring_pass_gradients(
    runs: dict[str, Path],
) -> None:
    """The first update on a batch may score pi_old in its own forward (toolrl.trainer does
    when the algorithm allows): the same gradients as a scoring pass before it, and the
    same pi_old, without reading the batch's (here deliberately wrong) old logprobs."""
    for rank in (0, 1):
        grads, scored, old_out = torch.load(
            runs["budget"] / f"own_old{rank}.pt", weights_only=False
        )
        with_pass, from_update, weighed_pass, weighed_own = grads
        assert torch.allclose(old_out, scored, atol=1e-6)
        assert scored.abs().sum() > 1.0  # not vacuous: sampled columns were scored
        assert _max_diff(with_pass, from_update) < 1e-6
        assert max(g.abs().max().item() for g in with_pass.values()) > 1e-4
        # the IS weights the update computes for itself are the trainer's
        assert _max_diff(weighed_pass, weighed_own) < 1e-6
        assert _max_diff(weighed_pass, with_pass) > 1e-4  # not vacuous: the weights count


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[n] - b[n]).abs().max().item() for n in a)


def test_logprobs_at_a_rollout_temperature_score_the_tempered_distribution(
    runs: dict[str, Path], model_dir: str
) -> None:
    batch = torch.load(runs["root"] / "batch.pt", weights_only=False)
    hot = torch.cat([torch.load(runs["budget"] / f"hot{r}.pt") for r in range(2)])
    mask = batch.loss_mask
    expected = _hf_logprobs(_hf_model(model_dir), batch, temperature=0.7) * mask
    assert torch.allclose(hot, expected, atol=1e-5)
    plain = _hf_logprobs(_hf_model(model_dir), batch) * mask
    assert not torch.allclose(hot, plain, atol=1e-2)


def test_critic_starts_at_zero_and_regresses_on_returns(runs: dict[str, Path]) -> None:
    _, start, history, end = torch.load(runs["budget"] / "budget0.pt", weights_only=False)
    assert start.abs().max().item() == 0.0  # a fresh value head predicts 0 everywhere
    assert history[0] == pytest.approx(0.5)  # 0.5 * (0 - 1)^2 on every sampled token
    assert history[-1] < 0.5 * history[0]
    assert end[end != 0].mean().item() > 0.2  # moved towards the returns (1)


def test_ray_train_group_end_to_end(model_dir: str, tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from toolrl.workers.train_group import PolicyRole, TrainGroup, TrainGroupConfig

    batch = _make_batch(model_dir, seed=2)
    expected = _hf_logprobs(_hf_model(model_dir), batch) * batch.loss_mask
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = TrainGroupConfig(world_size=2, micro_batch_size=2)
        loss = LossConfig(kl_coef=0.01)
        group = TrainGroup(cfg, model_dir, PolicyRole(OptimConfig(lr=1e-3), reference=True))
        # rows go to the ranks by token count, not in order; results come back in row order
        assert batch.balanced_rows(2) != [[0, 1, 2], [3, 4]]
        lp = group.logprobs(batch)
        assert torch.allclose(lp, expected, atol=1e-5)
        # one row: rank 1 gets no rows at all and must still join every collective
        assert torch.allclose(group.logprobs(batch.rows(0, 1)), lp[:1], atol=1e-6)
        batch.ref_logprobs = group.ref_logprobs(batch)
        assert torch.allclose(batch.ref_logprobs, lp, atol=1e-6)
        metrics, scored_old = group.update_scoring_old(batch, loss)
        assert torch.allclose(scored_old, lp, atol=1e-5)
        assert metrics["num_tokens"] == batch.num_tokens and metrics["grad_norm"] > 0
        fresh = Qwen2ForCausalLM(_hf_model(model_dir).config)
        fresh.load_state_dict(safetensors.torch.load(group.weights()), strict=False)
        new_lp = _hf_logprobs(fresh.eval(), batch) * batch.loss_mask
        assert torch.allclose(group.logprobs(batch), new_lp, atol=1e-5)
        assert not torch.allclose(new_lp, expected, atol=1e-4)  # the update moved the policy
        group.save_hf(str(tmp_path / "ckpt"), tokenizer_src=None)
        saved = _hf_logprobs(_hf_model(str(tmp_path / "ckpt")), batch) * batch.loss_mask
        assert torch.allclose(saved, new_lp)
        assert group.update(batch.rows(0, 1), loss)["num_tokens"] == batch.rows(0, 1).num_tokens
        group.shutdown()
    finally:
        ray.shutdown()
