"""A memory cgroup per sandbox: one limit on everything a sandbox runs, the processes a cell
forks included (an rlimit caps each process alone: 4 forked processes held 3,840 MiB under a
1 GiB rlimit).

Where this process may create cgroups (root, or a delegated subtree), `memory_parent()` finds
a folder for them: cgroup v2 (a `toolrl` child of the unified hierarchy's root with the
memory controller enabled for its children) or v1 (a `toolrl` folder under the memory
controller's mount, as on hosts with the legacy hierarchy). Most cluster users can create
neither; `toolrl.tools.sandbox` then bounds the total with rlimits instead.

    parent = memory_parent()                    # None: no cgroup can be made here
    cg = MemoryCgroup.create(parent, 1 << 30)   # 1 GiB for everything inside
    argv = cg.join_argv() + argv                # the process joins before it execs
    ...
    cg.peak_bytes(); cg.remove()                # once its processes are gone

    python -m toolrl.tools.cgroup               # where this machine puts them, if anywhere
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
_counter = itertools.count()


@dataclass(frozen=True)
class Parent:
    path: Path  # the folder sandboxes' cgroups are made in
    version: int  # 1 or 2


def memory_parent(root: Path = CGROUP_ROOT) -> Parent | None:
    """The folder to make memory cgroups in (created if needed), or None where none can be."""
    for make in (_v2_parent, _v1_parent):
        try:
            parent = make(root)
        except OSError:
            parent = None
        if parent is not None:
            _remove_orphans(parent.path)
            return parent
    return None


def _remove_orphans(parent: Path) -> None:
    """Remove the cgroups of processes that are gone (a worker that crashed left them)."""
    for path in parent.glob("sandbox-*-*"):
        try:
            os.kill(int(path.name.split("-")[1]), 0)
        except ProcessLookupError:
            try:
                path.rmdir()
            except OSError:
                pass
        except (ValueError, PermissionError):
            pass


def _v2_parent(root: Path) -> Parent | None:
    if not (root / "cgroup.controllers").exists():  # a v1 or hybrid layout
        return None
    if "memory" not in (root / "cgroup.controllers").read_text().split():
        return None
    _write(root / "cgroup.subtree_control", "+memory")
    parent = root / "toolrl"
    parent.mkdir(exist_ok=True)
    _write(parent / "cgroup.subtree_control", "+memory")
    return Parent(parent, 2)


def _v1_parent(root: Path) -> Parent | None:
    memory = root / "memory"
    if not (memory / "memory.limit_in_bytes").exists():
        return None
    parent = memory / "toolrl"
    parent.mkdir(exist_ok=True)
    return Parent(parent, 1) if os.access(parent, os.W_OK) else None


class MemoryCgroup:
    """One sandbox's cgroup: a memory limit (swap included where the kernel accounts it)."""

    def __init__(self, path: Path, version: int) -> None:
        self.path, self.version = path, version

    @classmethod
    def create(cls, parent: Parent, limit_bytes: int) -> MemoryCgroup:
        while True:
            path = parent.path / f"sandbox-{os.getpid()}-{next(_counter)}"
            try:
                path.mkdir()
                break
            except FileExistsError:  # left by an earlier process with this pid
                continue
        cg = cls(path, parent.version)
        try:
            if parent.version == 2:
                _write(path / "memory.max", str(limit_bytes))
                if (path / "memory.swap.max").exists():
                    _write(path / "memory.swap.max", "0")
            else:
                _write(path / "memory.limit_in_bytes", str(limit_bytes))
                if (path / "memory.memsw.limit_in_bytes").exists():
                    _write(path / "memory.memsw.limit_in_bytes", str(limit_bytes))
        except OSError:
            cg.remove()
            raise
        return cg

    def join_argv(self) -> list[str]:
        """A prefix for a command line: the shell joins this cgroup, then execs the command,
        so the process and all it forks are inside before any of it runs."""
        return ["/bin/sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(self.procs)]

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def peak_bytes(self) -> int | None:
        """The most memory the cgroup held so far (None where the kernel does not say)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int((self.path / name).read_text())
        except (OSError, ValueError):
            return None

    def remove(self) -> bool:
        """Remove the cgroup; False while a process is still in it (killed, not yet gone)."""
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # EBUSY
            return False
        return True


def _write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    found = memory_parent()
    print(f"memory cgroups: v{found.version} in {found.path}" if found else "memory cgroups: none")
