"""The training groups: one Ray actor per data-parallel rank, each a thin shell around its roles.

`TrainGroup` (driver side) starts `world_size` `TrainWorker` actors, has them form one
torch.distributed group (gloo on CPU, NCCL when the actor sees a GPU), splits every batch
across them by rows, evening out their token counts, and gathers the results. All work is
in the role classes: `Policy` and `Reference` (toolrl.workers.actor), `Critic`
(toolrl.workers.critic). A run has one group holding the policy, and the critic either
beside it or in a second group of its own.

Run `python -m pytest tests/integration/test_fsdp_actor.py -k ray` (needs `ray.init` first
in real use; `toolrl.main` does that).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import ray
import torch
import torch.distributed as dist
from torch import Tensor

from toolrl.algo.batch import TrainBatch
from toolrl.algo.losses import LossConfig, LossScale
from toolrl.config import TrainGroupConfig
from toolrl.workers.actor import OptimConfig, Policy, Reference
from toolrl.workers.critic import Critic
from toolrl.workers.placement import in_bundle, release, reserve
from toolrl.workers.train_state import load_train_state, save_train_state


@dataclass(frozen=True)
class PolicyRole:
    """The trained policy (and, with `reference`, a frozen copy of its start) on a group."""

    optim: OptimConfig
    reference: bool = False
    temperature: float = 1.0  # the rollout's: logits are scored divided by it


@dataclass(frozen=True)
class CriticRole:
    """The value model on a group (toolrl.workers.critic)."""

    path: str
    fresh_head: bool  # True: a causal-LM folder whose new value head starts at 0
    optim: OptimConfig
    value_clip: float


@ray.remote
class TrainWorker:
    """One rank holding some of the roles Policy, Reference, Critic (separate classes). Methods
    are collectives: the group calls each one on every rank at once."""

    def __init__(self, rank: int, world_size: int, torch_threads: int) -> None:
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(torch_threads)
        self.policy: Policy | None = None
        self.reference: Reference | None = None
        self.critic: Critic | None = None

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
        cfg: TrainGroupConfig,
        policy: PolicyRole | None,
        critic: CriticRole | None,
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
        sizes = (cfg.micro_batch_size, cfg.micro_batch_tokens)
        if policy is not None:
            self.policy = Policy(model_path, policy.optim, *sizes, policy.temperature)
            if policy.reference:
                self.reference = Reference(model_path, *sizes, policy.temperature)
        if critic is not None:
            self.critic = Critic(
                critic.path, critic.fresh_head, critic.optim, critic.value_clip, *sizes
            )

    def logprobs(self, batch: TrainBatch) -> Tensor:
        return self.policy.logprobs(batch)

    def ref_logprobs(self, batch: TrainBatch) -> Tensor:
        return self.reference.logprobs(batch)

    def values(self, batch: TrainBatch) -> Tensor:
        return self.critic.values(batch)

    def update(
        self, batch: TrainBatch, scale: LossScale, loss: LossConfig, score_old: bool
    ) -> tuple[dict[str, float], Tensor | None]:
        old = torch.zeros(batch.input_ids.shape) if score_old else None
        return self.policy.update(batch, scale, loss, old), old

    def update_critic(self, batch: TrainBatch, scale: LossScale) -> dict[str, float]:
        return self.critic.update(batch, scale)

    def state_dict_bytes(self) -> bytes | None:
        return self.policy.state_dict_bytes()

    def write_weights(self) -> str | None:
        return self.policy.write_weights()

    def remove_weights(self, path: str) -> None:
        os.unlink(path)

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def save_hf(self, out_dir: str, tokenizer_src: str | None) -> None:
        self.policy.save_hf(out_dir, tokenizer_src)

    def save_state(self, folder: str) -> None:
        """Every role with training state under `folder`: policy/, critic/ (DCP, sharded)."""
        for name, role in self._trained():
            save_train_state(os.path.join(folder, name), role)

    def load_state(self, folder: str) -> None:
        for name, role in self._trained():
            load_train_state(os.path.join(folder, name), role)

    def _trained(self) -> list[tuple[str, Policy | Critic]]:
        return [
            (n, r) for n, r in (("policy", self.policy), ("critic", self.critic)) if r is not None
        ]

    def shutdown(self) -> None:
        dist.destroy_process_group()


class TrainGroup:
    """Driver-side handle on the ranks; every call fans out to all of them and waits.

    A group holds the policy (with its reference when `policy.reference`), the critic, or
    both; the trainer asks `toolrl.algo.algorithm.Algorithm` which it needs.
    """

    def __init__(
        self,
        cfg: TrainGroupConfig,
        model_path: str,
        policy: PolicyRole | None = None,
        critic: CriticRole | None = None,
        placement_timeout_s: float | None = None,
    ) -> None:
        self.cfg = cfg
        self.has_reference = policy is not None and policy.reference
        self.has_critic = critic is not None
        cpus, gpus = cfg.num_cpus_per_worker, cfg.num_gpus_per_worker
        name = "train" if policy is not None else "critic"
        # the ranks on as few nodes as hold them (toolrl.workers.placement)
        self._pg = reserve(name, cfg.world_size, cpus, gpus, "PACK", placement_timeout_s)
        self.workers = [
            TrainWorker.options(num_cpus=cpus, num_gpus=gpus, **in_bundle(self._pg, rank)).remote(
                rank, cfg.world_size, cfg.torch_threads
            )
            for rank in range(cfg.world_size)
        ]
        master = ray.get(self.workers[0].address.remote())
        ray.get([w.setup.remote(master, model_path, cfg, policy, critic) for w in self.workers])
        self.rank_nodes = ray.get([w.node_id.remote() for w in self.workers])  # per rank
        self.node_id = self.rank_nodes[0]  # where write_weights writes

    def _rank_rows(self, batch: TrainBatch) -> list[list[int]]:
        """Each rank's rows: even token counts (TrainBatch.balanced_rows)."""
        return batch.balanced_rows(self.cfg.world_size)

    def _per_rank(self, method: str, batch: TrainBatch, *args: object) -> tuple[list, list]:
        """Rank r gets rows `_rank_rows(batch)[r]`; returns (results in rank order, those
        rows)."""
        rows = self._rank_rows(batch)
        calls = [
            getattr(w, method).remote(batch.select(r), *args)
            for w, r in zip(self.workers, rows, strict=True)
        ]
        return ray.get(calls), rows

    @staticmethod
    def _in_batch_order(parts: list[Tensor], rows: list[list[int]]) -> Tensor:
        """[B, T] from each rank's [b_r, T] rows."""
        order = torch.tensor([i for r in rows for i in r], dtype=torch.long)
        return torch.cat(parts)[order.argsort()]

    def _scores(self, method: str, batch: TrainBatch) -> Tensor:
        return self._in_batch_order(*self._per_rank(method, batch))

    def logprobs(self, batch: TrainBatch) -> Tensor:
        """[B, T] policy logprob of token t+1 at column t (see toolrl.algo.batch)."""
        return self._scores("logprobs", batch)

    def ref_logprobs(self, batch: TrainBatch) -> Tensor | None:
        """[B, T] reference logprobs, or None when this group holds no reference."""
        return self._scores("ref_logprobs", batch) if self.has_reference else None

    def values(self, batch: TrainBatch) -> Tensor:
        """[B, T] the critic's value before token t+1 at column t."""
        return self._scores("values", batch)

    def update(self, batch: TrainBatch, loss: LossConfig) -> dict[str, float]:
        """One policy optimizer step on the whole batch with the algorithm's loss settings;
        equals a single-process step."""
        return self._update(batch, loss, score_old=False)[0]

    def update_scoring_old(
        self, batch: TrainBatch, loss: LossConfig
    ) -> tuple[dict[str, float], Tensor]:
        """`update` with pi_old = the policy as it stands (the first step on a rollout batch):
        the update's own forward scores it. Returns (metrics, [B, T] pi_old logprobs);
        batch.old_logprobs is not read."""
        metrics, old = self._update(batch, loss, score_old=True)
        return metrics, old

    def _update(
        self, batch: TrainBatch, loss: LossConfig, score_old: bool
    ) -> tuple[dict[str, float], Tensor | None]:
        out, rows = self._per_rank("update", batch, LossScale.of(batch), loss, score_old)
        old = self._in_batch_order([o for _, o in out], rows) if score_old else None
        return self._fold([m for m, _ in out]), old

    def update_critic(self, batch: TrainBatch) -> dict[str, float]:
        """One critic optimizer step on the whole batch (values, returns set)."""
        return self._fold(self._per_rank("update_critic", batch, LossScale.of(batch))[0])

    @staticmethod
    def _fold(results: list[dict[str, float]]) -> dict[str, float]:
        # The ranks already reduce over each other, so this mean only folds identical copies.
        return {k: sum(r[k] for r in results) / len(results) for k in results[0]}

    def weights(self) -> bytes:
        """Full weights as safetensors bytes (HF key names), gathered on rank 0."""
        return ray.get([w.state_dict_bytes.remote() for w in self.workers])[0]

    def write_weights(self) -> str | None:
        """Full weights written by rank 0 to a safetensors file in its node's shared memory;
        returns the path (None: no room there). The caller removes it with `remove_weights`."""
        return ray.get([w.write_weights.remote() for w in self.workers])[0]

    def remove_weights(self, path: str) -> None:
        ray.get(self.workers[0].remove_weights.remote(path))

    def save_hf(self, out_dir: str, tokenizer_src: str | None) -> None:
        ray.get([w.save_hf.remote(out_dir, tokenizer_src) for w in self.workers])

    def save_state(self, folder: str) -> None:
        """Sharded weights, optimizer and schedule of every trained role (the reference is
        the start model and is not saved); see toolrl.workers.train_state."""
        ray.get([w.save_state.remote(folder) for w in self.workers])

    def load_state(self, folder: str) -> None:
        ray.get([w.load_state.remote(folder) for w in self.workers])

    def shutdown(self) -> None:
        try:
            ray.get([w.shutdown.remote() for w in self.workers])
        finally:
            for w in self.workers:
                ray.kill(w)
            self.workers = []
            release(self._pg)
            self._pg = None
