"""Checkpoints that must stay one file at a given path: atomic, durable, verified, optionally asynchronous.

Some consumers name a single file and read exactly that path (Lightning's
`ModelCheckpoint` writes `epoch=0-step=5.ckpt` and `last.ckpt`, and stock
loaders `torch.load` it), so the checkpoint cannot become a folder. The file
is written under a hidden temporary name in the same folder, fsynced, renamed
over the target, and the folder fsynced. A sidecar `{name}.manifest.json`
(the folder manifest's format, one entry) records its size and checksum.

The old sidecar is removed before the new file is renamed in, so a crash in
between leaves a file without a sidecar (loaded unverified, like any stock
file) and never a file whose sidecar describes other bytes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any

import torch

from ckpt_callbacks.core.format.engines.torch_engine import load_weights_only
from ckpt_callbacks.core.format.manifest import (
    FileEntry,
    Manifest,
    checksum_file,
    find_problems,
    parse_manifest,
)
from ckpt_callbacks.core.save.staging import HostStager
from ckpt_callbacks.core.save.writer import BackgroundWriter
from ckpt_callbacks.core.state.capture import library_versions
from ckpt_callbacks.core.storage.durable import fsync_dir, write_bytes_durably
from ckpt_callbacks.core.storage.store import write_error
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointNotFoundError

SIDECAR_SUFFIX = ".manifest.json"


def sidecar_path(path: Path) -> Path:
    """Where the manifest of single-file checkpoint `path` lives: `last.ckpt` -> `last.ckpt.manifest.json`."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_file_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Create or replace `path` with what `write` writes, so readers see the old file or the complete new one.

    Example:
        >>> write_file_atomically(Path("run/last.ckpt"), lambda f: torch.save(state, f))
    """
    folder = path.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(exc, folder, "create the checkpoint folder") from exc
    # Same folder as the target: the rename stays on one file system, hence atomic (no copy through $TMPDIR).
    tmp = folder / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(folder)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise write_error(exc, path, "write the checkpoint") from exc
    except BaseException:
        _unlink_quietly(tmp)
        raise


def save_torch_file(
    state: Any,
    path: str | os.PathLike[str],
    *,
    step: int,
    epoch: float | None = None,
    metrics: Mapping[str, float] | None = None,
) -> None:
    """`torch.save(state)` to `path` atomically and durably, then write its sidecar manifest."""
    target = Path(path)
    sidecar = sidecar_path(target)
    try:
        sidecar.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(exc, sidecar, "replace the checkpoint manifest") from exc
    write_file_atomically(target, partial(torch.save, state))
    entry = FileEntry(path=target.name, size=target.stat().st_size, checksum=checksum_file(target))
    manifest = Manifest(step=step, engine="torch", files=[entry], epoch=epoch, metrics=dict(metrics or {}),
                        states=[target.name], versions=library_versions())
    try:
        write_bytes_durably(sidecar, manifest.to_json())
    except OSError as exc:
        raise write_error(exc, sidecar, "write the checkpoint manifest") from exc


def verify_file(path: Path, mode: str = "checksum") -> bool:
    """Check `path` against its sidecar manifest (`mode`: "checksum", "size", "none").

    Returns False when there is no sidecar (a file written by another tool, or a save interrupted between the
    rename and the manifest): nothing to check against. Raises `CheckpointCorruptError` naming what failed.
    """
    sidecar = sidecar_path(path)
    if mode == "none" or not sidecar.is_file():
        return False
    manifest = parse_manifest(sidecar.read_bytes(), source=str(sidecar))
    if [entry.path for entry in manifest.files] != [path.name]:
        raise CheckpointCorruptError(
            f"{sidecar}: describes {[e.path for e in manifest.files]}, not {path.name}. Delete the stray manifest "
            "or restore the file it describes.",
            path=str(sidecar), reason="malformed manifest",
        )
    for problem in find_problems(path.parent, manifest, mode):
        raise problem
    return True


def load_torch_file(path: str | os.PathLike[str], *, verify: str = "checksum", map_location: Any = None) -> Any:
    """Verify `path` (when it has a sidecar) and load it with `torch.load(weights_only=True)`."""
    target = Path(path)
    if not target.is_file():
        raise CheckpointNotFoundError(
            f"{target}: no such checkpoint file. Check the path, or list the run's checkpoints.", path=str(target)
        )
    verify_file(target, verify)
    return load_weights_only(target, map_location)


def remove_file(path: str | os.PathLike[str]) -> None:
    """Delete a single-file checkpoint and its sidecar; a missing file is not an error."""
    target = Path(path)
    try:
        target.unlink(missing_ok=True)
        sidecar_path(target).unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(exc, target, "remove the checkpoint") from exc
    fsync_dir(target.parent)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass  # the original error is the one worth reporting


class SingleFileWriter:
    """Saves and removals of single-file checkpoints, run in order, in the background when `async_save`.

    Removals are queued behind earlier saves, so an older checkpoint never disappears before a newer one is
    durable. A background failure is raised by the next `save`/`remove`, by `wait` and by `close`.
    """

    def __init__(self, async_save: bool = True) -> None:
        self.async_save = async_save
        # A save and the removal that follows it may be in flight together.
        self._writer = BackgroundWriter(max_in_flight=2)
        self._stager = HostStager()

    def save(self, state: Any, path: str | os.PathLike[str], *, step: int, epoch: float | None = None,
             metrics: Mapping[str, float] | None = None) -> None:
        """When this returns, the file will hold `state` as it was at the call; the caller may mutate it."""
        if not self.async_save:
            save_torch_file(state, path, step=step, epoch=epoch, metrics=metrics)
            return
        self._writer.wait()  # the stager reuses its buffers: the previous snapshot must be on disk first
        snapshot = self._stager.stage(state)
        self._writer.submit(partial(save_torch_file, snapshot, path, step=step, epoch=epoch, metrics=metrics))

    def remove(self, path: str | os.PathLike[str]) -> None:
        if self.async_save:
            self._writer.submit(partial(remove_file, path))
        else:
            remove_file(path)

    def wait(self) -> None:
        self._writer.wait()

    def close(self) -> None:
        self._writer.close()
