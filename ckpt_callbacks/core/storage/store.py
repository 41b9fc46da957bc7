"""Where committed checkpoints live, and how a staged checkpoint becomes visible.

`LocalStore` stages inside the run folder (same file system) and publishes with
one atomic rename after fsyncing every file and folder. A store without atomic
rename (object stores, see `remote_store.py`) publishes by uploading every file
and the manifest last: readers trust only manifest-complete checkpoints, so
the effect is the same.
"""

from __future__ import annotations

import errno
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.manifest import Manifest, find_problems
from ckpt_callbacks.core.storage.durable import exchange_paths, fsync_dir, fsync_tree, remove_tree_quietly
from ckpt_callbacks.errors import CheckpointError, CheckpointWriteError


class CheckpointStore(ABC):
    """The storage seam: list, read manifests, stage, publish, delete."""

    root: str

    @abstractmethod
    def list_names(self) -> list[str]:
        """Names of the entries directly under the root."""

    @abstractmethod
    def read_manifest(self, name: str) -> bytes | None:
        """The manifest bytes of checkpoint `name`, or None when it has none (not committed)."""

    @abstractmethod
    def new_staging_dir(self, step: int) -> Path:
        """A fresh local folder to write checkpoint `step` into."""

    @abstractmethod
    def publish(self, staging_dir: Path, name: str) -> None:
        """Make the staged folder (manifest included) visible as checkpoint `name`, atomically for readers."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove checkpoint `name` so that no reader sees it half-deleted."""

    @abstractmethod
    def local_dir(self, name: str) -> Path:
        """A local folder holding checkpoint `name`'s files (downloaded first for remote stores)."""

    @abstractmethod
    def sizes_match(self, name: str, manifest: Manifest) -> bool:
        """Whether every file the manifest lists exists with its recorded size (cheap: no reading)."""

    def clean_leftovers(self) -> list[str]:
        """Delete staging and trash folders of earlier, interrupted writers; return their names."""
        return []

    def check_free_space(self, needed_bytes: int) -> None:
        """Fail early, before writing anything, when the next checkpoint cannot fit."""

    def acquire_writer_lock(self) -> None:
        """Fail when another process is writing checkpoints to the same root."""

    def release_writer_lock(self) -> None:
        """Let another writer in."""


class LocalStore(CheckpointStore):
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.path = Path(root)
        self.root = str(self.path)
        self._lock_file: IO[Any] | None = None

    def list_names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []

    def read_manifest(self, name: str) -> bytes | None:
        try:
            return (self.path / name / layout.MANIFEST_NAME).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def new_staging_dir(self, step: int) -> Path:
        staging = self.path / layout.staging_name(step)
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise _write_error(exc, staging, "create the staging folder") from exc
        return staging

    def publish(self, staging_dir: Path, name: str) -> None:
        target = self.path / name
        retired = None
        try:
            fsync_tree(staging_dir)
            if target.exists():
                retired = self._replace_checkpoint(staging_dir, target)
            else:
                os.replace(staging_dir, target)
            fsync_dir(self.path)
        except OSError as exc:
            raise _write_error(exc, target, "commit the checkpoint") from exc
        if retired is not None:
            remove_tree_quietly(retired)

    def _replace_checkpoint(self, staging_dir: Path, target: Path) -> Path:
        """Re-saving a step (e.g. a run restarted in its old output_dir): put the new folder in place of the old
        one; returns the hidden name the old one now has. Where two names can be exchanged atomically (Linux),
        `target` exists at every instant; elsewhere the old folder is moved aside first, and a crash between
        the two renames loses both."""
        if exchange_paths(staging_dir, target):
            return staging_dir
        trash = self.path / layout.trash_name(target.name)
        os.replace(target, trash)
        os.replace(staging_dir, target)
        return trash

    def delete(self, name: str) -> None:
        # Rename first: the checkpoint disappears atomically, then the files go.
        trash = self.path / layout.trash_name(name)
        os.replace(self.path / name, trash)
        fsync_dir(self.path)
        remove_tree_quietly(trash)

    def local_dir(self, name: str) -> Path:
        return self.path / name

    def sizes_match(self, name: str, manifest: Manifest) -> bool:
        return not find_problems(self.path / name, manifest, "size")

    def clean_leftovers(self) -> list[str]:
        removed = [name for name in self.list_names() if layout.is_leftover(name) and (self.path / name).is_dir()]
        for name in removed:
            remove_tree_quietly(self.path / name)
        return removed

    def check_free_space(self, needed_bytes: int) -> None:
        free = shutil.disk_usage(self.path).free
        if needed_bytes and free < needed_bytes:
            raise CheckpointWriteError(
                f"Not enough free space in {self.path} for the next checkpoint: about {needed_bytes / 1e6:.1f} MB "
                f"needed (the size of the last one), {free / 1e6:.1f} MB free. Free disk space, lower "
                "save_total_limit, or point output_dir at a larger disk. Earlier checkpoints are untouched.",
                path=str(self.path),
            )

    def acquire_writer_lock(self) -> None:
        if self._lock_file is not None:
            return
        import fcntl

        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.path / layout.LOCK_NAME, "a+")
        except OSError as exc:
            raise _write_error(exc, self.path, "open the output folder") from exc
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise CheckpointError(
                f"{self.path}: another process is writing checkpoints here (lock {layout.LOCK_NAME} is held). "
                "Two runs must not share an output_dir: give this run its own, or stop the other one.",
                path=str(self.path),
            ) from None
        self._lock_file = lock_file

    def release_writer_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None


def _write_error(exc: OSError, path: Path, action: str) -> CheckpointWriteError:
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = {
        errno.ENOSPC: "Free disk space or point output_dir at a larger disk.",
        errno.EDQUOT: "Free disk space or raise your quota.",
        errno.EACCES: "Make the folder writable or choose another output_dir.",
        errno.EPERM: "Make the folder writable or choose another output_dir.",
        errno.EROFS: "The file system is read-only: choose another output_dir.",
    }.get(exc.errno or 0, "Check the disk and the folder's permissions.")
    return CheckpointWriteError(
        f"Could not {action} at {path}: {cause}. {hint} Earlier checkpoints are untouched.", path=str(path)
    )


def write_error(exc: OSError, path: Path, action: str) -> CheckpointWriteError:
    """The user-facing error for an OS failure while writing `path`."""
    return _write_error(exc, path, action)
