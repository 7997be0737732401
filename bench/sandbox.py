"""Start-up, per-call latency and throughput of the sandboxed `python` tool, in one run.

Measures, for isolation=bwrap (and isolation=none as a baseline with --compare-none, so the
bwrap overhead is a ratio taken under the same machine load):

    start-up     Sandbox.start() from the call to "ready" (no pool); PythonTool.open() with a
                 warm pool (the pool full before each open) and with an empty pool (pool_size 0)
    per call     PythonTool.call() of a trivial cell and of a small compute cell, one session
    concurrency  K concurrent trajectories (open, M calls, close), a pool of --pool-size kept
                 warm in the background as in a rollout worker: calls/s, trajectories/s, p95
    loop stall   how long the event loop went without running a 1 ms ticker, per cold start and
                 at most under concurrency: spawning a sandbox blocks the loop that the rollout
                 worker shares with its engine, and a spawn that cannot vfork (CPython forks
                 when given user=/group=) grows with the parent's memory: see --parent-mb

It prints the host report (which limits this machine enforces), machine facts and the load
average at start and end (the machines are small and shared: compare ratios, not absolutes),
and checks that no sandbox process outlives the run.

    python bench/sandbox.py                              # bwrap only, default sizes
    python bench/sandbox.py --compare-none               # plus the unisolated baseline
    python bench/sandbox.py --quick --compare-none       # smoke test, under 20 s
    python bench/sandbox.py --calls 1000 --concurrency 1 8 32 --pool-size 16
    python bench/sandbox.py --parent-mb 2000     # this process holds 2 GB, as a worker would
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace

from toolrl.tools.python_exec import PythonTool
from toolrl.tools.sandbox import Sandbox, SandboxConfig, SandboxPool, check_host

TRIVIAL = "x = 1"
TRIVIAL_OUT = "(no output)"
COMPUTE = "sum(i * i for i in range(10**5))"
COMPUTE_OUT = str(sum(i * i for i in range(10**5)))
TIMEOUT_S = 60.0  # far above any expected call: a timeout here is a failure, not a measurement


@dataclass
class Sizes:
    starts: int = 50  # cold Sandbox.start() samples, and PythonTool.open() samples per pool state
    calls: int = 500  # calls per cell in the one-session latency test
    traj_calls: int = 10  # M: calls per trajectory under concurrency
    min_trajs: int = 64  # trajectories per K are max(K, this), run K at a time
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    pool_size: int = 8  # as conf/tools/python.yaml ships
    parent_mb: int = 0  # memory this process allocates and touches before measuring


QUICK = Sizes(starts=5, calls=20, traj_calls=3, min_trajs=4, concurrency=[1, 4, 16, 64])


@dataclass
class LoadResult:
    k: int
    trajs: int
    wall_s: float
    call_s: list[float]
    open_s: list[float]
    failures: int
    stall_max: float

    @property
    def calls_per_s(self) -> float:
        return len(self.call_s) / self.wall_s

    @property
    def trajs_per_s(self) -> float:
        return self.trajs / self.wall_s


@dataclass
class ModeResult:
    isolation: str
    cold: list[float]
    cold_stall: list[float]
    open_warm: list[float]
    open_empty: list[float]
    trivial: list[float]
    compute: list[float]
    failures: int
    load: list[LoadResult]


def pct(xs: list[float], q: float) -> float:
    """The q-th percentile of xs, linearly interpolated between the closest ranks."""
    s = sorted(xs)
    i = q / 100 * (len(s) - 1)
    lo = int(i)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (i - lo)


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


# --- driving the tool -----------------------------------------------------------------------


def make_tool(cfg: SandboxConfig, pool_size: int) -> PythonTool:
    tool = PythonTool(timeout_s=TIMEOUT_S, pool_size=pool_size, sandbox=cfg)
    return tool


async def wait_warm(pool: SandboxPool, timeout_s: float = 60.0) -> None:
    """Wait until the pool holds `size` started sandboxes (reads its private list: there is no
    public way to ask a pool whether it is full)."""
    deadline = time.perf_counter() + timeout_s
    while pool.ready_count < pool.size:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"the pool did not fill to {pool.size} in {timeout_s:g}s")
        await asyncio.sleep(0.002)


async def prime(tool: PythonTool) -> None:
    """A pool only starts filling at its first acquire: do one, then wait for it to fill."""
    await tool.open("prime")
    await tool.close("prime")
    await wait_warm(tool.pool)


class LoopWatch:
    """A 1 ms ticker on the running loop; take() is the longest gap between ticks since the
    last take(), less the 1 ms sleep: how long something held the loop (or the OS held us)."""

    def __init__(self) -> None:
        self._gap = 0.0
        self._task = asyncio.ensure_future(self._tick())

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(0.001)
            self._gap = max(self._gap, time.perf_counter() - t0 - 0.001)

    def take(self) -> float:
        gap, self._gap = self._gap, 0.0
        return gap

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def cold_starts(cfg: SandboxConfig, n: int) -> tuple[list[float], list[float]]:
    """n Sandbox.start() calls one after another: the time to ready, and the loop stall."""
    report = check_host(cfg)
    out, stalls = [], []
    watch = LoopWatch()
    try:
        for _ in range(n):
            uid = None
            if report.per_sandbox_uid and cfg.isolation == "bwrap":  # as SandboxPool picks one
                uid = cfg.uid_base + random.randrange(1_000_000)
            sandbox = Sandbox(cfg, [], report, uid)
            await asyncio.sleep(0.005)  # let the ticker run, so take() starts from a quiet loop
            watch.take()
            t0 = time.perf_counter()
            try:
                await sandbox.start()
                out.append(time.perf_counter() - t0)
                stalls.append(watch.take())
            finally:
                await sandbox.close()
    finally:
        await watch.stop()
    return out, stalls


async def open_times(cfg: SandboxConfig, n: int, pool_size: int) -> list[float]:
    """PythonTool.open() n times; with pool_size > 0 the pool is full before each open."""
    tool = make_tool(cfg, pool_size)
    out = []
    try:
        await prime(tool)
        for i in range(n):
            await wait_warm(tool.pool)
            t0 = time.perf_counter()
            await tool.open(f"o{i}")
            out.append(time.perf_counter() - t0)
            await tool.close(f"o{i}")
    finally:
        await tool.pool.close()
    return out


async def session_latency(cfg: SandboxConfig, n: int) -> tuple[list[float], list[float], int]:
    """n trivial then n compute calls in one session, each after one untimed warm-up call."""
    tool = make_tool(cfg, 1)
    times: dict[str, list[float]] = {TRIVIAL: [], COMPUTE: []}
    failures = 0
    try:
        await tool.open("s")
        for code, expect in ((TRIVIAL, TRIVIAL_OUT), (COMPUTE, COMPUTE_OUT)):
            await tool.call("s", {"code": code})
            for _ in range(n):
                t0 = time.perf_counter()
                text, ok = await tool.call("s", {"code": code})
                times[code].append(time.perf_counter() - t0)
                failures += not ok or text != expect
    finally:
        await tool.close("s")
        await tool.pool.close()
    return times[TRIVIAL], times[COMPUTE], failures


async def load(cfg: SandboxConfig, k: int, sizes: Sizes) -> LoadResult:
    """max(k, min_trajs) trajectories, k at a time, each: open, M trivial calls, close."""
    tool = make_tool(cfg, sizes.pool_size)
    trajs = max(k, sizes.min_trajs)
    todo = iter(range(trajs))  # shared by the k workers: each takes the next trajectory
    call_s: list[float] = []
    open_s: list[float] = []
    failures = 0

    async def worker() -> None:
        nonlocal failures
        for i in todo:
            key = f"traj-{i}"
            t0 = time.perf_counter()
            await tool.open(key)
            open_s.append(time.perf_counter() - t0)
            try:
                for _ in range(sizes.traj_calls):
                    t1 = time.perf_counter()
                    text, ok = await tool.call(key, {"code": TRIVIAL})
                    call_s.append(time.perf_counter() - t1)
                    failures += not ok or text != TRIVIAL_OUT
            finally:
                await tool.close(key)

    try:
        await prime(tool)
        watch = LoopWatch()
        try:
            t0 = time.perf_counter()
            async with asyncio.TaskGroup() as group:  # one failure cancels (and closes) the rest
                for _ in range(k):
                    group.create_task(worker())
            wall = time.perf_counter() - t0
            stall = watch.take()
        finally:
            await watch.stop()
    finally:
        await tool.pool.close()
    return LoadResult(k, trajs, wall, call_s, open_s, failures, stall)


async def measure(isolation: str, sizes: Sizes) -> ModeResult:
    cfg = SandboxConfig(isolation=isolation)
    print(f"[measuring isolation={isolation}]", file=sys.stderr, flush=True)
    cold, cold_stall = await cold_starts(cfg, sizes.starts)
    warm = await open_times(cfg, sizes.starts, max(sizes.pool_size, 1))
    empty = await open_times(cfg, sizes.starts, 0)
    trivial, compute, failures = await session_latency(cfg, sizes.calls)
    loads = [await load(cfg, k, sizes) for k in sizes.concurrency]
    return ModeResult(isolation, cold, cold_stall, warm, empty, trivial, compute, failures, loads)


# --- the report -----------------------------------------------------------------------------


def _command(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (done.stdout or done.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired) as e:
        return f"unavailable ({e})"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _rss_mb() -> int:
    with open("/proc/self/status") as f:
        kib = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
    return kib >> 10


def _loadavg() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} (1/5/15 min)"


def header(sizes: Sizes, modes: list[str]) -> None:
    cfg = SandboxConfig()
    print("# toolrl python sandbox benchmark")
    print(f"load average at start: {_loadavg()}")
    print(
        f"cpus: {os.cpu_count()} ({len(os.sched_getaffinity(0))} usable), {_cpu_model()}; "
        f"kernel {platform.release()}; euid {os.geteuid()}; this process {_rss_mb()} MiB resident"
    )
    print(
        f"bwrap: {_command('bwrap', '--version')}; sandbox python: "
        f"{_command(cfg.python, '--version')}; host python {platform.python_version()}"
    )
    for mode in modes:
        for line in check_host(SandboxConfig(isolation=mode), pool_size=sizes.pool_size).lines():
            print(f"host report (isolation={mode}): {line}")
    print(
        f"limits: cpu {cfg.cpu_seconds}s, memory {cfg.memory_mb} MiB, {cfg.max_processes} "
        f"processes, scratch {cfg.scratch_mb} MiB, output {cfg.max_output_bytes} B"
    )
    print(
        f"sizes: starts={sizes.starts} calls={sizes.calls} traj-calls={sizes.traj_calls} "
        f"min-trajs={sizes.min_trajs} concurrency={sizes.concurrency} "
        f"pool-size={sizes.pool_size}",
        flush=True,  # before the progress lines on stderr
    )


def table(rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


def latency_rows(results: list[ModeResult], sizes: Sizes) -> list[list[str]]:
    names = [m.isolation for m in results]
    head = ["(milliseconds)"] + [f"{n} {q}" for n in names for q in ("p50", "p95")]
    if len(results) == 2:
        head.append("p50 ratio")
    n, c = sizes.starts, sizes.calls
    picks = [
        (f"Sandbox.start() cold, n={n}", lambda m: m.cold),
        ("  event-loop stall during it", lambda m: m.cold_stall),
        (f"PythonTool.open() warm pool, n={n}", lambda m: m.open_warm),
        (f"PythonTool.open() empty pool, n={n}", lambda m: m.open_empty),
        (f"call `{TRIVIAL}`, n={c}", lambda m: m.trivial),
        (f"call `{COMPUTE}`, n={c}", lambda m: m.compute),
    ]
    rows = [head]
    for label, get in picks:
        row = [label] + [_ms(pct(get(m), q)) for m in results for q in (50, 95)]
        if len(results) == 2:
            row.append(_ratio(pct(get(results[0]), 50), pct(get(results[1]), 50)))
        rows.append(row)
    return rows


def load_rows(results: list[ModeResult]) -> list[list[str]]:
    head = ["isolation", "K", "trajs", "calls", "wall s", "calls/s", "trajs/s"]
    head += ["call p50 ms", "call p95 ms", "open p50 ms", "open p95 ms", "stall max ms"]
    head += ["fail"]
    rows = [head]
    for i in range(len(results[0].load)):
        for m in results:
            r = m.load[i]
            rows.append(
                [m.isolation, str(r.k), str(r.trajs), str(len(r.call_s)), f"{r.wall_s:.2f}"]
                + [f"{r.calls_per_s:.0f}", f"{r.trajs_per_s:.1f}"]
                + [_ms(pct(r.call_s, 50)), _ms(pct(r.call_s, 95))]
                + [_ms(pct(r.open_s, 50)), _ms(pct(r.open_s, 95)), _ms(r.stall_max)]
                + [str(r.failures)]
            )
        if len(results) == 2:
            b, u = results[0].load[i], results[1].load[i]
            rows.append(
                ["bwrap/none", str(b.k), "", "", _ratio(b.wall_s, u.wall_s)]
                + [_ratio(b.calls_per_s, u.calls_per_s), _ratio(b.trajs_per_s, u.trajs_per_s)]
                + [_ratio(pct(b.call_s, q), pct(u.call_s, q)) for q in (50, 95)]
                + [_ratio(pct(b.open_s, q), pct(u.open_s, q)) for q in (50, 95)]
                + [_ratio(b.stall_max, u.stall_max), ""]
            )
    return rows


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces


def sandbox_pids() -> set[int]:
    """Live sandbox processes started by this process (argv holds the worker's source); others'
    sandboxes on this shared machine are left out by walking each one's parents."""
    mine = set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"_LIMITS = {" not in f.read():
                    continue
            parent = pid
            while parent > 1 and parent != os.getpid():
                parent = _ppid(parent)
        except (OSError, ValueError, IndexError):
            continue  # it ended while we looked
        if parent == os.getpid():
            mine.add(pid)
    return mine


# --- main -----------------------------------------------------------------------------------


def parse_args() -> tuple[Sizes, bool]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    base = Sizes()
    ap.add_argument("--starts", type=int, default=base.starts, help="start-up samples")
    ap.add_argument("--calls", type=int, default=base.calls, help="calls per cell, one session")
    ap.add_argument("--traj-calls", type=int, default=base.traj_calls, help="M per trajectory")
    ap.add_argument("--min-trajs", type=int, default=base.min_trajs, help="trajectories per K")
    ap.add_argument("--concurrency", type=int, nargs="+", default=base.concurrency, help="K")
    ap.add_argument("--pool-size", type=int, default=base.pool_size, help="warm sandboxes")
    ap.add_argument(
        "--parent-mb", type=int, default=base.parent_mb, help="grow this process first, MiB"
    )
    ap.add_argument("--compare-none", action="store_true", help="also run isolation=none")
    ap.add_argument(
        "--quick", action="store_true", help="small counts, a smoke test (ignores other sizes)"
    )
    args = ap.parse_args()
    if args.parent_mb < 0 or args.pool_size < 0:
        ap.error("--parent-mb and --pool-size must be >= 0")
    if args.quick:
        return replace(QUICK, parent_mb=args.parent_mb), args.compare_none
    sizes = Sizes(
        args.starts,
        args.calls,
        args.traj_calls,
        args.min_trajs,
        args.concurrency,
        args.pool_size,
        args.parent_mb,
    )
    if min(sizes.starts, sizes.calls, sizes.traj_calls, sizes.min_trajs, *sizes.concurrency) < 1:
        ap.error("--starts, --calls, --traj-calls, --min-trajs and --concurrency must be >= 1")
    return sizes, args.compare_none


def main() -> None:
    sizes, compare = parse_args()
    if shutil.which("bwrap") is None:
        sys.exit("bwrap is not installed: apt-get install bubblewrap")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    seen: set[str] = set()  # each PythonTool logs its host report again: print each line once

    def once(record: logging.LogRecord) -> bool:
        new = record.getMessage() not in seen
        seen.add(record.getMessage())
        return new

    for name in ("toolrl.tools.sandbox", "toolrl.tools.python_exec"):
        logging.getLogger(name).addFilter(once)
    modes = ["bwrap", "none"] if compare else ["bwrap"]
    ballast = bytearray(sizes.parent_mb << 20)  # held until main returns
    ballast[:: 1 << 12] = b"x" * len(ballast[:: 1 << 12])  # touch every page: resident
    header(sizes, modes)
    t0 = time.perf_counter()
    results = [asyncio.run(measure(mode, sizes)) for mode in modes]
    total_s = time.perf_counter() - t0
    print("\n## start-up and per-call latency")
    table(latency_rows(results, sizes))
    print(
        f"\n## concurrency: K trajectories at a time, each open + {sizes.traj_calls} x "
        f"`{TRIVIAL}` + close; pool of {sizes.pool_size} refilled in the background"
    )
    table(load_rows(results))
    fails = sum(m.failures + sum(r.failures for r in m.load) for m in results)
    deadline = time.perf_counter() + 5
    while sandbox_pids() and time.perf_counter() < deadline:
        time.sleep(0.05)
    left = sandbox_pids()
    print(f"\nwrong or failed calls: {fails}; sandbox processes left after close: {len(left)}")
    print(f"measured in {total_s:.1f}s; load average at end: {_loadavg()}")
    if fails or left:
        sys.exit(1)


if __name__ == "__main__":
    main()
