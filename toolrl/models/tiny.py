"""The embedded default model: a byte-level BPE tokenizer, a Qwen2.5-style chat template and a
tiny Qwen3-architecture model, all built locally (no downloads) and cached.

Every integer 0..9999 is one token: the pre-tokenizer isolates digit runs in chunks of at
most 4 digits, and explicit merges join each chunk into a single number token. With tied
embeddings, copying a number (operands into a tool call, the tool's result into the answer)
is then one attention lookup, which a 2-layer model learns quickly. Text merges learned on
rendered synthetic conversations keep the prompt short (about 80 tokens with the tools).

`build_embedded_model()` returns a Hugging Face folder that `AutoTokenizer`,
`AutoModelForCausalLM` and vLLM load; by default the weights are warm-started
(`toolrl.models.warmstart`) so that RL on the arithmetic task has something to improve.
`embedded_config("python")` is the variant warm-started to call the python sandbox tool
instead of the calculator, `embedded_config("calculator_inline")` the one warm-started on plain
text with inline `<calc>` tags (`toolrl.models.warmstart_inline`, for the inline protocol);
each variant has its own cache folder.

    python -m toolrl.models.tiny                 # build (or find in the cache) and print the path
    python -m toolrl.models.tiny --tool python   # the variant that calls `python`
    python -m toolrl.models.tiny --tool calculator_inline   # plain text, inline <calc> tags
    python -m toolrl.models.tiny --vllm          # ... and check that vLLM CPU loads and samples it
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolrl.models.warmstart import WarmStartConfig, tool_style

log = logging.getLogger(__name__)

# Bump when a change to this module or warmstart.py changes what gets built.
CODE_VERSION = "2"

PAD, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, IM_START, IM_END)
# Single-id, non-special (like Qwen2.5): they survive decode(skip_special_tokens=True).
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
MAX_NUMBER = 9999  # every integer 0..MAX_NUMBER is a single token
_DIGIT_CHUNK = r"\p{N}{1,4}"

# Qwen2.5/Hermes-style template. HF renders with trim_blocks, which eats a newline right
# after a block tag, so newlines that follow a tag are written as {{ '\n' }}.
CHAT_TEMPLATE = (
    "{% if tools %}"
    "<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content + '\\n' }}{% endif %}"
    "# Tools\n<tools>"
    "{% for tool in tools %}{{ '\\n' }}{{ tool | tojson }}{% endfor %}"
    "{{ '\\n' }}</tools><|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'system' and loop.first %}"
    "{% if not tools %}<|im_start|>system\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% elif m.role == 'assistant' %}"
    "<|im_start|>assistant\n{% if m.content %}{{ m.content }}{% endif %}"
    "{% for tc in m.tool_calls or [] %}"
    "{% set f = tc.function if tc.function is defined else tc %}"
    "{% if m.content or not loop.first %}{{ '\\n' }}{% endif %}"
    '<tool_call>\n{"name": "{{ f.name }}", "arguments": '
    "{% if f.arguments is string %}{{ f.arguments }}{% else %}{{ f.arguments | tojson }}{% endif %}"
    "{{ '}\\n</tool_call>' }}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% elif m.role == 'tool' %}"
    "{% if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}"
    "{{ '\\n<tool_response>\\n' }}{{ m.content }}{{ '\\n</tool_response>' }}"
    "{% if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class EmbeddedModelConfig:
    """Sizes and seeds of the embedded model; its hash names the cache folder."""

    hidden_size: int = 128
    num_layers: int = 2
    # "qwen3" (QK-norm: learned the copies fastest) or "llama"; model_config says why not qwen2.
    architecture: str = "qwen3"
    # head_dim = hidden_size / num_heads must be one vLLM CPU supports (32, 64, 80, ...).
    # Two 64-wide heads learned the copies faster than four 32-wide ones.
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 384
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    text_merges: int = 300  # at most this many BPE merges learned on the synthetic corpus
    corpus_conversations: int = 300
    seed: int = 0
    warmstart: WarmStartConfig = field(default_factory=WarmStartConfig)


# ---------------------------------------------------------------------------- tokenizer


def _byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def number_merges() -> list[tuple[str, str]]:
    """Merges that turn every digit chunk of a canonical integer 0..9999 into one token.

    For each number s of 2-4 digits, every split s = left + right whose right part is itself
    a token (a canonical number, or "0") is a merge. Whatever order BPE applies them in, the
    first two pieces of a chunk can always merge (the first piece has no leading zero, the
    second is a token), so no chunk gets stuck in pieces.
    """
    merges = []
    for n in range(10, MAX_NUMBER + 1):
        s = str(n)
        for i in range(1, len(s)):
            right = s[i:]
            if right == "0" or right[0] != "0":
                merges.append((s[:i], right))
    return merges


def _pre_tokenizer(drop_digits: bool = False) -> Any:
    from tokenizers import Regex, pre_tokenizers

    # Digits form pre-tokens of their own (not glued to a leading space); training the
    # text merges drops them so that no merge is spent on digits.
    behavior = "removed" if drop_digits else "isolated"
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_DIGIT_CHUNK), behavior=behavior),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Any:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    return tok


def _wrap(tok: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def learn_text_merges(corpus: list[str], n_merges: int) -> list[tuple[str, str]]:
    """BPE merges (byte-level strings) learned on `corpus` with digits removed, in rank order."""
    from tokenizers import Tokenizer, models, trainers

    alphabet = _byte_alphabet()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer(drop_digits=True)
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + n_merges, initial_alphabet=alphabet, show_progress=False
    )
    # Control tokens are single ids that encoding cuts out first: train on the text between.
    control = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + TOOL_TOKENS))
    pieces = [p for text in corpus for p in control.split(text) if p]
    tok.train_from_iterator(pieces, trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def build_tokenizer(corpus: list[str], n_text_merges: int) -> Any:
    """The final `PreTrainedTokenizerFast`: bytes, learned text merges, number merges, specials.

    Ids: 0..255 bytes, then text-merge tokens, then numbers 10..9999, then the special and
    tool tokens. Deterministic for a given corpus.
    """
    vocab = {c: i for i, c in enumerate(_byte_alphabet())}
    merges: list[tuple[str, str]] = []
    for a, b in learn_text_merges(corpus, n_text_merges):
        if a in vocab and b in vocab and a + b not in vocab:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    for n in range(10, MAX_NUMBER + 1):
        vocab[str(n)] = len(vocab)
    merges += number_merges()
    return _wrap(_bpe_tokenizer(vocab, merges))


def bootstrap_tokenizer() -> Any:
    """A bytes-only tokenizer with the chat template: renders the corpus the real one learns on."""
    return _wrap(_bpe_tokenizer({c: i for i, c in enumerate(_byte_alphabet())}, []))


# ---------------------------------------------------------------------------- model


ARCHITECTURES = ("llama", "qwen3")


def model_config(cfg: EmbeddedModelConfig, tokenizer: Any) -> Any:
    """The transformers config of the embedded model (Qwen3 or Llama architecture).

    Not Qwen2: transformers 5 loads the tokenizer of any `model_type: qwen2` folder as
    `Qwen2Tokenizer`, which rebuilds the pre-tokenizer with Qwen's one-digit regex and would
    split our number tokens back into digits (vLLM loads tokenizers the same way).
    """
    from transformers import LlamaConfig, Qwen3Config

    if cfg.architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {cfg.architecture!r}")
    if cfg.hidden_size % cfg.num_heads or cfg.num_heads % cfg.num_kv_heads:
        raise ValueError("hidden_size must divide into num_heads, num_heads into num_kv_heads")
    cls = LlamaConfig if cfg.architecture == "llama" else Qwen3Config
    return cls(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.hidden_size // cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,  # vLLM's Qwen3 has no o_proj bias, HF's would
        tie_word_embeddings=True,
        dtype="float32",
        bos_token_id=tokenizer.convert_tokens_to_ids(PAD),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
    )


def embedded_config(tool: str = "calculator") -> EmbeddedModelConfig:
    """The default embedded model warm-started to call `tool` ("calculator", "python", or
    "calculator_inline": plain text with inline <calc> tags, for the inline protocol)."""
    if tool_style(tool).inline:  # tool_style raises ValueError naming the choices
        from toolrl.models.warmstart_inline import WARMSTART

        return EmbeddedModelConfig(warmstart=WarmStartConfig(tool=tool, **WARMSTART))
    return EmbeddedModelConfig(warmstart=WarmStartConfig(tool=tool))


def config_hash(cfg: EmbeddedModelConfig) -> str:
    fields = dataclasses.asdict(cfg)
    if fields["warmstart"]["tool"] == "calculator":
        # Builds from before the field existed were calculator builds: keep their folder names.
        del fields["warmstart"]["tool"]
    blob = json.dumps({"v": CODE_VERSION, "cfg": fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("TOOLRL_CACHE") or Path.home() / ".cache" / "toolrl")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    # Two processes asking for the same model at once: one builds, the other waits.
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_into(out: Path, cfg: EmbeddedModelConfig, warm_start: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from toolrl.models import warmstart as ws

    t0 = time.perf_counter()
    corpus = ws.corpus_texts(bootstrap_tokenizer(), cfg.warmstart, cfg.corpus_conversations)
    tokenizer = build_tokenizer(corpus, cfg.text_merges)
    config = model_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config).float()
    info: dict[str, Any] = {"tokenizer_s": time.perf_counter() - t0, "vocab_size": len(tokenizer)}
    if warm_start:
        info["warmstart"] = ws.warm_start(model, tokenizer, cfg.warmstart)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info["build_s"] = time.perf_counter() - t0
    (out / "toolrl_build.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), "warm_start": warm_start, **info}, indent=1)
    )
    return info


def build_embedded_model(
    cfg: EmbeddedModelConfig | None = None,
    cache_dir: Path | None = None,
    warm_start: bool = True,
) -> Path:
    """Build (or find in the cache) the embedded model; return its Hugging Face folder.

    The folder is `<cache>/models/tiny-<hash of cfg, warm_start and CODE_VERSION>`, where the
    cache is `cache_dir`, `$TOOLRL_CACHE` or `~/.cache/toolrl`. It is written to a temporary
    folder and renamed into place, so a crash never leaves a half-built model behind.
    """
    cfg = cfg or EmbeddedModelConfig()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / f"tiny-{config_hash(cfg)}{'' if warm_start else '-init'}"
    if (final / "config.json").is_file():
        return final
    with _file_lock(models / f".{final.name}.lock"):
        if (final / "config.json").is_file():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=models))
        try:
            info = _build_into(tmp, cfg, warm_start)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("built the embedded model in %.1fs: %s", info["build_s"], final)
    return final


def _check_vllm(path: Path, tool: str) -> None:
    """Load the folder in vLLM CPU and sample one turn of an arithmetic prompt."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from toolrl.data.arithmetic import ArithmeticTask

    tok = AutoTokenizer.from_pretrained(path)
    task = ArithmeticTask()
    messages = task.prompts("eval")[0].messages
    if tool_style(tool).inline:  # a plain prompt, as the inline protocol's base-model mode
        ids = tok.encode("\n\n".join(m["content"] for m in messages))
    else:
        text = tok.apply_chat_template(
            messages, tools=[tool_style(tool).schema], add_generation_prompt=True, tokenize=False
        )
        ids = tok.encode(text, add_special_tokens=False)
    llm = LLM(model=str(path), dtype="float32", max_model_len=1024, enforce_eager=True)
    params = SamplingParams(temperature=1.0, max_tokens=40, stop_token_ids=[tok.eos_token_id])
    out = llm.generate([TokensPrompt(prompt_token_ids=ids)] * 4, params)
    for o in out:
        print(repr(tok.decode(o.outputs[0].token_ids)))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    tool = sys.argv[sys.argv.index("--tool") + 1] if "--tool" in sys.argv else "calculator"
    path = build_embedded_model(embedded_config(tool), warm_start="--no-warm-start" not in sys.argv)
    print(path)
    if "--vllm" in sys.argv:
        _check_vllm(path, tool)
