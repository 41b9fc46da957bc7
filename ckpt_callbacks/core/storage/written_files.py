"""Checksums computed while files are written, so sealing a checkpoint never reads it back.

The core opens a `WrittenFiles` ledger around an engine's writes (`recording`).
Files written through `open_for_writing` and `write_buffers` (the safetensors
writer) feed each byte to xxh3-128 on its way to the file, written with
`O_DIRECT` where the file system takes it (`direct_io`); both record size and
digest. (With `direct_io.ENABLED = False`, `write_buffers` writes through the
page cache, from several threads, and hashes the file from the page cache.)
`manifest.describe_files` then takes the recorded checksum of every file
still unchanged since (same size and mtime) and reads back only the others:
files a user's engine or `torch.save` wrote their own way. The engine seam
stays as it is; an engine gets the fast path by writing through
`open_for_writing`, and correct checksums either way.

Why: reading a 1.49 GB checkpoint back from the page cache to hash it took
0.3-0.9 s per save on the project machine (2 cores), while hashing the bytes on
their way out costs ~0.05 s (xxh3 runs at ~30 GB/s and releases the GIL).

Why `write_buffers` gathers many buffers per system call: every call that
releases the GIL (a write, a hash update, most torch ops) costs a background
thread up to one switch interval (5 ms) to get the GIL back while training
holds it (`Tensor.detach()` measured 1.3 ms per call next to a GIL-bound loop),
so the writer makes a handful of such calls per file, not several per tensor.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from ckpt_callbacks.core.storage import direct_io
from ckpt_callbacks.core.storage.checksums import checksum_file
from ckpt_callbacks.core.storage.direct_io import DirectFile

__all__ = ["WrittenFiles", "open_for_writing", "recording", "write_buffers"]

# Linux transfers at most 0x7ffff000 bytes per write call: batches stay below that.
_MAX_BATCH_BYTES = 1 << 30
_MAX_BATCH_BUFFERS = 1024  # IOV_MAX on Linux and macOS


@dataclass(frozen=True)
class _Written:
    size: int
    mtime_ns: int
    checksum: str


class WrittenFiles:
    """Checksums of the files written through `open_for_writing` while this ledger was recording."""

    def __init__(self) -> None:
        self._files: dict[str, _Written] = {}
        self._lock = threading.Lock()  # engines may write pieces from several threads

    def record(self, path: Path, checksum: str) -> None:
        stat = os.stat(path)
        with self._lock:
            self._files[os.path.abspath(path)] = _Written(stat.st_size, stat.st_mtime_ns, checksum)

    def checksum_of(self, path: Path, stat: os.stat_result) -> str | None:
        """The recorded checksum, if the file still has the size and mtime it had when it was closed
        (the `known_checksum` of `manifest.describe_files`)."""
        with self._lock:
            written = self._files.get(os.path.abspath(path))
        if written is None or written.size != stat.st_size or written.mtime_ns != stat.st_mtime_ns:
            return None
        return written.checksum

    def __len__(self) -> int:
        return len(self._files)


_ACTIVE: ContextVar[WrittenFiles | None] = ContextVar("ckpt_callbacks_written_files", default=None)


@contextmanager
def recording(ledger: WrittenFiles) -> Iterator[WrittenFiles]:
    """Record the files written through `open_for_writing` in this thread (and context) into `ledger`."""
    token = _ACTIVE.set(ledger)
    try:
        yield ledger
    finally:
        _ACTIVE.reset(token)


@contextmanager
def open_for_writing(path: Path, *, fsync: bool = False) -> Iterator[BinaryIO]:
    """Open `path` for writing; when a ledger is recording, its checksum is recorded as the file closes.

    Only sequential `write` calls are supported (no seeking), so the digest is that of the file.

    Example:
        >>> with open_for_writing(Path("piece.bin")) as f:
        ...     f.write(b"bytes")
    """
    ledger = _ACTIVE.get()
    handle = DirectFile(path, hashing=ledger is not None)
    try:
        yield cast(BinaryIO, handle)  # a write-only binary file, which is what torch.save and the writers need
    except BaseException:
        handle.abandon()
        raise
    handle.close(fsync=fsync)
    if ledger is not None:
        ledger.record(path, handle.hexdigest())



def write_buffers(path: Path, buffers: Iterable[Any], *, fsync: bool = False, threads: int = 1) -> None:
    """Write `buffers` (bytes-like, in order) to a new file at `path` in as few system calls as possible;
    when a ledger is recording, record the file's checksum.

    With `direct_io.ENABLED` (the default) the file is written by `direct_io.DirectFile` and hashed on the
    way out. Otherwise through the page cache, hashed from it afterwards; there `threads > 1` writes that
    many contiguous parts of the file at once (positioned writes), for storage that needs several requests
    in flight to reach its bandwidth (NVMe arrays, network file systems).

    Example:
        >>> write_buffers(Path("piece.bin"), [b"header", memoryview(array)])
    """
    views = [memoryview(b).cast("B") for b in buffers]
    if direct_io.ENABLED:
        with open_for_writing(path, fsync=fsync) as f:  # O_DIRECT where possible, hashed on the way out
            for view in views:
                f.write(view)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if threads > 1 and hasattr(os, "pwritev"):
            _write_in_parallel(fd, views, threads)
        else:
            for batch in _batches(views):
                _write_all(fd, batch)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    ledger = _ACTIVE.get()
    if ledger is not None:
        ledger.record(path, checksum_file(path))


def _batches(views: list[memoryview]) -> Iterator[list[memoryview]]:
    """Consecutive groups of the views (large ones split), each within the limits of one write call."""
    batch: list[memoryview] = []
    size = 0
    for whole in views:
        for start in range(0, len(whole), _MAX_BATCH_BYTES):
            view = whole[start:start + _MAX_BATCH_BYTES]
            if batch and (size + len(view) > _MAX_BATCH_BYTES or len(batch) == _MAX_BATCH_BUFFERS):
                yield batch
                batch, size = [], 0
            batch.append(view)
            size += len(view)
    if batch:
        yield batch


def _write_all(fd: int, views: list[memoryview], position: int | None = None) -> int:
    """Write every view, at the file position or (positioned writes) from `position` on, resuming after short
    writes. Returns the position after the last byte."""
    writev = getattr(os, "writev", None)
    first = 0
    while first < len(views):
        if position is not None:
            written = os.pwritev(fd, views[first:], position)
            position += written
        else:
            written = writev(fd, views[first:]) if writev is not None else os.write(fd, views[first])
        while first < len(views) and written >= len(views[first]):
            written -= len(views[first])
            first += 1
        if written:
            views[first] = views[first][written:]
    return position or 0


def _write_in_parallel(fd: int, views: list[memoryview], threads: int) -> None:
    """Split the file into `threads` parts of about equal size at buffer boundaries; write each from its own
    thread with positioned writes. Sequential when no thread can be started (at interpreter exit)."""
    total = sum(len(v) for v in views)
    parts: list[tuple[int, list[memoryview]]] = [(0, [])]
    offset = 0
    for view in views:
        if parts[-1][1] and offset >= total * len(parts) / threads:
            parts.append((offset, []))
        parts[-1][1].append(view)
        offset += len(view)
    errors: list[BaseException] = []
    workers: list[threading.Thread] = []
    here = parts[:1]
    for index, (start, part) in enumerate(parts[1:], start=1):
        worker = threading.Thread(target=_pwrite_part, args=(fd, start, part, errors), name="ckpt-write-part")
        try:
            worker.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown": write the rest here
            here += parts[index:]
            break
        workers.append(worker)
    for start, part in here:
        _pwrite_part(fd, start, part, errors)
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]


def _pwrite_part(fd: int, start: int, views: list[memoryview], errors: list[BaseException]) -> None:
    try:
        _pwrite_all(fd, start, views)
    except BaseException as exc:  # raised again by the thread that started the part
        errors.append(exc)


def _pwrite_all(fd: int, start: int, views: list[memoryview]) -> None:
    position = start
    for batch in _batches(views):
        position = _write_all(fd, batch, position)
