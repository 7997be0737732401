"""In vLLM's worker process on CPU: stop busy-waiting for the next step soon after the last one.

vLLM's multiprocess executor (vLLM-CPU always uses it) hands every step to its worker
process through a shared-memory queue. The worker, reading it, spins on `sched_yield` for a
second after its last read before it sleeps on a socket that the writer pings on every
write. On a GPU host that spin costs a spare core. On a CPU host the cores are the
trainer's: after every rollout and evaluation the idle worker held a core for a second
(0.50 CPU seconds in 0.5 s idle, in the test below without this cap), into a synchronous
step's update. As it yields, the step hardly noticed: in `bench/step.py` runs the update
took 1.69x the train limit and the run 5.44 CPU seconds a step without the cap, 1.68x and
4.88 with a 20 ms window, 1.58x and 5.33 with this one, all within the spread of repeated
runs. The cap is about not holding a core nobody uses.

A decode step takes less than the window, so while it generates the worker spins as vLLM
intends; past the window it sleeps on the socket and wakes at the next write. (Even a 20 ms
window cost no measurable throughput: 128 requests of 64 ids at once, processes alternated,
ran at 4,532 and 3,845 tok/s without the cap, 4,307 and 3,800 with it.)

`toolrl.workers.weights` (the module vLLM imports in its worker) calls `spin_less()` at
import; in any other process it does nothing.

Run `python -m pytest tests/integration/test_engine.py -k idle`.
"""

from __future__ import annotations

import functools
import sys

IDLE_AFTER_S = 0.1  # spin this long after a read (a decode step takes less), then sleep
_QUEUE_MODULE = "vllm.distributed.device_communicators.shm_broadcast"


def spin_less(idle_after_s: float = IDLE_AFTER_S) -> bool:
    """Cap how long this process's shared-memory queue readers spin; True when it applies
    (a process that has vLLM's queue loaded, on the CPU platform). Idempotent."""
    queue = sys.modules.get(_QUEUE_MODULE)  # loaded in vLLM's processes, not the trainer's
    condition = getattr(queue, "SpinCondition", None)
    if condition is None:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    original = condition.wait
    if getattr(original, "toolrl_idle_after_s", None) is not None:
        return True

    @functools.wraps(original)
    def wait(self, *args, **kwargs):  # the readers exist already: cap on each wait
        self.busy_loop_s = min(self.busy_loop_s, idle_after_s)
        return original(self, *args, **kwargs)

    wait.toolrl_idle_after_s = idle_after_s
    condition.wait = wait
    return True
