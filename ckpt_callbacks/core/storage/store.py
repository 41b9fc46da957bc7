"""Where committed checkpoints live, and how a staged checkpoint becomes visible.

`LocalStore` stages inside the run folder (same file system) and publishes with
one atomic rename after fsyncing every file and folder. A store without atomic
rename (object stores, see `remote.py`) publishes by uploading every file and
the manifest last: readers trust only manifest-complete checkpoints, so the
effect is the same.

Deleting is rename-then-remove: a checkpoint vanishes for readers in one
rename to a hidden trash name, then its files go. A trash folder that could not
be removed (a permission problem, a busy file system) stays under its hidden
name, is logged, reported by `ckpt-callbacks list`/`verify`, and retried by the
next writer. Nothing outside the store's own names (`checkpoint-{step}`, the
staging and trash names, the lock) is ever deleted or renamed here.
"""

from __future__ import annotations

import logging
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO, Any

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.manifest import Manifest, read_manifest_bytes
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.storage.durable import (
    delete_tree,
    fsync_dir,
    fsync_tree,
    remove_leftover,
    replace_folder,
)
from ckpt_callbacks.core.storage.errors import write_error
from ckpt_callbacks.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)

__all__ = ["CheckpointStore", "LocalStore", "make_store"]

logger = logging.getLogger("ckpt_callbacks")


class CheckpointStore(ABC):
    """The storage seam: list, read manifests, stage, publish, delete."""

    root: str

    @abstractmethod
    def list_names(self) -> list[str]:
        """Names of the entries directly under the root."""

    @abstractmethod
    def read_manifest(self, name: str) -> bytes | None:
        """The manifest bytes of checkpoint `name`, or None when it has none (not committed). Bounded by
        `MAX_MANIFEST_BYTES`: a larger one is returned cut there, which parsing then refuses."""

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
    def size_problems(self, name: str, manifest: Manifest) -> list[CheckpointCorruptError]:
        """Files the manifest lists that are missing or of the wrong size (cheap: nothing is read)."""

    def location(self, name: str) -> str:
        """Where checkpoint `name` is, as users see it (a local path, or a URL)."""
        return f"{self.root.rstrip('/')}/{name}"

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
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            raise CheckpointError(f"{self.path}: cannot list the run folder ({os.strerror(exc.errno or 0)}). "
                                  "Make it readable, or check the path.", path=self.root) from None

    def read_manifest(self, name: str) -> bytes | None:
        try:
            return read_manifest_bytes(self.path / name / layout.MANIFEST_NAME)
        except CheckpointNotFoundError:
            return None

    def location(self, name: str) -> str:
        return str(self.path / name)

    def new_staging_dir(self, step: int) -> Path:
        staging = self.path / layout.staging_name(step)
        try:
            staging.mkdir(parents=True)
        except OSError as exc:
            raise write_error(exc, staging, "create the staging folder") from exc
        return staging

    def publish(self, staging_dir: Path, name: str) -> None:
        target = self.path / name
        if (target.exists() or target.is_symlink()) and not (target / layout.MANIFEST_NAME).is_file():
            raise CheckpointWriteError(
                f"{target} exists and was not written by ckpt_callbacks (no {layout.MANIFEST_NAME}); it is left as it "
                "is and this checkpoint is not saved. Move it away, or give the run another output_dir.",
                path=str(target))
        try:
            fsync_tree(staging_dir)
            # Re-saving a step (a run restarted in its old output_dir) replaces the old folder atomically.
            retired = replace_folder(staging_dir, target)
        except OSError as exc:
            raise write_error(exc, target, "commit the checkpoint") from exc
        if retired is not None:
            self._delete_hidden(retired)

    def delete(self, name: str) -> None:
        # Rename first: the checkpoint disappears atomically, then the files go.
        trash = self.path / layout.trash_name(name)
        os.replace(self.path / name, trash)
        fsync_dir(self.path)
        self._delete_hidden(trash)

    def _delete_hidden(self, folder: Path) -> None:
        try:
            delete_tree(folder)
        except OSError as exc:
            logger.error("Could not remove %s (%s); it is invisible to readers and the next run in %s retries. "
                         "Check the folder's permissions.", folder, exc, self.path)

    def local_dir(self, name: str) -> Path:
        return self.path / name

    def size_problems(self, name: str, manifest: Manifest) -> list[CheckpointCorruptError]:
        return find_problems(self.path / name, manifest, "size")

    def clean_leftovers(self) -> list[str]:
        """Called under the writer lock: no other writer of this folder is running, so every staging or trash
        name in it is a leftover of an interrupted one."""
        leftovers = [name for name in self.list_names() if layout.is_leftover(name)]
        return [name for name in leftovers if remove_leftover(self.path / name)]

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
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(exc, self.path, "open the output folder") from exc
        while self._lock_file is None:
            self._lock_file = self._try_lock()

    def _try_lock(self) -> IO[Any] | None:
        """The locked lock file, or None when it was removed under us by a releasing writer (then retry)."""
        import fcntl

        lock_path = self.path / layout.LOCK_NAME
        try:
            lock_file = open(lock_path, "a+")
        except OSError as exc:
            raise write_error(exc, self.path, "open the output folder") from exc
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise CheckpointError(
                f"{self.path}: another process is writing checkpoints here (lock {layout.LOCK_NAME} is held). "
                "Two runs must not share an output_dir: give this run its own, or stop the other one.",
                path=str(self.path),
            ) from None
        # A releasing writer unlinks the file while holding the lock: a lock taken on an unlinked file locks nothing.
        try:
            same = os.path.samestat(os.fstat(lock_file.fileno()), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if not same:
            lock_file.close()
            return None
        return lock_file

    def release_writer_lock(self) -> None:
        """Remove the lock file (the stock tools leave nothing of ours behind), then let go of it."""
        if self._lock_file is None:
            return
        try:
            (self.path / layout.LOCK_NAME).unlink(missing_ok=True)
        except OSError:
            pass  # a lock file left behind is harmless: the next writer locks it again
        self._lock_file.close()
        self._lock_file = None


def make_store(output_dir: str) -> CheckpointStore:
    """A `LocalStore` for paths, a remote store for fsspec URLs (`s3://`, `memory://`, ...)."""
    if "://" in output_dir and not output_dir.startswith("file://"):
        from ckpt_callbacks.core.storage.remote import FsspecStore

        return FsspecStore(output_dir)
    return LocalStore(output_dir.removeprefix("file://"))

