"""Background writing with bounded memory and errors that are never swallowed.

At most `max_in_flight` checkpoints are queued or being written; `submit` waits
for room first (back-pressure when the disk is slower than the save interval).
An error from a background write is re-raised by the next `submit`, by `wait`,
and by `close`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from ckpt_callbacks.errors import CheckpointError, CheckpointWriteError


class BackgroundWriter:
    def __init__(self, max_in_flight: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self._executor: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return sum(1 for f in self._pending if not f.done())

    def submit(self, job: Callable[[], None]) -> None:
        """Queue `job`, first re-raising any earlier failure and waiting for room."""
        self._raise_first_failure(block_until=self.max_in_flight - 1)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self._pending.append(self._executor.submit(job))

    def wait(self) -> None:
        """Block until every queued job finished; raise the first error."""
        self._raise_first_failure(block_until=0)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _raise_first_failure(self, block_until: int) -> None:
        first_error: BaseException | None = None
        while self._pending and (len(self._pending) > block_until or self._pending[0].done()):
            future = self._pending.popleft()
            error = future.exception()  # blocks until done
            if error is not None and first_error is None:
                first_error = error
        if first_error is not None:
            if isinstance(first_error, CheckpointError):
                raise first_error
            raise CheckpointWriteError(f"A background checkpoint write failed: {first_error}") from first_error
