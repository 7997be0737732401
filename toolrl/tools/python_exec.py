"""The `python` tool: a stateful Python interpreter per trajectory, in an OS sandbox.

A trajectory's first call takes a warm sandbox from the pool; its variables and functions
persist across that trajectory's calls and nothing is shared with another trajectory. The
sandbox is killed when the trajectory ends. What the model reads is the cell's printed
output (the value of a trailing expression included), then its traceback if it raised.

When a call overruns `timeout_s`, or the process dies (segfault, CPU limit, os._exit), the
whole process group is killed and the answer says so; the next call gets a fresh sandbox
and is told its earlier state is gone. A sandbox that cannot start at all is an
infrastructure fault (`ToolInfraError`), not the model's mistake.

Other tools can be exposed inside as functions returning text, e.g. with conf/tools/python.yaml:

    python:
      _target_: toolrl.tools.python_exec.PythonTool
      expose:
        search: {_target_: toolrl.tools.search.SearchTool, ...}

and the model writes `print(search(query="capital of France"))`.
Isolation and limits: toolrl/tools/sandbox.py.  Tests: tests/unit/test_python_sandbox.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from toolrl.tools.base import Tool, ToolInfraError
from toolrl.tools.sandbox import SandboxConfig, SandboxDied, SandboxPool, log_report, probe

log = logging.getLogger(__name__)

SCHEMA = {
    "type": "function",
    "function": {
        "name": "python",
        "description": "Run Python code in a sandbox and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source to run"}},
            "required": ["code"],
        },
    },
}

_RESET = "[the Python state was reset: variables from earlier calls are gone]\n"


class PythonTool:
    name = "python"

    def __init__(
        self,
        timeout_s: float = 5.0,
        pool_size: int = 4,
        max_code_chars: int = 20_000,
        expose: dict[str, Tool] | None = None,
        sandbox: SandboxConfig | dict[str, Any] | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        cfg = _sandbox_config(sandbox)
        self.max_concurrency = max_concurrency  # cells running at once on this worker
        self.cfg, self.timeout_s, self.max_code_chars = cfg, timeout_s, max_code_chars
        self.expose = dict(expose or {})
        self.pool = SandboxPool(cfg, pool_size, sorted(self.expose))
        log_report(self.pool.report)
        self._sessions: dict[str, Any] = {}  # traj_key -> Sandbox, or None after a reset
        self._opened: dict[str, set[str]] = {}  # traj_key -> exposed tools opened for it
        self._locks: dict[str, asyncio.Lock] = {}  # one cell at a time per session
        self._probed = False

    @staticmethod
    def preflight(**kwargs: Any) -> None:
        """Checks `main` runs before Ray starts: a bad sandbox config fails there."""
        _sandbox_config(kwargs.get("sandbox"))

    def schema(self) -> dict[str, Any]:
        return SCHEMA

    async def open(self, traj_key: str) -> None:
        if not self._probed:  # once, at the first call: check from inside what is isolated
            self._probed = True
            try:
                gaps = await probe(self.cfg)
            except Exception as e:  # acquire() below reports a sandbox that cannot start
                gaps = [f"the isolation probe could not run: {e}"]
            for gap in gaps:
                log.warning("PYTHON SANDBOX NOT ISOLATED: %s", gap)
        try:
            self._sessions[traj_key] = await self.pool.acquire()
        except (SandboxDied, OSError) as e:
            raise ToolInfraError(f"python: no sandbox could start: {e}") from e
        self._opened.setdefault(traj_key, set())
        self._locks.setdefault(traj_key, asyncio.Lock())

    async def call(self, traj_key: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        code = arguments.get("code")
        if not isinstance(code, str) or set(arguments) != {"code"}:
            got = ", ".join(f"{k}: {type(v).__name__}" for k, v in arguments.items()) or "nothing"
            return f"Error: python takes one argument, code (a string); got {got}", False
        if len(code) > self.max_code_chars:
            return (
                f"Error: code is {len(code)} characters; the limit is {self.max_code_chars}",
                False,
            )
        # Parallel calls of one turn share the interpreter: they run one after another, in
        # the order the model wrote them (the lock is first come, first served).
        async with self._locks.setdefault(traj_key, asyncio.Lock()):
            return await self._run(traj_key, code)

    async def _run(self, traj_key: str, code: str) -> tuple[str, bool]:
        prefix = ""
        if self._sessions.get(traj_key) is None:  # the last call killed it
            await self.open(traj_key)
            prefix = _RESET
        sandbox = self._sessions[traj_key]
        try:
            result = await asyncio.wait_for(
                sandbox.run(code, lambda n, a: self._call_exposed(traj_key, n, a)), self.timeout_s
            )
        except (TimeoutError, SandboxDied) as e:
            self._sessions[traj_key] = None
            await sandbox.close()
            why = f"timed out after {self.timeout_s:g}s" if isinstance(e, TimeoutError) else e
            return prefix + f"Error: {why}; the process was killed and its state reset", False
        except asyncio.CancelledError:
            self._sessions[traj_key] = None  # run() killed it: the next call starts afresh
            asyncio.ensure_future(sandbox.close())
            raise
        text = prefix + result.output
        if result.output_full:
            text += f"\n[output cut at {self.cfg.max_output_bytes} bytes]"
        if result.error:
            text += ("\n" if text and not text.endswith("\n") else "") + result.error
        return text.rstrip() or "(no output)", result.error is None

    async def _call_exposed(self, traj_key: str, name: str, arguments: dict[str, Any]) -> str:
        tool = self.expose.get(name)
        if tool is None:
            return f"Error: unknown tool {name!r}"
        if name not in self._opened.setdefault(traj_key, set()):
            await tool.open(traj_key)
            self._opened[traj_key].add(name)
        try:
            text, _ = await tool.call(traj_key, arguments)
        except ToolInfraError:
            raise
        except Exception as e:  # a bug in an exposed tool is reported to the cell, as text
            return f"Error: {name} failed: {type(e).__name__}: {e}"
        return str(text)

    async def close(self, traj_key: str) -> None:
        sandbox = self._sessions.pop(traj_key, None)
        if sandbox is not None:
            await sandbox.close()
        self._locks.pop(traj_key, None)
        for name in self._opened.pop(traj_key, set()):
            await self.expose[name].close(traj_key)


def _sandbox_config(sandbox: SandboxConfig | dict[str, Any] | None) -> SandboxConfig:
    """The sandbox config from YAML's mapping; ValueError saying what to change if this
    machine cannot honour it, TypeError for an unknown key."""
    cfg = sandbox if isinstance(sandbox, SandboxConfig) else SandboxConfig(**(sandbox or {}))
    problems = cfg.problems()
    if problems:
        raise ValueError("python tool: " + "; ".join(problems))
    return cfg
