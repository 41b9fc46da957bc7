"""Sequential file writes that bypass the page cache (`O_DIRECT`), hashing the bytes on their way out.

Why: a buffered write allocates page-cache memory for every byte and leaves the
kernel to write it back; on the project machine (a Firecracker VM, whose freed
memory is handed back to the host) writing 1.5 GB and fsyncing it took 0.6-4.6 s
and up to 4.2 s of CPU, varying with how recently that memory had been used,
while the same bytes written with `O_DIRECT` from an aligned buffer took
0.5-0.9 s and 0.16 s of CPU (`dd ... conv=fsync` against `oflag=direct`, and
`benchmarks/disk.py`). The CPU matters more than the seconds: a background
write competes with training for the same cores. No library does this for
torch checkpoints (DataStates-LLM and FastPersist do it in C++), so it is done
here: bytes are copied (GIL released) into a page-aligned bounce buffer, hashed,
and written in large aligned chunks; the last chunk is padded to the alignment
and the file truncated to its true size.

Where `O_DIRECT` is missing (macOS) or refused (some file systems), or a write
is refused for its alignment, the file is written through the page cache
instead; the bytes and the checksum are the same either way.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ckpt_callbacks.core.storage.checksums import new_digest

__all__ = ["ALIGNMENT", "CHUNK_BYTES", "ENABLED", "DirectFile"]

# Module default, read at each file open: False writes every file through the page cache.
ENABLED = True
ALIGNMENT = 4096  # a multiple of every logical block size in use (512, 4096)
CHUNK_BYTES = 64 * 1024 * 1024  # bytes per write call: few GIL round trips, large requests

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_pool = threading.local()  # one bounce buffer per writing thread, reused from file to file


def _take_bounce_buffer() -> mmap.mmap:
    """This thread's bounce buffer, or a new one while it is in use (two files open at once)."""
    buffer = getattr(_pool, "buffer", None)
    if buffer is None or getattr(_pool, "busy", False):
        fresh = mmap.mmap(-1, CHUNK_BYTES)  # anonymous maps are page-aligned
        if buffer is not None:
            return fresh
        _pool.buffer = buffer = fresh
    _pool.busy = True
    return buffer


def _give_back_bounce_buffer(buffer: mmap.mmap) -> None:
    if getattr(_pool, "buffer", None) is buffer:
        _pool.busy = False


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


class DirectFile:
    """A new file at `path`, written sequentially with `write`, hashed with xxh3-128 as the manifest is.

    Example:
        >>> with DirectFile(Path("piece.bin")) as f:
        ...     f.write(memoryview(array))
        >>> f.hexdigest()
    """

    def __init__(self, path: Path, *, hashing: bool = True) -> None:
        self.path = path
        self._direct = ENABLED and _O_DIRECT != 0
        self._fd = self._open()
        self._digest = new_digest() if hashing else None
        self._size = 0
        # Every write goes through the bounce buffer, direct or not: small writes (torch.save's pickle
        # records) are gathered into large ones either way.
        self._filled = 0  # bytes waiting in the bounce buffer
        self._bounce = _take_bounce_buffer()
        self._view = memoryview(self._bounce)
        self._base = _address(self._view)

    def _open(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_BINARY", 0)
        if self._direct:
            try:
                return os.open(self.path, flags | _O_DIRECT, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._direct = False  # the file system refuses O_DIRECT
        return os.open(self.path, flags, 0o666)

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._digest is not None:
            self._digest.update(view)
        self._size += len(view)
        source, position = _address(view) if len(view) else 0, 0
        while position < len(view):
            count = min(CHUNK_BYTES - self._filled, len(view) - position)
            ctypes.memmove(self._base + self._filled, source + position, count)  # releases the GIL
            self._filled += count
            position += count
            if self._filled == CHUNK_BYTES:
                self._write_bounce(CHUNK_BYTES)
        return len(view)

    def _write_bounce(self, length: int) -> None:
        """Write the first `length` bytes of the bounce buffer (a multiple of the alignment) and empty it."""
        try:
            _write_fully(self._fd, self._view[:length])
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            self._fall_back_to_buffered(length)
        self._filled = 0

    def _fall_back_to_buffered(self, length: int) -> None:
        """The device refused the alignment: write on through the page cache from where the file ends."""
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_O_DIRECT)
        self._direct = False
        _write_fully(self._fd, self._view[:length])

    def flush(self) -> None:
        """Nothing to do: bytes in the bounce buffer are written by `close` (padding needs the end)."""

    def fileno(self) -> int:
        return self._fd

    def tell(self) -> int:
        return self._size

    def hexdigest(self) -> str:
        assert self._digest is not None, "opened with hashing=False"
        return self._digest.hexdigest()

    def close(self, *, fsync: bool = False) -> None:
        """Write what is left (padded to the alignment, then truncated to the true size) and close."""
        if self._fd < 0:
            return
        try:
            if self._filled and self._direct:
                padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
                self._view[self._filled:padded] = bytes(padded - self._filled)
                self._write_bounce(padded)
                os.ftruncate(self._fd, self._size)
            elif self._filled:  # through the page cache (from the start, or since a fallback): no padding
                _write_fully(self._fd, self._view[:self._filled])
            if fsync:
                os.fsync(self._fd)
        finally:
            self._release()

    def abandon(self) -> None:
        """Close without writing what is left (after an error)."""
        if self._fd >= 0:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, -1
        self._view.release()
        _give_back_bounce_buffer(self._bounce)
        os.close(fd)

    def __enter__(self) -> DirectFile:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def _write_fully(fd: int, view: memoryview) -> None:
    while len(view):
        written = os.write(fd, view)
        view = view[written:]
