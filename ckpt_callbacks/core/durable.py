"""Durable local file operations: fsync of files and folders, atomic renames, safe deletion.

These are the only primitives the commit protocol needs from a POSIX file system:
data reaches the disk (`fsync_file`), a folder's entries reach the disk
(`fsync_dir`), and a rename within one file system is atomic (`os.replace`).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


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
