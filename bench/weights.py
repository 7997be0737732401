"""Weight push against model size: through the object store versus a shared-memory file.

    python bench/weights.py                      # random Qwen2 models, 2 M to 0.47 B params
    python bench/weights.py --sizes 64 256       # hidden sizes to try (layers and heads follow)

For each size it saves a random-weight float32 model (the embedded tokenizer's vocabulary),
starts one training rank (FSDP2) and one vLLM engine on Ray, then pushes the policy's weights
into the engine both ways, three times each:

    object_store   rank 0's safetensors bytes -> object store -> driver -> ray.put -> engine,
                   which writes them to a file vLLM reads (what the trainer did before)
    shared_memory  rank 0 writes one safetensors file to /dev/shm; the engine reads it
                   (RolloutGroup.load_weights_from, when every engine shares rank 0's node)

and prints the median seconds and the peak extra memory of the whole machine during a push
(the largest drop of available memory below what was available just before it), with the
model's float32 size beside it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# hidden size -> (layers, heads, intermediate): parameters grow about as hidden^2 x layers
SHAPES = {128: (2, 2, 384), 512: (8, 8, 1408), 1024: (16, 16, 2816), 1536: (16, 12, 4096)}


def make_model(hidden: int, out: Path, tokenizer_src: str) -> int:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from toolrl.workers.actor import TOKENIZER_FILES

    layers, heads, inter = SHAPES[hidden]
    tok = AutoTokenizer.from_pretrained(tokenizer_src)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).float()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:  # what a saved checkpoint carries of its tokenizer
        if (Path(tokenizer_src) / name).is_file():
            shutil.copy2(Path(tokenizer_src) / name, out / name)
    return sum(p.numel() for p in model.parameters())


class PeakMemory:
    """Largest drop of the machine's available memory while the block runs (sampled 50/s)."""

    def __enter__(self) -> PeakMemory:
        self.base = psutil.virtual_memory().available
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.base - psutil.virtual_memory().available)
            time.sleep(0.02)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure(model_dir: str, repeats: int) -> dict[str, tuple[float, float]]:
    import ray
    from hydra import compose, initialize_config_dir

    from toolrl.config import TrainGroupConfig, register, to_config
    from toolrl.main import rollout_spec
    from toolrl.workers.rollout import RolloutGroup
    from toolrl.workers.train_group import PolicyRole, TrainGroup

    register()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = to_config(compose("config", overrides=["rollout.engine.kv_cache_gib=1"]))
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        rollout = RolloutGroup(rollout_spec(cfg, model_dir, None), 1, 1.0)
        train = TrainGroup(
            TrainGroupConfig(world_size=1, num_cpus_per_worker=0.5),
            model_dir,
            PolicyRole(cfg.trainer.optim),
        )
        ways = {
            "object_store": lambda v: rollout.load_weights(train.weights(), v),
            "shared_memory": lambda v: rollout.load_weights_from(train, v),
        }
        out, version = {}, 0
        for name, push in ways.items():
            times, peaks = [], []
            for _ in range(repeats):
                version += 1
                with PeakMemory() as mem:
                    t0 = time.perf_counter()
                    push(version)
                    times.append(time.perf_counter() - t0)
                peaks.append(mem.peak)
            out[name] = (statistics.median(times), max(peaks) / 2**30)
        rollout.shutdown()
        train.shutdown()
        return out
    finally:
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from toolrl.main import resolve_model

    tokenizer_src = resolve_model("embedded")
    rows = []
    for hidden in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            n = make_model(hidden, Path(tmp), tokenizer_src)
            result = measure(tmp, args.repeats)
        rows.append((n, result))
        print(f"[{n / 1e6:.0f} M params done]", flush=True)
    print(
        f"{'params':>8} {'fp32 GiB':>9} | {'object store s':>14} {'peak GiB':>9} | "
        f"{'shared mem s':>12} {'peak GiB':>9} | {'speed-up':>8}"
    )
    for n, r in rows:
        (os_s, os_m), (sm_s, sm_m) = r["object_store"], r["shared_memory"]
        print(
            f"{n / 1e6:>7.0f}M {n * 4 / 2**30:>9.2f} | {os_s:>14.2f} {os_m:>9.2f} | "
            f"{sm_s:>12.2f} {sm_m:>9.2f} | {os_s / sm_s:>8.2f}"
        )


if __name__ == "__main__":
    main()
