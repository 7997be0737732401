"""Network helpers for tests."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A localhost port that was free a moment ago (nothing listens there now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
