"""Where the actors run: one Ray placement group per worker group.

A group's bundles (one per actor) are reserved together before any actor starts, so a group
that cannot fit fails at once, saying what it asked for, instead of leaving one rank pending
while the others wait for it in their first collective.

- rollout engines SPREAD: one per node while nodes last (one per GPU when each asks for a
  GPU), so adding nodes adds sampling throughput without a config change;
- training ranks PACK: as few nodes as hold them, so FSDP's collectives stay inside a node
  whenever they fit.

A one-machine run places everything on that machine, as before. `python -m toolrl.cluster`
starts the Ray cluster that these groups spread over on Slurm. `RUN_DIR/placement.json`
records where each actor landed. Run `python -m pytest -m slow
tests/integration/test_cluster.py` (engine and rank on two simulated nodes).
"""

from __future__ import annotations

from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def reserve(
    name: str, count: int, cpus: float, gpus: float, strategy: str, timeout_s: float | None
) -> PlacementGroup:
    """A placement group of `count` bundles of {CPU: cpus, GPU: gpus}, ready; or RuntimeError
    after timeout_s (None: no limit) when the cluster cannot hold it (it is withdrawn)."""
    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    pg = placement_group([dict(bundle) for _ in range(count)], strategy=strategy, name=name)
    ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    if not ready:
        remove_placement_group(pg)
        raise RuntimeError(
            f"the {name} group asks for {count} x {bundle} ({strategy}) but the Ray cluster "
            f"could not hold it within {timeout_s} s; the cluster has "
            f"{ray.cluster_resources()}, of which {ray.available_resources()} is free. Lower "
            "the workers' num_cpus_per_worker / num_gpus_per_worker or their number, or add "
            "nodes (ray.placement_timeout_s sets the wait)"
        )
    return pg


def in_bundle(pg: PlacementGroup, index: int) -> dict[str, Any]:
    """Actor options that run it in bundle `index` of pg."""
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)
    return {"scheduling_strategy": strategy}


def release(pg: PlacementGroup | None) -> None:
    if pg is not None:
        remove_placement_group(pg)
