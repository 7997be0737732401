"""The Tool protocol: what the rollout group needs from anything the model can call.

A tool is named in YAML with `_target_` and instantiated once per rollout worker. State
that must not leak between samples lives in a per-trajectory session: `open(traj_key)`
is called before a trajectory's first call to this tool and `close(traj_key)` when the
trajectory ends, whatever happened in between.

`call` returns text the model reads. A mistake by the model (bad arguments, a math
error) is returned as text with ok=False. A fault of the infrastructure (the sandbox
died, the retriever is down) is raised as `ToolInfraError`: the agent loop marks the
trajectory and the trainer keeps it out of the loss.

The per-call timeout is enforced by the agent loop, not trusted to the tool. A tool may
declare `max_concurrency`, the calls it takes at once (per rollout worker): the agent loop
queues further calls, and the wait does not count towards the call's timeout.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


class ToolInfraError(RuntimeError):
    """The tool's infrastructure failed; not the model's fault."""


@runtime_checkable
class Tool(Protocol):
    name: str
    # optional: calls at once per rollout worker (None or absent: no limit)
    # max_concurrency: int | None

    def schema(self) -> dict[str, Any]:
        """The OpenAI function schema the chat template renders: {"type": "function", "function": {...}}."""
        ...

    async def open(self, traj_key: str) -> None: ...

    async def call(self, traj_key: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Run one call; return (text for the model, ok)."""
        ...

    async def close(self, traj_key: str) -> None: ...


class StatelessTool:
    """Base for tools with no per-trajectory state: open and close do nothing."""

    name: str = ""
    max_concurrency: int | None = None

    async def open(self, traj_key: str) -> None:
        return None

    async def close(self, traj_key: str) -> None:
        return None
