"""Preemption signals: the handler only sets a flag; the save happens at the next step boundary.

Doing I/O or collectives inside a signal handler can deadlock or run mid-backward
(Lightning #21406); a flag checked between steps cannot.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

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
        """The conventional exit status of a process ended by the received signal (128 + signum)."""
        return 128 + (self.received or 0)
