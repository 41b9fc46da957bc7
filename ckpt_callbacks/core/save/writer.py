"""Background writing with bounded memory and errors that are never swallowed.

At most `max_in_flight` checkpoints are queued or being written; `submit` waits
for room first (back-pressure when the disk is slower than the save interval).
An error from a background write is re-raised by the next `submit`, by `wait`,
and by `close`. Deferred staging copies run on a second thread
(`stage_in_background`), so a slow write of the previous checkpoint never
delays the copy the next optimizer step waits for; the write of a checkpoint
starts once its copy is complete.

Pending writes are flushed when the interpreter exits normally or through an
uncaught exception (`atexit`; a failure is then logged, there is no caller
left to raise to), and on SIGTERM/SIGUSR1 when nothing else handles them:
the handler waits for the writes, then lets the signal end the process as it
would have.

Why a thread and not a process: the writer's Python work is a few calls per
file (`written_files.write_buffers`); file writes, fsync and hashing release
the GIL. On the project machine (2 cores), a GIL-bound training loop ran at the
same speed while a thread or a separate process wrote a 1.49 GB checkpoint
(median ratio 0.92-1.07 over four interleaved runs, `benchmarks/writer_mode.py`):
the slowdown is the CPU and memory bandwidth the write itself takes, which a
process pays too, plus shared-memory staging and a second interpreter.

Why the writer thread runs at the process's own priority (niceness 0 added):
a checkpoint protects work only once it is durable, and a lowered priority
makes that moment depend on everything else the machine runs. At niceness 10,
with the cores busy (dataloader workers, other jobs), the writer starved: with
the HF Trainer and two CPU-bound processes beside it, a hard crash 1-3 steps
after a save lost that save in 9 of 11 runs (the checkpoint still a staging
folder 0.6-2.2 s after the save of a 0.4 MB model), and the write's share of
the CPU it would have yielded is small anyway: it is I/O-bound (`O_DIRECT`
writes from one bounce buffer, xxh3 at ~30 GB/s), and in `benchmarks/
writer_mode.py` a GIL-bound loop ran as fast during a write at niceness 0 as
at 10 (ratio 0.997). Back-pressure bounds the rest: with `max_in_flight`
saves queued, the next save waits for the oldest to be durable, so a save is
durable at the latest when the save after it returns. `benchmarks/loaded.py`
measures the time to durable with every core busy.
`BackgroundWriter.niceness = 10` (before the first save) restores the old
behaviour; it cannot be undone for that thread without privileges, since
Linux lets an unprivileged thread lower its priority but never raise it again.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from types import FrameType
from typing import Any

from ckpt_callbacks.errors import CheckpointError, CheckpointWriteError

__all__ = ["FLUSH_SIGNALS", "BackgroundWriter", "flush_pending_writes"]

logger = logging.getLogger("ckpt_callbacks")

FLUSH_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


class BackgroundWriter:
    # Niceness added to the writer thread (per thread on Linux); 0: the priority of the process that saves.
    niceness = 0

    def __init__(self, max_in_flight: int = 1) -> None:
        self.max_in_flight = max_in_flight
        self._executor: ThreadPoolExecutor | None = None
        self._stager: ThreadPoolExecutor | None = None
        self._pending: deque[Future[None]] = deque()
        self._staging: Future[None] | None = None
        self._preparing: Future[None] | None = None
        self._raised_early: BaseException | None = None

    @property
    def in_flight(self) -> int:
        return sum(1 for f in self._pending if not f.done())

    def submit(self, job: Callable[[], None], *, after: Future[None] | None = None) -> None:
        """Queue `job` (to start once `after`, a staging copy, succeeded), first re-raising any earlier
        failure and waiting for room."""
        self.raise_first_failure(block_until=self.max_in_flight - 1)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer",
                                                initializer=_lower_priority, initargs=(self.niceness,))
            _flush_at_exit.watch(self)
        self._pending.append(self._executor.submit(_after_staging, after, job))

    def stage_in_background(self, copy: Callable[[], None]) -> Future[None]:
        """Run a staging copy on the staging thread; `wait_for_staging` waits for it."""
        self.wait_for_staging()
        if self._stager is None:
            self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-stager")
        self._staging = self._stager.submit(copy)
        return self._staging

    def prepare_in_background(self, work: Callable[[], None]) -> None:
        """Run `work` (e.g. allocating staging buffers) on the staging thread; only `wait_for_preparation`
        waits for it, so the training step that follows is not held up."""
        if self._stager is None:
            self._stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-stager")
        self._preparing = self._stager.submit(work)

    def wait_for_preparation(self) -> None:
        """Block until the last `prepare_in_background` work is done; a failure there is only logged (the
        save that follows does the work itself)."""
        preparing, self._preparing = self._preparing, None
        error = preparing.exception() if preparing is not None else None
        if error is not None:
            logger.warning("Preparing staging buffers in the background failed (%r); the save allocates them.", error)

    def wait_for_staging(self) -> None:
        """Block until the last background staging copy is done; raise its error."""
        staging, self._staging = self._staging, None
        error = staging.exception() if staging is not None else None
        if error is not None:
            self._raised_early = error  # its write job fails with the same error: report it once
            raise error

    def wait(self) -> None:
        """Block until every queued job finished; raise the first error."""
        staging, self._staging = self._staging, None
        if staging is not None:
            wait_for_futures([staging])  # a failed copy fails its write job, raised just below
        self.raise_first_failure(block_until=0)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for executor in (self._stager, self._executor):
                if executor is not None:
                    executor.shutdown(wait=True)
            self._stager = self._executor = None
            _flush_at_exit.forget(self)

    def flush_quietly(self) -> None:
        """Wait for every pending job without raising; log failures (for exit paths with no caller to raise to)."""
        for future in list(self._pending):
            error = future.exception()
            if error is not None and error is not self._raised_early:
                logger.error("A checkpoint write failed while the process was exiting: %s", error)

    def raise_first_failure(self, block_until: int) -> None:
        first_error: BaseException | None = None
        while self._pending and (len(self._pending) > block_until or self._pending[0].done()):
            future = self._pending.popleft()
            error = future.exception()  # blocks until done
            if error is self._raised_early:
                self._raised_early = None
            elif error is not None and first_error is None:
                first_error = error
        if first_error is not None:
            if isinstance(first_error, CheckpointError):
                raise first_error
            raise CheckpointWriteError(f"A background checkpoint write failed: {first_error!r}") from first_error


def _lower_priority(niceness: int) -> None:
    """Add `niceness` to this thread's nice value (Linux: per thread); nothing when 0 or not permitted."""
    if niceness and hasattr(os, "setpriority"):
        thread = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + niceness)
        except OSError:
            pass  # not permitted: write at the priority of the process


def _after_staging(staging: Future[None] | None, job: Callable[[], None]) -> None:
    if staging is not None:
        staging.result()  # a failed copy fails this checkpoint: nothing of it is written
    job()


class _FlushAtExit:
    """Flushes every live writer at interpreter exit and on otherwise unhandled termination signals."""

    def __init__(self) -> None:
        self._writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()
        self._installed = False
        self._lock = threading.Lock()

    def watch(self, writer: BackgroundWriter) -> None:
        with self._lock:
            self._writers.add(writer)
            if not self._installed:
                self._installed = True
                atexit.register(self.flush_all)
                self._install_signal_handlers()

    def forget(self, writer: BackgroundWriter) -> None:
        with self._lock:
            self._writers.discard(writer)

    def flush_all(self) -> None:
        """Wait for every live writer's pending jobs, logging failures; each is flushed once."""
        with self._lock:
            writers, self._writers = list(self._writers), weakref.WeakSet()
        for writer in writers:
            writer.flush_quietly()

    def _install_signal_handlers(self) -> None:
        # Only where the signal would otherwise kill the process outright: a handler the user or an adapter
        # installed (e.g. the preemption flag) keeps the signal, and flushes through its own clean exit.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in FLUSH_SIGNALS:
            if signal.getsignal(signum) == signal.SIG_DFL:
                signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> Any:
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        logger.warning("Signal %d: finishing %d pending checkpoint write(s) before exiting.", signum,
                       sum(w.in_flight for w in list(self._writers)))
        self.flush_all()
        os.kill(os.getpid(), signum)


_flush_at_exit = _FlushAtExit()


def flush_pending_writes() -> None:
    """Finish every background write of this process (for exit paths that must run after them)."""
    _flush_at_exit.flush_all()
