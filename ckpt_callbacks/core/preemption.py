"""Preemption signals: the handler only sets a flag; the save happens at the next step boundary.

Training then stops and returns normally (`train()`, `fit()`, or the plain loop's `break`); the library
never ends the process. `exit_code` is what a preempted script should exit with, so that a scheduler
sees an unfinished run: `sys.exit(callback.exit_code)`.

Doing I/O or collectives inside a signal handler can deadlock or run mid-backward
(Lightning #21406); a flag checked between steps cannot.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["PREEMPTION_SIGNALS", "PreemptionFlag"]

PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class PreemptionFlag:
    """Install with `install()`; poll `requested`; `uninstall()` restores the previous handlers."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def install(self) -> bool:
        """Install the handlers; False (and nothing installed) outside the main thread."""
        if threading.current_thread() is not threading.main_thread() or self._previous:
            return bool(self._previous)
        for signum in PREEMPTION_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return True

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        # A second signal of the same kind gets the previous behaviour (usually: terminate), so an
        # impatient scheduler or user can still end the process.
        previous = self._previous.pop(signum, signal.SIG_DFL)
        signal.signal(signum, previous)

    @property
    def exit_code(self) -> int:
        """0 when no signal was received, else the conventional status of a process ended by that signal:
        128 + signum (143 for SIGTERM, 138 for SIGUSR1), what shells, Docker and Kubernetes report."""
        return 0 if self.received is None else 128 + self.received
