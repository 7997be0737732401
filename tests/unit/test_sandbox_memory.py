"""The sandbox's memory as a whole: a cell that forks cannot hold more than memory_mb, with a
memory cgroup (toolrl.tools.cgroup) and, where none can be made, with rlimits alone.

    python -m pytest tests/unit/test_sandbox_memory.py

Without `bwrap` these skip (CI: TOOLRL_REQUIRE_BWRAP=1 fails instead). The cgroup test skips
where no memory cgroup can be created, except under TOOLRL_REQUIRE_CGROUP=1 (CI).
"""

from __future__ import annotations

import ast
import asyncio
import os
import shutil

import pytest

from toolrl.tools.cgroup import memory_parent
from toolrl.tools.sandbox import Sandbox, SandboxConfig, check_host

if not shutil.which("bwrap"):
    if os.environ.get("TOOLRL_REQUIRE_BWRAP"):
        pytest.fail("TOOLRL_REQUIRE_BWRAP=1 but bubblewrap is not installed")
    pytest.skip("bubblewrap is not installed", allow_module_level=True)

# Forks `n` children that each write `mb` MiB and hold it a moment; prints their exit
# statuses: 0 held it, 3 got MemoryError, 9 (signal) killed by the OOM killer.
FORK_AND_FILL = """
import os, time
pids = []
for _ in range({n}):
    pid = os.fork()
    if pid == 0:
        try:
            held = b"x" * ({mb} << 20)
            time.sleep(1.5)
            os._exit(0)
        except MemoryError:
            os._exit(3)
    pids.append(pid)
statuses = [os.waitpid(p, 0)[1] for p in pids]
print([s & 0x7F if s & 0x7F else s >> 8 for s in statuses])
"""


async def _run_cell(cfg: SandboxConfig, code: str) -> tuple[list[int], int | None, object]:
    host = check_host(cfg)
    uid = cfg.uid_base + 7 if host.per_sandbox_uid else None
    sandbox = Sandbox(cfg, [], host, uid)
    await sandbox.start()
    try:
        result = await sandbox.run(code, lambda name, args: asyncio.sleep(0, ""))
        peak = sandbox.cgroup.peak_bytes() if sandbox.cgroup else None
    finally:
        await sandbox.close()
    assert not result.error, result.error
    return ast.literal_eval(result.output.strip()), peak, sandbox.cgroup


def test_a_cgroup_holds_a_forking_cell_to_memory_mb() -> None:
    if memory_parent() is None:
        if os.environ.get("TOOLRL_REQUIRE_CGROUP"):
            pytest.fail("TOOLRL_REQUIRE_CGROUP=1 but no memory cgroup can be created here")
        pytest.skip("no memory cgroup can be created here")
    cfg = SandboxConfig(memory_mb=256)
    # 4 x 150 MiB: each fits its own 256 MiB address space; together they do not.
    statuses, peak, cgroup = asyncio.run(_run_cell(cfg, FORK_AND_FILL.format(n=4, mb=150)))
    assert 9 in statuses, statuses  # the cgroup's OOM killer stopped some of them
    assert peak is not None and peak <= 256 << 20, peak
    assert not cgroup.path.exists()  # removed with the sandbox


def test_without_a_cgroup_processes_times_their_limit_stay_within_memory_mb() -> None:
    cfg = SandboxConfig(memory_mb=1024, max_processes=4, memory_cgroup="off")
    host = check_host(cfg)
    assert host.memory is None and host.process_memory_mb == 256
    assert any("no memory cgroup" in gap for gap in host.unenforced)
    if host.per_sandbox_uid:  # root: the process cap is this sandbox's own
        assert host.nproc_cap * host.process_memory_mb <= cfg.memory_mb
    # A child may not take 300 MiB (its share is 256); 100 MiB fits.
    statuses, peak, _ = asyncio.run(_run_cell(cfg, FORK_AND_FILL.format(n=1, mb=300)))
    assert statuses == [3] and peak is None
    statuses, _, _ = asyncio.run(_run_cell(cfg, FORK_AND_FILL.format(n=1, mb=100)))
    assert statuses == [0]
