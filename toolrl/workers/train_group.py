"""The training group: one Ray actor per data-parallel rank, each a thin shell around Policy.

`TrainGroup` (driver side) starts `world_size` `TrainWorker` actors, has them form one
torch.distributed group (gloo on CPU, NCCL when the actor sees a GPU), splits every batch
across them by rows and gathers the results. All work is in `toolrl.workers.actor`.

Run `python -m pytest tests/integration/test_fsdp_actor.py -k ray` (needs `ray.init` first
in real use; `toolrl.main` does that).
"""

from __future__ import annotations

import os
import socket

import ray
import torch
import torch.distributed as dist
from torch import Tensor

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig
from toolrl.config import TrainGroupConfig
from toolrl.workers.actor import OptimConfig, Policy, Reference


@ray.remote
class TrainWorker:
    """One rank: a Policy and, when kl_coef > 0, a Reference. Methods are collectives:
    the group calls each one on every rank at once."""

    def __init__(self, rank: int, world_size: int, torch_threads: int) -> None:
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(torch_threads)
        self.policy: Policy | None = None
        self.reference: Reference | None = None

    def address(self) -> tuple[str, int]:
        """Rank 0's rendezvous address: this node's IP and a port free right now."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def setup(
        self,
        master: tuple[str, int],
        model_path: str,
        optim: OptimConfig,
        loss: LossConfig,
        micro_batch_size: int,
    ) -> None:
        addr, port = master
        os.environ.update(
            MASTER_ADDR=addr,
            MASTER_PORT=str(port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
        )
        if torch.cuda.is_available():  # Ray shows each actor only its own GPU, as cuda:0
            torch.cuda.set_device(0)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        self.policy = Policy(model_path, optim, loss, micro_batch_size)
        if loss.kl_coef > 0:
            self.reference = Reference(model_path, micro_batch_size)

    def logprobs(self, batch: TrainBatch) -> Tensor:
        return self.policy.logprobs(batch)

    def ref_logprobs(self, batch: TrainBatch) -> Tensor:
        return self.reference.logprobs(batch)

    def update(self, batch: TrainBatch, num_tokens: float) -> dict[str, float]:
        return self.policy.update(batch, num_tokens)

    def state_dict_bytes(self) -> bytes | None:
        return self.policy.state_dict_bytes()

    def save_hf(self, out_dir: str, tokenizer_src: str | None) -> None:
        self.policy.save_hf(out_dir, tokenizer_src)

    def shutdown(self) -> None:
        dist.destroy_process_group()


class TrainGroup:
    """Driver-side handle on the ranks; every call fans out to all of them and waits."""

    def __init__(
        self, cfg: TrainGroupConfig, model_path: str, optim: OptimConfig, loss: LossConfig
    ) -> None:
        self.cfg, self.has_reference = cfg, loss.kl_coef > 0
        options = {"num_cpus": cfg.num_cpus_per_worker, "num_gpus": cfg.num_gpus_per_worker}
        self.workers = [
            TrainWorker.options(**options).remote(rank, cfg.world_size, cfg.torch_threads)
            for rank in range(cfg.world_size)
        ]
        master = ray.get(self.workers[0].address.remote())
        args = (master, model_path, optim, loss, cfg.micro_batch_size)
        ray.get([w.setup.remote(*args) for w in self.workers])

    def _per_rank(self, method: str, batch: TrainBatch, *args: object) -> list:
        """Rank r gets rows batch.split(world_size)[r]; results come back in rank order."""
        parts = batch.split(self.cfg.world_size)
        return ray.get(
            [getattr(w, method).remote(p, *args) for w, p in zip(self.workers, parts, strict=True)]
        )

    def logprobs(self, batch: TrainBatch) -> Tensor:
        """[B, T] policy logprob of token t+1 at column t (see toolrl.algo.batch)."""
        return torch.cat(self._per_rank("logprobs", batch))

    def ref_logprobs(self, batch: TrainBatch) -> Tensor | None:
        """[B, T] reference logprobs, or None when there is no reference (kl_coef == 0)."""
        return torch.cat(self._per_rank("ref_logprobs", batch)) if self.has_reference else None

    def update(self, batch: TrainBatch) -> dict[str, float]:
        """One optimizer step on the whole batch; equals a single-process token-mean step."""
        results = self._per_rank("update", batch, float(batch.num_tokens))
        # Policy.update already reduces over ranks, so this mean only folds identical copies.
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def weights(self) -> bytes:
        """Full weights as safetensors bytes (HF key names), gathered on rank 0."""
        return ray.get([w.state_dict_bytes.remote() for w in self.workers])[0]

    def save_hf(self, out_dir: str, tokenizer_src: str | None) -> None:
        ray.get([w.save_hf.remote(out_dir, tokenizer_src) for w in self.workers])

    def shutdown(self) -> None:
        ray.get([w.shutdown.remote() for w in self.workers])
        for w in self.workers:
            ray.kill(w)
        self.workers = []
