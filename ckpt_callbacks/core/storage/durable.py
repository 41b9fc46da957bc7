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
import logging
import os
import shutil
import sys
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import IO, Any

from ckpt_callbacks.core.format import layout

__all__ = [
    "delete_tree",
    "exchange_paths",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "move_entries_up",
    "remove_leftover",
    "remove_stale_leftovers",
    "remove_tree_quietly",
    "replace_folder",
    "unlink_quietly",
    "write_bytes_durably",
    "write_file_atomically",
]

logger = logging.getLogger("ckpt_callbacks")


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


def write_file_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create or replace the file `path` with what `write(f)` writes, so readers see the old file or the whole new
    one: written under a staging name in the same folder (same file system, so the rename is atomic), fsynced,
    renamed over `path`, and the folder fsynced. On any error the staging file is removed and `path` is untouched.

    Example:
        >>> write_file_atomically(Path("run/last.ckpt"), lambda f: torch.save(state, f))
    """
    staging = path.with_name(layout.staging_file_name())
    try:
        with open(staging, "w+b") as f:  # readable too: a writer may append to what it wrote (a zip record)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        unlink_quietly(staging)
        raise
    fsync_dir(path.parent)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """`write_file_atomically` with the bytes `data`.

    Example:
        >>> write_bytes_durably(Path("run/manifest.json"), b"{}")
    """
    write_file_atomically(path, lambda f: f.write(data))


def replace_folder(staging: Path, target: Path) -> Path | None:
    """Put the complete folder `staging` in place of `target` (which may not exist), atomically for readers.

    Returns the hidden name the old `target` now has (to delete), or None when there was none. Where two names can
    be exchanged atomically (Linux), `target` exists at every instant; elsewhere the old folder is moved aside first,
    and a crash between the two renames leaves the old one under its trash name. The caller decides whether
    `target` may be replaced at all: this function replaces whatever is there.
    """
    if not target.exists():
        os.replace(staging, target)
        fsync_dir(target.parent)
        return None
    if exchange_paths(staging, target):
        fsync_dir(target.parent)
        return staging
    trash = target.with_name(layout.trash_name(target.name))
    os.replace(target, trash)
    os.replace(staging, target)
    fsync_dir(target.parent)
    return trash


def move_entries_up(folder: Path) -> None:
    """Move every entry of `folder` into its parent and remove the emptied `folder`: for a framework saver that
    writes its own `checkpoint-{step}/` inside the staging folder it was given (both hidden, both the library's).

    Never overwrites: an entry whose name the parent already has, or a `folder` that is a link (its entries would
    be someone else's), raises `FileExistsError` / `NotADirectoryError` before anything moves."""
    if folder.is_symlink() or not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder the framework saver wrote (a link or a file); nothing moved")
    entries = os.listdir(folder)
    taken = [entry for entry in entries if os.path.lexists(folder.parent / entry)]
    if taken:
        raise FileExistsError(f"{folder.parent} already holds {taken}; nothing moved out of {folder.name}")
    for entry in entries:
        os.rename(folder / entry, folder.parent / entry)
    os.rmdir(folder)


def delete_tree(path: Path) -> None:
    """Delete a folder that is already invisible to readers (a trash or staging name); raise the first OS error,
    leaving what could not be deleted under its hidden name (the next writer retries)."""
    shutil.rmtree(path)


def remove_tree_quietly(path: Path) -> None:
    """`delete_tree` that ignores errors, for cleanup after another failure (that failure is the one to report)."""
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_leftovers(folder: Path, *, final_name: str | None = None) -> list[str]:
    """Remove what writers that died on this host left in `folder` (staging files and folders, trash), by the
    names `layout` gives them; `final_name` limits it to the leftovers of that one target. For folders without a
    writer lock (single files beside a stock `ModelCheckpoint`, an export's parent folder): a leftover of a live
    process, or of another host, is left alone. Returns the names removed; a failure is logged, not raised."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    prefixes = (f"{layout.STAGING_PREFIX}{final_name}-", f"{layout.TRASH_PREFIX}{final_name}-") if final_name else ("",)
    stale = [name for name in names if layout.is_stale_leftover(name) and name.startswith(prefixes)]
    return [name for name in stale if remove_leftover(folder / name)]


def remove_leftover(path: Path) -> bool:
    """Delete a leftover of an interrupted writer (a staging or trash file or folder); log a failure (the next
    writer retries) and return whether it is gone."""
    try:
        if path.is_dir() and not path.is_symlink():
            delete_tree(path)
        else:
            path.unlink()
    except OSError as exc:
        logger.error("Could not remove %s, left by an interrupted write (%s); the next writer retries. Check the "
                     "folder's permissions.", path, exc)
        return False
    return True


def unlink_quietly(path: Path) -> None:
    """Remove a staging file after a failed write; a missing file or an error is not worth reporting."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass
