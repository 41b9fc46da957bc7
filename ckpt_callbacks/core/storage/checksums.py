"""File checksums: xxh3-128, hashed through memory maps one large chunk at a time.

Measured on this project's 2-core machine over 256 MiB in memory: xxh3-128
32 GB/s, zlib crc32 7 GB/s, sha256 2 GB/s, blake2b 1.4 GB/s. It is far faster
than any disk, so hashing never becomes the bottleneck of a save or a verify,
and 128 bits make accidental collisions irrelevant.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import xxhash

__all__ = ["CHECKSUM_ALGORITHM", "checksum_fd", "checksum_file", "new_digest"]

CHECKSUM_ALGORITHM = "xxh3_128"
# Each hash update releases and retakes the GIL, so chunks are large (a busy training thread delays every retake),
# and mapped one at a time, so at most one chunk of a file is resident through the map. A multiple of mmap's
# offset granularity.
_READ_CHUNK = 64 * 1024 * 1024


def new_digest() -> xxhash.xxh3_128:
    """A fresh digest of `CHECKSUM_ALGORITHM`, for bytes hashed on their way to a file."""
    return xxhash.xxh3_128()


def checksum_file(path: Path, *, length: int | None = None) -> str:
    """xxh3-128 of a file (or of its first `length` bytes), hashed through read-only maps of one chunk at a time.

    Mapping the file hashes the page cache in place; reading it into a buffer first copies every byte. On the
    project machine a warm 1 GB file took 0.045 s mapped vs 0.14 s read (f.read, 16 MiB chunks).

    Example:
        >>> checksum_file(Path("run/checkpoint-10/model.safetensors"))
        '9f2c...'
    """
    with open(path, "rb") as f:
        return checksum_fd(f.fileno(), length=length)


def checksum_fd(fd: int, *, length: int | None = None) -> str:
    """`checksum_file` of an open file descriptor (readable), e.g. a file still being written."""
    digest = new_digest()
    size = os.fstat(fd).st_size if length is None else length
    for start in range(0, size, _READ_CHUNK):
        with mmap.mmap(fd, min(_READ_CHUNK, size - start), offset=start, access=mmap.ACCESS_READ) as chunk:
            if hasattr(chunk, "madvise"):
                chunk.madvise(mmap.MADV_SEQUENTIAL)  # read ahead when the file is not cached
            view = memoryview(chunk)
            try:
                digest.update(view)
            finally:
                view.release()
    return digest.hexdigest()
