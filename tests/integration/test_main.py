"""`python -m toolrl.main` end to end on a few steps: metrics, wandb files and a checkpoint
that transformers and vLLM both load.

    python -m pytest tests/integration/test_main.py
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch

from tests.integration.conftest import run_main


def test_short_run_writes_metrics_and_a_loadable_checkpoint(tmp_path, embedded_model):
    run_dir = tmp_path / "run"
    rows = run_main(run_dir, "+experiment=smoke", "logger.wandb_mode=offline")
    steps = [r for r in rows if "train/reward" in r]
    assert [r["step"] for r in steps] == [0, 1]
    for key in ("train/tool_calls", "train/turns", "time/rollout_s", "perf/rollout_tokens_per_s",
                "rollout/logprob_diff_max", "train/loss"):  # fmt: skip
        assert key in steps[0], key
    assert steps[0]["rollout/logprob_diff_max"] < 1e-4
    assert steps[0]["rollout/logprob_diff_max_turn0"] < 1e-4  # and per assistant turn
    evals = [r for r in rows if "eval/reward" in r]
    assert len(evals) == 2 and 0.0 <= evals[-1]["eval/reward"] <= 1.0
    assert list((run_dir / "wandb").glob("offline-run-*"))

    ckpt = run_dir / "checkpoint"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(ckpt)
    start = AutoModelForCausalLM.from_pretrained(embedded_model)
    changed = any(
        not torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), start.state_dict().values(), strict=True)
    )
    assert changed, "the checkpoint holds the initial weights: no update reached it"
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and "<tool_call>" in tok.get_vocab()

    script = tmp_path / "load_vllm.py"
    script.write_text(
        textwrap.dedent(f"""
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(ckpt)!r}, dtype="float32", max_model_len=512, enforce_eager=True)
            out = llm.generate(["What is 12 * 34?"], SamplingParams(max_tokens=4, temperature=0))
            print("VLLM_OK", len(out[0].outputs[0].token_ids))
    """)
    )
    env = {**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    res = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env
    )
    assert "VLLM_OK" in res.stdout, res.stderr[-4000:]
