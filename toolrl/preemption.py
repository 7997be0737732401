"""Stopping a run on a signal, with its last completed step saved.

Slurm warns a job before its time limit or a pre-emption with a signal (`--signal=B:USR1@180`
sends SIGUSR1 to the batch shell, which passes it on; submitit sends SIGUSR2); users press
Ctrl-C (SIGINT); `scancel`
and container runtimes send SIGTERM. `StopRequest.install()` makes each of them only set a
flag. The trainer looks at it between steps and while it waits for a rollout (the wait that
has no bound: tools may hang), so the step in flight is abandoned, the last completed one is
saved, Ray and vLLM shut down, and `toolrl.main` exits with 128 + the signal's number (143 for
SIGTERM), as a shell reports a process the signal stopped. A second signal stops at once,
without saving (a step half done must not be saved as done), unless it comes within
REPEAT_S of the first: the same stop delivered twice (Slurm signals every process of a job
step, and toolrl.cluster passes the signal on as well). Signals during the shutdown that
follows are only noted, so Ray and vLLM still stop.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

# SIGUSR2: submitit's warning before a Slurm time limit (conf/hydra/launcher/slurm.yaml)
SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)
REPEAT_S = 2.0  # a second signal sooner than this after the first is the same request
T = TypeVar("T")


class Preempted(Exception):
    """A stop signal arrived; the run saves what it completed and exits."""

    def __init__(self, signum: int, immediate: bool = False) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.immediate = immediate  # a second signal: raised wherever the run was, no save
        self.completed = 0  # training steps done when it stopped (the trainer sets it)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopRequest:
    """The flag the signal handlers set (`signum`), and waits that look at it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0  # time.monotonic() of the first signal
        self.shutting_down = False  # set during cleanup: later signals only set the flag

    def install(self) -> None:
        """Handle SIGNALS; call it after ray.init (which sets its own), so ours win. Only the
        main thread may set handlers: elsewhere (a run started from a thread) it does nothing."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum, self.first_at = signum, time.monotonic()
        elif not self.shutting_down and time.monotonic() - self.first_at >= REPEAT_S:
            raise Preempted(signum, immediate=True)  # a second one: stop waiting, no save

    def check(self) -> None:
        """Raise Preempted when a stop signal has arrived."""
        if self.signum is not None:
            raise Preempted(self.signum)

    def wait(self, future: Future[T], poll_s: float = 0.2) -> T:
        """`future.result()`, giving up with Preempted as soon as a stop signal arrives."""
        while True:
            self.check()
            try:
                return future.result(timeout=poll_s)
            except FutureTimeout:
                continue
