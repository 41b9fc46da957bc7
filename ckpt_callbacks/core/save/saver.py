"""How a committed transaction reaches the disk: inline, or staged into host buffers and written in the background.

`Saver` owns the background writer and the host stagers (one per save allowed
in flight). Synchronous saves run the commit job inline. Asynchronous ones
snapshot every piece into reused host buffers (now, or, with deferred staging,
on the staging thread during the next forward/backward) and queue the commit
job behind that copy. A background failure is re-raised at the next save, at
`wait()` and at `close()` (logged instead with `on_save_error="warn"`).

Every second the training loop spends waiting on checkpointing is counted in
`SaveStats.blocking_seconds`: the wait for a free write slot and for the
previous deferred copy at `begin`, the snapshot itself, a later
`wait_for_staging()` before the optimizer step, and a `wait()` / `close()`
while the save is still in flight (the end of training).

Fresh host memory costs its page faults when first written (256 MB: 0.15-0.22
s into fresh memory, 0.04-0.07 s into buffers in use, on the project machine), so the
buffers are reserved ahead, in the background, whenever the shapes of the next
snapshot are known before it: `prepare` (the HF callback after the first
optimizer step, or `CheckpointManager.prepare_staging`), a state restored by a
load (`expect`, then `start_expected` once training runs: an evaluation script
that only loads reserves nothing), and, with `max_in_flight > 1`, the next
stager's buffers after each save that found it empty (each stager would
otherwise pay the faults once, save after save).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.core.save.commit import CommitResult
from ckpt_callbacks.core.save.staging import HostStager, StagingPlan, describe, storage_address
from ckpt_callbacks.core.save.writer import BackgroundWriter
from ckpt_callbacks.errors import CheckpointError

if TYPE_CHECKING:
    import torch

__all__ = ["SaveStats", "Saver"]

logger = logging.getLogger("ckpt_callbacks")


@dataclass
class SaveStats:
    """What one save cost: seconds training waited for it, seconds until durable (None while in flight), size."""

    step: int
    blocking_seconds: float
    total_seconds: float | None = None
    bytes_written: int = 0


class Saver:
    # False: staging buffers are allocated by the save that needs them (or by an explicit `prepare`), never
    # reserved ahead on their own (after a load, or for the next stager): less memory held between saves.
    reserve_ahead = True

    def __init__(self, *, async_save: bool, max_in_flight: int = 1, on_save_error: str = "raise") -> None:
        self.async_save = async_save
        self.on_save_error = on_save_error
        self.last_save: SaveStats | None = None
        self._writer = BackgroundWriter(max_in_flight)
        self._stagers = [HostStager() for _ in range(max_in_flight)]
        self._deferred: list[StagingPlan] = []
        self._saves = 0
        self._expected: dict[str, Any] | None = None  # described pieces of a restored state, to reserve for
        self._described: dict[str, Any] = {}  # this save's pieces, described for the next (empty) stager

    @property
    def is_saving(self) -> bool:
        return self._writer.in_flight > 0

    def make_room(self) -> None:
        """Before a new snapshot: surface earlier background failures and wait for a free staging buffer."""
        self._writer.wait_for_preparation()
        self.report_failures(self._writer.wait_for_staging)
        self.report_failures(lambda: self._writer.raise_first_failure(block_until=self._writer.max_in_flight - 1))

    def snapshot(self, value: Any, relpath: str, *, defer: bool, copy_now: frozenset[int]) -> Any:
        """The value to hand the writer for a piece: the live value (sync), or its host snapshot."""
        if not self.async_save:
            return value
        self._expected = None  # this save allocates what it needs itself
        stager = self._stagers[self._saves % len(self._stagers)]
        following = self._stagers[(self._saves + 1) % len(self._stagers)]
        if self.reserve_ahead and following is not stager and not following.has_buffers:
            self._described[relpath] = describe(value)
        if not defer:
            return stager.stage(value, prefix=(relpath,))
        plan = stager.plan(value, prefix=(relpath,), defer=True, copy_now=copy_now)
        self._deferred.append(plan)  # copied in the background once the transaction commits
        return plan.staged

    def discard_snapshots(self) -> None:
        self._deferred = []
        self._described = {}

    def submit(self, step: int, job: Callable[[], CommitResult], *, started: float) -> SaveStats:
        """Run `job` (the commit) inline, or queue it behind the deferred copies; returns the save's stats, whose
        `total_seconds` and `bytes_written` are filled in when the checkpoint is durable."""
        stats = SaveStats(step=step, blocking_seconds=0.0)
        self.last_save = stats
        if self.async_save:
            self._stagers[self._saves % len(self._stagers)].release_unused_reservations()
        self._saves += 1
        if self.async_save:
            plans, self._deferred = self._deferred, []
            staging = self._writer.stage_in_background(partial(_run_plans, plans)) if plans else None
            self._writer.submit(partial(_record, job, stats), after=staging)
            described, self._described = self._described, {}
            if described:
                self.prepare(described)  # the next save's stager, still empty
        else:
            self.report_failures(partial(_record, job, stats))
        stats.blocking_seconds = time.perf_counter() - started
        return stats

    def run_inline(self, step: int, job: Callable[[], CommitResult], *, started: float) -> SaveStats:
        """Run `job` on the caller's thread whatever `async_save` says (its files are written from live state)."""
        stats = SaveStats(step=step, blocking_seconds=0.0)
        self.last_save = stats
        self.report_failures(partial(_record, job, stats))
        stats.blocking_seconds = time.perf_counter() - started
        return stats

    def prepare(self, pieces: Mapping[str, Any]) -> None:
        """Allocate, in the background, the host buffers the next async save of `pieces` (live state, or its
        `describe(...)`) will copy into."""
        if not self.async_save:
            return
        stager = self._next_stager()

        def reserve() -> None:
            reserved = sum(stager.reserve(value, prefix=(relpath,)) for relpath, value in pieces.items())
            logger.debug("Reserved %.2f GB of staging buffers.", reserved / 1e9)

        self._writer.prepare_in_background(reserve)

    def expect(self, pieces: Mapping[str, Any]) -> None:
        """Remember the shapes of `pieces` (a state just restored, which the run will save again): the next
        `start_expected` reserves their buffers. Holds no memory and no reference to the tensors."""
        if self.async_save and self.reserve_ahead:
            try:
                self._expected = {relpath: describe(value) for relpath, value in pieces.items()}
            except (RuntimeError, TypeError) as exc:  # a tensor type without a meta twin: the save allocates
                logger.debug("Cannot describe the restored state for staging ahead: %r", exc)

    def start_expected(self) -> None:
        """Training runs: reserve, in the background, what the last `expect` described (once)."""
        expected, self._expected = self._expected, None
        if expected:
            self.prepare(expected)

    def _next_stager(self) -> HostStager:
        return self._stagers[self._saves % len(self._stagers)]

    def wait_for_staging(self) -> None:
        """Block until the deferred host copy is complete (counted as time the last save blocked training)."""
        started = time.perf_counter()
        try:
            self.report_failures(self._writer.wait_for_staging)
        finally:
            if self.last_save is not None:
                self.last_save.blocking_seconds += time.perf_counter() - started

    def wait(self) -> None:
        """Block until every queued save is durable; the time is counted as the last save's if it was in flight."""
        self._counted_as_blocking(partial(self.report_failures, self._writer.wait))

    def close(self) -> None:
        self._counted_as_blocking(partial(self.report_failures, self._writer.close))

    def _counted_as_blocking(self, operation: Callable[[], None]) -> None:
        stats = self.last_save
        in_flight = stats is not None and stats.total_seconds is None
        started = time.perf_counter()
        try:
            operation()
        finally:
            if in_flight:
                assert stats is not None
                waited = stats.blocking_seconds + time.perf_counter() - started
                # The wait ends once the save is durable, a thread wake-up later: never more than the save took.
                stats.blocking_seconds = waited if stats.total_seconds is None else min(waited, stats.total_seconds)

    def report_failures(self, operation: Callable[[], None]) -> None:
        try:
            operation()
        except CheckpointError as exc:
            if self.on_save_error != "warn":
                raise
            logger.error("A checkpoint save failed; training goes on (on_save_error='warn'): %s", exc)


def copy_now_addresses(tensors: Iterable[torch.Tensor]) -> frozenset[int]:
    return frozenset(storage_address(t) for t in tensors)


def _run_plans(plans: list[StagingPlan]) -> None:
    for plan in plans:
        plan.run()


def _record(job: Callable[[], CommitResult], stats: SaveStats) -> None:
    result = job()
    stats.bytes_written = result.bytes_written
    stats.total_seconds = result.seconds
