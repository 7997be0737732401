"""Fixtures for integration tests: a tiny random Qwen2 model folder built locally.

No machine here reaches a model hub, so the model is made from scratch: a byte-level
BPE tokenizer trained by `tokenizers` on a few strings (with a trivial chat template)
and a 2-layer Qwen2 with random weights and tied embeddings, saved with
`save_pretrained`. vLLM loads it from the folder like any checkpoint.

Run: `.venv/bin/python -m pytest tests/integration -q`
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Renders `<|im_start|>role\ncontent<|im_end|>\n` per message; enough for token-level tests.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "What is 12 + 30? The answer is 42.",
    "Call the calculator tool with multiply(3, 4) and read the result.",
    "The quick brown fox jumps over the lazy dog.",
    '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>',
    "user asked a question and the assistant answered it politely",
]


def build_tiny_tokenizer(out_dir: Path):
    """Train a byte-level BPE (~320 ids) and save it as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_qwen2(out_dir: Path, seed: int = 0) -> Path:
    """Write tokenizer + random 2-layer Qwen2 (hidden 64, head_dim 32, tied lm_head)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tiny_tokenizer(out_dir)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,  # head_dim 32: the smallest size vLLM's CPU attention takes
        num_key_value_heads=1,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    # A larger init than HF's 0.02 gives peaked next-token distributions, so sampled
    # sequences and logprobs differ visibly between weight versions.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with config.json, model.safetensors and tokenizer files of a tiny Qwen2."""
    return build_tiny_qwen2(tmp_path_factory.mktemp("tiny_qwen2"))


def run_main(run_dir: Path, *overrides: str, timeout: float = 900) -> list[dict]:
    """Run `python -m toolrl.main` with these overrides into `run_dir`, assert it exits 0,
    and return the rows of its metrics.jsonl."""
    cmd = [sys.executable, "-m", "toolrl.main", *overrides, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
