"""Which live processes are this test process's sandboxes: for tests that check none outlives
its trajectory or scoring (tests/unit/test_python_sandbox.py, test_code_reward.py)."""

from __future__ import annotations

import os

# As root each sandbox runs as a uid of its own from uid_base on: a range for this process
# tells its sandboxes apart from those of other jobs on the machine, even once orphaned.
UID_BASE = 1_000_000_000 + (os.getpid() % 1000) * 1_000_000  # below 2**31 - 1e6 for bwrap


def _ours(pid: str) -> bool:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    if os.geteuid() == 0:
        return UID_BASE <= int(status["Uid"].split()[0]) < UID_BASE + 1_000_000
    parent = int(status["PPid"])  # not root: a descendant of this process
    return parent == os.getpid() or (parent > 1 and _ours(str(parent)))


def sandbox_pids() -> set[int]:
    """Pids of this test process's live sandbox processes (the worker source is in argv)."""
    pids = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read()
            if (b"bwrap" in argv or b"_LIMITS = {" in argv) and _ours(pid):
                pids.add(int(pid))
        except (OSError, KeyError, ValueError):
            pass  # it ended while we looked
    return pids
