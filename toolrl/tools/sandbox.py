"""OS-level sandboxes for model-written Python: one bubblewrap process per trajectory, kept warm.

Each sandbox is `bwrap` running `sandbox_worker.py` under the system Python, with:

    namespaces   new user, pid, network (loopback only: no network, no DNS), ipc, uts, mount
    file system  read-only /usr (and /etc/ld.so.cache); nothing of /home, /root, /work or /tmp;
                 the root and /dev remounted read-only; a private size-capped tmpfs at /scratch
                 (and one at /dev/shm, for multiprocessing)
    environment  empty but PATH, HOME and TMPDIR (bwrap itself is started with an empty one too,
                 so not even /proc/1/environ holds a host variable)
    rlimits      CPU seconds, address space, file size, stack; processes too (see below)
    memory       a memory cgroup per sandbox (toolrl.tools.cgroup) caps the whole sandbox at
                 memory_mb, forked processes included, where one can be created (root, or a
                 delegated subtree). Elsewhere the rlimits bound the total instead: each
                 process gets memory_mb / max_processes of address space
    output       stdout and stderr go to a file on its own tiny tmpfs, so a flood fails with
                 ENOSPC instead of filling host memory
    time         the host kills the whole process group when a call overruns its wall time

The process-count limit needs care: RLIMIT_NPROC counts every process of a user id. When the
rollout worker runs as root, each sandbox runs as its own unused uid, so the cap is exact
per sandbox. Otherwise all sandboxes share the user's uid and the cap is set to the user's
current process count plus `max_processes` times the pool size: a fork bomb is still
bounded, but the sandboxes share that allowance. `check_host` says which case holds, and
the tool logs every limit it could not enforce, loudly, when it starts.

    python -m toolrl.tools.sandbox      # print what this machine enforces
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import shutil
import signal
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from toolrl.tools.cgroup import MemoryCgroup, Parent, memory_parent

log = logging.getLogger(__name__)

_WORKER_SOURCE = (Path(__file__).parent / "sandbox_worker.py").read_text()
_OUTPUT_DIR = "/run/toolrl"
_SCRATCH = "/scratch"


@dataclass
class SandboxConfig:
    isolation: str = "bwrap"  # "bwrap", or "none" to run unisolated (a loud warning at start)
    python: str = "/usr/bin/python3"  # the interpreter inside; it must live under ro_binds
    ro_binds: list[str] = field(default_factory=lambda: ["/usr"])
    cpu_seconds: int = 30  # CPU time of each process over the whole session
    memory_mb: int = 1024  # the whole sandbox (see the module docstring)
    memory_cgroup: str = "auto"  # auto: a cgroup where one can be made; off: rlimits only
    max_processes: int = 16
    scratch_mb: int = 32  # the private writable /scratch (also the largest file)
    max_output_bytes: int = 16384  # stdout + stderr of one call; the rest is cut
    stack_mb: int = 64
    uid_base: int = 200_000  # root only: sandboxes run as uids from here on

    def problems(self) -> list[str]:
        """What is wrong with this config on this machine, as messages that say what to change."""
        out = []
        if self.isolation not in ("bwrap", "none"):
            out.append(f"isolation is {self.isolation!r}; use bwrap (or none, unisolated)")
        if self.isolation == "bwrap" and shutil.which("bwrap") is None:
            out.append(
                "isolation=bwrap but `bwrap` is not installed: `apt-get install bubblewrap` "
                "(Debian/Ubuntu), or set isolation=none to run model code unisolated"
            )
        if not os.access(self.python, os.X_OK):
            out.append(f"python={self.python!r} is not an executable interpreter")
        for name in ("cpu_seconds", "memory_mb", "max_processes", "scratch_mb", "stack_mb"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be >= 1")
        if not 0 < self.uid_base < 2**31 - 1_000_000:
            out.append("uid_base must be in (0, 2**31 - 1e6): sandboxes take uids above it")
        if self.memory_cgroup not in ("auto", "off"):
            out.append(f"memory_cgroup is {self.memory_cgroup!r}; use auto or off")
        if self.max_output_bytes < 64:
            out.append("max_output_bytes must be >= 64")
        return out


@dataclass
class CellResult:
    output: str
    error: str | None
    output_full: bool


class SandboxDied(RuntimeError):
    """The sandbox process ended or broke protocol during a call; its state is gone."""


ToolHandler = Callable[[str, dict[str, Any]], Awaitable[str]]


class Sandbox:
    """One sandboxed Python process: a session's state lives in it until it is killed."""

    def __init__(self, cfg: SandboxConfig, exposed: list[str], host: HostReport, uid: int | None):
        self.cfg, self.exposed, self.host, self.uid = cfg, exposed, host, uid
        self.proc: asyncio.subprocess.Process | None = None
        self._scratch: str | None = None  # isolation=none only: a host temp dir as scratch
        self.cgroup: MemoryCgroup | None = None

    def _limits(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "cpu_seconds": c.cpu_seconds,
            "memory_bytes": self.host.process_memory_mb << 20,
            "max_processes": self.host.nproc_cap,
            "max_file_bytes": c.scratch_mb << 20,
            "stack_bytes": c.stack_mb << 20,
            "max_output_bytes": c.max_output_bytes,
            "output_path": f"{self._scratch or _OUTPUT_DIR}/out",
            "exposed": self.exposed,
            "kill_strays": c.isolation == "bwrap",  # kill(-1) outside a pid namespace: never
        }

    def _argv(self) -> list[str]:
        c = self.cfg
        py = [c.python, "-I", "-B", "-c", _WORKER_SOURCE, json.dumps(self._limits())]
        if c.isolation == "none":
            return py
        # No --new-session: the process is already started in a session of its own with no
        # terminal, and staying in its process group lets one killpg take bwrap's pid-1 child
        # too, even before that child has armed --die-with-parent.
        argv = ["bwrap", "--unshare-all", "--die-with-parent", "--clearenv"]
        for path in c.ro_binds:
            argv += ["--ro-bind", path, path]
        for name in ("lib", "lib64", "bin", "sbin"):  # merged-/usr systems link these into /usr
            if os.path.islink(f"/{name}"):
                argv += ["--symlink", os.readlink(f"/{name}"), f"/{name}"]
        argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev"]  # /dev is a tmpfs
        argv += ["--size", str(c.scratch_mb << 20), "--tmpfs", "/dev/shm"]  # for multiprocessing
        argv += ["--size", str(c.scratch_mb << 20), "--tmpfs", _SCRATCH]
        argv += ["--size", str(c.max_output_bytes + 8192), "--tmpfs", _OUTPUT_DIR]
        argv += ["--remount-ro", "/", "--chdir", _SCRATCH]
        for key, value in (("PATH", "/usr/bin:/bin"), ("HOME", _SCRATCH), ("TMPDIR", _SCRATCH)):
            argv += ["--setenv", key, value]
        return argv + py

    async def start(self) -> None:
        env: dict[str, str] = {}
        if self.cfg.isolation == "none":
            import tempfile

            self._scratch = tempfile.mkdtemp(prefix="toolrl-sandbox-")
            env = {"PATH": "/usr/bin:/bin", "HOME": self._scratch, "TMPDIR": self._scratch}
        argv = self._argv()
        if self.uid is not None:  # uvloop (Ray's actors) has no user=/group= for subprocesses
            argv = [
                "setpriv",
                f"--reuid={self.uid}",
                f"--regid={self.uid}",
                "--clear-groups",
            ] + argv
        if self.host.memory is not None:  # joined first, while still allowed to (root)
            self.cgroup = MemoryCgroup.create(self.host.memory, self.cfg.memory_mb << 20)
            argv = self.cgroup.join_argv() + argv
        try:
            await self._spawn(argv, env)
        except BaseException:
            self.kill()
            if self.cgroup is not None:
                self.cgroup.remove()  # its process never ran, or is killed and waited for
            raise

    async def _spawn(self, argv: list[str], env: dict[str, str]) -> None:
        spawn = asyncio.ensure_future(
            asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed whole
                cwd=self._scratch or "/",
            )
        )
        try:
            self.proc = await asyncio.shield(spawn)
        except asyncio.CancelledError:  # the process may exist already: kill it once it does
            spawn.add_done_callback(_kill_spawned)
            raise
        try:
            msg = await self._read()
        except BaseException:
            self.kill()  # cancelled while starting (the pool closing): leave nothing behind
            raise
        if msg.get("type") != "ready":
            raise SandboxDied(f"the sandbox did not start: {msg}")

    async def _read(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            head = await self.proc.stdout.readexactly(4)
            body = await self.proc.stdout.readexactly(struct.unpack(">I", head)[0])
            return json.loads(body)
        except (asyncio.IncompleteReadError, ValueError, UnicodeDecodeError) as e:
            raise SandboxDied(await self._death_note()) from e

    def _write(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        data = json.dumps(msg).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)

    async def _death_note(self) -> str:
        assert self.proc is not None
        self.kill()
        code = await self.proc.wait()
        why = f"exit code {code}"
        sig = -code if code < 0 else code - 128  # bwrap exits with 128 + the worker's signal
        if sig in signal.valid_signals():
            why = f"killed by {signal.Signals(sig).name}"
        if self.proc.stderr is not None:
            err = (await self.proc.stderr.read(2000)).decode(errors="replace").strip()
            if err:
                why += f": {err}"
        self._close_pipes()
        return f"the Python process ended ({why})"

    async def run(self, code: str, on_tool: ToolHandler) -> CellResult:
        """Run one cell; exposed-tool requests from inside are answered with `on_tool`."""
        try:
            self._write({"code": code})
            while True:
                msg = await self._read()
                if msg.get("type") == "tool":
                    text = await on_tool(str(msg.get("name")), dict(msg.get("arguments") or {}))
                    self._write({"text": text})
                elif msg.get("type") == "done":
                    return CellResult(str(msg["output"]), msg["error"], bool(msg["output_full"]))
                else:
                    raise SandboxDied(f"the sandbox broke protocol: {str(msg)[:200]}")
        except (BrokenPipeError, ConnectionResetError) as e:
            raise SandboxDied(await self._death_note()) from e
        except BaseException:
            self.kill()  # cancelled (the loop's timeout) or failed mid-call: state is unusable
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    async def close(self) -> None:
        self.kill()
        if self.proc is not None:
            await self.proc.wait()
            self._close_pipes()
        for _ in range(200):  # bwrap's children may take a moment to leave a killed cgroup
            if self.cgroup is None or self.cgroup.remove():
                break
            await asyncio.sleep(0.01)

    def _close_pipes(self) -> None:
        transport = getattr(self.proc, "_transport", None)
        if transport is not None:
            transport.close()  # now, rather than when the event loop may be gone


def _kill_spawned(spawn: asyncio.Future[asyncio.subprocess.Process]) -> None:
    if not spawn.cancelled() and spawn.exception() is None:
        try:
            os.killpg(spawn.result().pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class SandboxPool:
    """Keeps `size` sandboxes started so a trajectory's first call does not wait for one."""

    def __init__(self, cfg: SandboxConfig, size: int, exposed: list[str]) -> None:
        self.cfg, self.size, self.exposed = cfg, size, exposed
        self.report = check_host(cfg, pool_size=size)
        self._ready: list[Sandbox] = []
        self._filling: asyncio.Task[None] | None = None
        self._closing = False
        # Starts at once: spawning blocks the event loop (which also drives the engine) for a
        # moment each; dozens together stalled it for 0.6 s in bench/sandbox.py.
        self._starting = asyncio.Semaphore(4)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def _new(self) -> Sandbox:
        uid = None
        if self.report.per_sandbox_uid:
            uid = self.cfg.uid_base + random.randrange(1_000_000)  # an unused uid of its own
        return Sandbox(self.cfg, self.exposed, self.report, uid)

    async def acquire(self) -> Sandbox:
        sandbox = self._ready.pop() if self._ready else None
        if sandbox is None or sandbox.proc is None or sandbox.proc.returncode is not None:
            if sandbox is not None:
                await sandbox.close()  # died while warm: its pipes and cgroup go too
            sandbox = self._new()
            async with self._starting:
                await sandbox.start()
        if not self._closing and (self._filling is None or self._filling.done()):
            self._filling = asyncio.ensure_future(self._fill())
        return sandbox

    async def _fill(self) -> None:
        while not self._closing and len(self._ready) < self.size:
            sandbox = self._new()
            try:
                async with self._starting:
                    await sandbox.start()
            except Exception as e:  # acquire() starts one itself and reports the fault
                log.warning("could not start a warm sandbox: %s", e)
                return
            self._ready.append(sandbox)

    async def close(self) -> None:
        # The fill is let finish (a start takes milliseconds) rather than cancelled: a process
        # cancelled while being spawned could outlive the event loop that would kill it.
        self._closing = True
        if self._filling is not None:
            await asyncio.gather(self._filling, return_exceptions=True)
        for sandbox in self._ready:
            await sandbox.close()
        self._ready.clear()


@dataclass
class HostReport:
    per_sandbox_uid: bool
    nproc_cap: int
    unenforced: list[str]
    memory: Parent | None = None  # where sandboxes' memory cgroups go; None: rlimits only
    process_memory_mb: int = 1024  # each process's address space

    def lines(self) -> list[str]:
        return [f"UNENFORCED: {u}" for u in self.unenforced] or ["all limits enforced"]


def _user_process_count() -> int:
    uid, count = os.getuid(), 0
    for pid in os.listdir("/proc"):
        try:
            if pid.isdigit() and os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))  # threads count too
        except OSError:
            pass  # it ended while we looked
    return count


def check_host(cfg: SandboxConfig, pool_size: int = 1) -> HostReport:
    """Which limits this machine can enforce for `cfg`; each gap is a sentence to log."""
    gaps = []
    if cfg.isolation == "none":
        gaps.append(
            "isolation=none: model code runs with this user's file system, network and "
            "environment; only the rlimits and the wall timeout apply"
        )
    per_uid = cfg.isolation == "bwrap" and os.geteuid() == 0 and bool(shutil.which("setpriv"))
    if per_uid:
        cap = cfg.max_processes
    else:
        gaps.append(
            "not root (or no setpriv, or isolation=none), so sandboxes share this user's "
            "process count: RLIMIT_NPROC is set to the current count plus max_processes x "
            "pool size, an allowance they share"
        )
        cap = _user_process_count() + cfg.max_processes * max(pool_size, 1)
    memory = memory_parent() if cfg.memory_cgroup == "auto" else None
    if memory is not None:
        return HostReport(per_uid, cap, gaps, memory, cfg.memory_mb)
    share = max(cfg.memory_mb // cfg.max_processes, 1)
    gaps.append(
        f"no memory cgroup (memory_cgroup={cfg.memory_cgroup}, or none can be created here), "
        f"so each process gets memory_mb / max_processes = {share} MB of address space: "
        + (
            "a sandbox holds at most memory_mb"
            if per_uid
            else "the pool's sandboxes together hold at most memory_mb x pool size"
        )  # fmt: skip
    )
    return HostReport(per_uid, cap, gaps, None, share)


def log_report(report: HostReport) -> None:
    for gap in report.unenforced:
        log.warning("PYTHON SANDBOX LIMIT NOT ENFORCED: %s", gap)


# Run inside a fresh sandbox: each line that prints names an isolation the machine did not give.
_PROBE = """
import os, resource, socket
try:
    socket.create_connection(("1.1.1.1", 53), timeout=1).close()
    print("network: a connection out succeeded")
except OSError:
    pass
for path in ("/home", "/root", "/work", "/etc/passwd"):
    if os.path.exists(path):
        print(f"file system: host path {path} is visible")
if os.access("/usr", os.W_OK) and os.statvfs("/usr").f_flag & os.ST_RDONLY == 0:
    print("file system: /usr is writable")
if resource.getrlimit(resource.RLIMIT_AS)[1] == resource.RLIM_INFINITY:
    print("rlimits: no address-space limit")
if os.getpid() > 2:
    print("processes: not in a pid namespace of its own")
"""


async def probe(cfg: SandboxConfig) -> list[str]:
    """Start one sandbox and check from inside what it isolates; return what it does not."""
    sandbox = Sandbox(cfg, [], check_host(cfg), None)
    await sandbox.start()
    try:
        result = await sandbox.run(_PROBE, lambda name, args: asyncio.sleep(0, ""))
    finally:
        await sandbox.close()
    return [line for line in result.output.splitlines() if line] + (
        [f"the probe failed: {result.error}"] if result.error else []
    )


if __name__ == "__main__":
    config = SandboxConfig()
    for problem in config.problems():
        print(f"PROBLEM: {problem}")
    print(json.dumps(asdict(config), indent=1))
    print("\n".join(check_host(config).lines()))
    if config.problems():
        sys.exit(1)
    gaps = asyncio.run(probe(config))
    print("\n".join(f"PROBE: {g}" for g in gaps) or "probe from inside: isolated")
    sys.exit(1 if gaps else 0)
