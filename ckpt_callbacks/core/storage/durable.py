"""Durable local file operations: fsync of files and folders, atomic renames, safe deletion.

These are the only primitives the commit protocol needs from a POSIX file system:
data reaches the disk (`fsync_file`), a folder's entries reach the disk
(`fsync_dir`), and a rename within one file system is atomic (`os.replace`).
Where the OS offers it (Linux), two names are also swapped atomically
(`exchange_paths`), so replacing a folder never leaves an instant without it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import uuid
from functools import cache
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    """Flush one file's data to the device. A read-only descriptor suffices on Linux."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed) to the device."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows cannot open folders; rename durability is then the OS's business
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, folders after their contents."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# The OS or the file system cannot exchange (ENOSYS: old kernel; EINVAL/ENOTSUP: e.g. NFS, some FUSE mounts).
_EXCHANGE_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV}


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing entries of one file system in a single atomic step (`renameat2(RENAME_EXCHANGE)`).

    Returns False, with nothing changed, where the OS or the file system cannot; raises other OS errors.

    Example:
        >>> exchange_paths(Path("run/.staging-checkpoint-5-1a2b3c4d"), Path("run/checkpoint-5"))
        True
    """
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in _EXCHANGE_UNSUPPORTED:
        return False
    raise OSError(error, os.strerror(error), str(a), None, str(b))


@cache
def _renameat2() -> Any:
    """libc's `renameat2` (glibc >= 2.28), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary sibling and a rename, fsyncing both.

    Example:
        >>> write_bytes_durably(Path("run/manifest.json"), b"{}")
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def remove_tree_quietly(path: Path) -> None:
    """Delete a folder that is already invisible to readers (a trash or staging name)."""
    shutil.rmtree(path, ignore_errors=True)
