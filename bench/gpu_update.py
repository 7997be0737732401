"""The update on a GPU: what the trainer's FSDP2 roles cost beside a bare training pass.

    python bench/gpu_update.py                     # Qwen2.5-0.5B shape, random weights
    python bench/gpu_update.py --rows 32 --steps 3 --budget 16384

Needs one CUDA device; runs as rank 0 of a one-rank NCCL group. It saves a random-weight
float32 model with the Qwen2.5-0.5B shape (151,936-token vocabulary, tied head), makes a
batch of tool-calling trajectories (prompt, then sampled turns between tool answers that the
loss masks out) and times, after one warm-up each:

    limit   one bare pass: per micro-batch (the same token budget), a packed bfloat16-autocast
            forward, the head only at scored tokens, backward; one AdamW step
    update  Policy.update: what the trainer runs (FSDP2, bfloat16 compute over float32
            masters, chunked head, grad clip, metrics)
    step    the update phase as the trainer ran it before the first mini-batch scored its
            own pi_old (the numbers in the README are from then): old-logprob and reference
            passes over the whole batch (Policy.logprobs, Reference.logprobs), then
            Policy.update; the trainer now skips the pass for the first mini-batch's rows

and prints seconds, scored tokens per second, the ratios update/limit and step/limit, and the
peak GPU memory of each.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolrl.algo.batch import TrainBatch  # noqa: E402
from toolrl.algo.losses import LossConfig, LossScale  # noqa: E402
from toolrl.config import OptimConfig  # noqa: E402
from toolrl.rollout.trajectory import Trajectory  # noqa: E402
from toolrl.workers.actor import Policy, Reference  # noqa: E402
from toolrl.workers.scoring import pack  # noqa: E402

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)


def save_model(path: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).float()
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def make_batch(rows: int, seed: int) -> TrainBatch:
    """Tool-calling shapes: a 150-400 token prompt, then 2-4 sampled turns (30-200 tokens)
    with a tool answer (60-300 tokens, masked out) after each but the last."""
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=gen))  # noqa: E731
    ids = lambda n: torch.randint(3, QWEN25_05B["vocab_size"], (n,), generator=gen).tolist()  # noqa: E731
    trajs = []
    for i in range(rows):
        traj = Trajectory.from_prompt(i // 8, ids(r(150, 400)))
        turns = r(2, 5)
        for t in range(turns):
            n = r(30, 200)
            traj.append_sampled(ids(n), [-2.0] * n)
            if t < turns - 1:
                traj.append_context(ids(r(60, 300)))
        trajs.append(traj)
    adv = torch.randn(rows, generator=gen)
    batch = TrainBatch.from_trajectories(trajs, adv, pad_id=0)
    batch.old_logprobs = batch.loss_mask * -2.0
    batch.ref_logprobs = batch.loss_mask * -2.0
    return batch


def timed(fn) -> tuple[float, float]:  # noqa: ANN001
    """(seconds, peak GiB) of fn() after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() / 2**30


def bare_pass(model_path: str, batch: TrainBatch, budget: int):  # noqa: ANN201
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).cuda()
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-6)
    head = lm.get_output_embeddings()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        for mb in batch.micro_batch_rows(len(batch.input_ids), budget):
            p = pack(batch.select(mb).trimmed()).to(torch.device("cuda"))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                kw = {"input_ids": p.input_ids, "position_ids": p.position_ids}
                hidden = lm.base_model(**kw, use_cache=False).last_hidden_state
                logits = head(hidden.flatten(0, 1)[p.index]).float()  # [N, V]
            lp = logits.gather(-1, p.targets[:, None])[:, 0] - logits.logsumexp(dim=-1)
            (-lp.sum() / max(batch.num_tokens, 1)).backward()
        opt.step()

    return lm, opt, run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="timed repeats (median)")
    ap.add_argument("--budget", type=int, default=16384, help="micro_batch_tokens")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    batch = make_batch(args.rows, seed=0)
    tokens, scored = int(batch.attention_mask.sum()), batch.num_tokens
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(
        f"batch: {args.rows} trajectories, {tokens} tokens, {scored} scored; budget {args.budget}"
    )
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        save_model(tmp)
        print(f"random Qwen2.5-0.5B-shaped model saved in {time.perf_counter() - t0:.1f} s")

        lm, opt, run = bare_pass(tmp, batch, args.budget)
        results["limit"] = _median(run, args.steps)
        del lm, opt, run
        torch.cuda.empty_cache()

        optim, loss = OptimConfig(lr=1e-6), LossConfig(kl_coef=0.001)
        policy = Policy(tmp, optim, micro_batch_size=args.rows, micro_batch_tokens=args.budget)
        ref = Reference(tmp, micro_batch_size=args.rows, micro_batch_tokens=args.budget)
        results["update"] = _median(
            lambda: policy.update(batch, LossScale.of(batch), loss), args.steps
        )

        def step() -> None:
            batch.old_logprobs = policy.logprobs(batch) * batch.loss_mask
            batch.ref_logprobs = ref.logprobs(batch)
            policy.update(batch, LossScale.of(batch), loss)

        results["step"] = _median(step, args.steps)
    limit = results["limit"][0]
    for name, (sec, peak) in results.items():
        print(
            f"{name:7s} {sec:7.3f} s  {scored / sec:10.0f} scored tok/s  "
            f"{sec / limit:5.2f}x limit  peak {peak:6.1f} GiB"
        )
    dist.destroy_process_group()


def _median(fn, steps: int) -> tuple[float, float]:  # noqa: ANN001
    runs = [timed(fn) for _ in range(steps)]
    return statistics.median(r[0] for r in runs), max(r[1] for r in runs)


if __name__ == "__main__":
    main()
