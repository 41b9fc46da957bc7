"""Checkpoints that must stay one file at a given path: atomic, durable, verified, readable by stock loaders.

Some consumers name a single file and read exactly that path (Lightning's
`ModelCheckpoint` writes `epoch=0-step=5.ckpt` and `last.ckpt`, and stock
loaders `torch.load` it), so the checkpoint cannot become a folder, and no
second file may appear beside it (code that lists or loads every file of the
folder would trip over it). The file is written under a hidden staging name in
the same folder, fsynced, renamed over the target, and the folder fsynced
(`storage/durable.write_file_atomically`), so readers see the old file or the
whole new one, and the file is complete when `save_torch_file` returns.

Its manifest travels inside it: after `torch.save`, one more record,
`{archive}/ckpt_callbacks_manifest.json`, is appended to the torch zip archive
(`torch.load` reads records by name and ignores it). It records the size and
xxh3-128 checksum of every byte before it (torch's records, each with its own
CRC in the zip), so a flipped or missing byte there fails the checksum, and
damage after it breaks the zip's directory, which every reader checks.
Appending costs one rewrite of the zip directory (a few KB) and a hash of the
file from the page cache (~0.03 s per GB).
"""

from __future__ import annotations

import errno
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import torch

from ckpt_callbacks.core.format.engines.torch_engine import load_weights_only
from ckpt_callbacks.core.format.manifest import FileEntry, Manifest, parse_manifest
from ckpt_callbacks.core.format.provenance import library_versions
from ckpt_callbacks.core.storage.checksums import checksum_fd, checksum_file
from ckpt_callbacks.core.storage.durable import fsync_dir, remove_stale_leftovers, write_file_atomically
from ckpt_callbacks.core.storage.errors import write_error
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointNotFoundError

__all__ = ["EMBEDDED_MANIFEST", "load_torch_file", "read_embedded_manifest", "remove_file", "save_torch_file",
           "verify_file"]

EMBEDDED_MANIFEST = "ckpt_callbacks_manifest.json"
_COVERS = "covered_bytes"
_END_RECORD_SIZE = 22  # a zip's end-of-central-directory record, without comment  # user_metadata key: the file's bytes the checksum covers (all before the record)


def save_torch_file(state: Any, path: str | os.PathLike[str], *, step: int, epoch: float | None = None,
                    metrics: Mapping[str, float] | None = None) -> None:
    """`torch.save(state)` to `path`, atomically and durably, with its manifest embedded; complete on return.

    Example:
        >>> save_torch_file(checkpoint_dict, "lightning_logs/version_0/checkpoints/last.ckpt", step=500)
    """
    target = Path(path)
    try:
        _make_parent_folder(target)
        remove_stale_leftovers(target.parent)  # what a killed save into this folder left: the next writer cleans
        write_file_atomically(target, lambda f: _write_with_manifest(f, state, target.name, step, epoch, metrics))
    except OSError as exc:
        raise write_error(exc, target, "write the checkpoint") from exc


def _make_parent_folder(target: Path) -> None:
    for folder in (target.parent, *target.parent.parents):
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(folder))
    target.parent.mkdir(parents=True, exist_ok=True)


def _write_with_manifest(f: IO[bytes], state: Any, name: str, step: int, epoch: float | None,
                         metrics: Mapping[str, float] | None) -> None:
    torch.save(state, f)
    f.flush()
    if not zipfile.is_zipfile(f):  # e.g. a test that replaced torch.save: nothing to embed a manifest into
        return
    with zipfile.ZipFile(f, "a") as archive:
        names = archive.namelist()
        if not names:
            return
        covered = archive.start_dir  # the appended record starts where torch's zip directory started
        manifest = Manifest(
            step=step, engine="torch", files=[FileEntry(path=name, size=covered, checksum=checksum_fd(f.fileno(), length=covered))],
            epoch=epoch, metrics=dict(metrics or {}), states=[name], versions=library_versions(),
            user_metadata={_COVERS: covered},
        )
        archive.writestr(f"{names[0].split('/')[0]}/{EMBEDDED_MANIFEST}", manifest.to_json())


def read_embedded_manifest(path: Path) -> Manifest | None:
    """The manifest inside a torch file this library wrote; None for a file without one (written by another tool).

    Raises `CheckpointCorruptError` when the file is not a readable zip or its manifest record is damaged."""
    try:
        with zipfile.ZipFile(path) as archive:
            record = next((n for n in archive.namelist() if n.split("/")[-1] == EMBEDDED_MANIFEST), None)
            if record is None:
                return None
            data = archive.read(record)
    except (OSError, zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError) as exc:
        raise CheckpointCorruptError(f"{path}: not a readable torch file ({exc}). Re-save, or resume from an earlier "
                                     "checkpoint.", path=str(path), reason="unreadable") from None
    manifest = parse_manifest(data, source=f"{path}:{EMBEDDED_MANIFEST}")
    if len(manifest.files) != 1 or not isinstance(manifest.user_metadata.get(_COVERS), int):
        raise CheckpointCorruptError(f"{path}: its embedded manifest does not describe one file. Re-save it.",
                                     path=str(path), reason="malformed manifest")
    return manifest


def verify_file(path: Path, mode: str = "checksum") -> bool:
    """Check `path` against its embedded manifest (`mode`: "checksum", "size", "none").

    Returns False when it has none (a file written by another tool): nothing to check against. Raises
    `CheckpointCorruptError` naming what failed."""
    if mode == "none":
        return False
    manifest = read_embedded_manifest(path)
    if manifest is None:
        return False
    entry = manifest.files[0]
    size = path.stat().st_size
    if size <= entry.size or not _ends_with_the_archive(path):
        raise CheckpointCorruptError(
            f"{path}: size mismatch ({size} bytes do not end with the archive its manifest describes): truncated or "
            "appended to. Re-save, or resume from an earlier checkpoint.", path=str(path), reason="size mismatch")
    if mode == "checksum":
        actual = checksum_file(path, length=entry.size)
        if actual != entry.checksum:
            raise CheckpointCorruptError(
                f"{path}: checksum mismatch (expected {entry.checksum[:12]}..., got {actual[:12]}...). Re-save, or "
                "resume from an earlier checkpoint.", path=str(path), reason="checksum mismatch")
    return True


def _ends_with_the_archive(path: Path) -> bool:
    """Whether the file ends exactly with a zip end-of-directory record without comment (what `zipfile` writes):
    bytes appended after the archive fail this check, which no zip reader performs."""
    with open(path, "rb") as f:
        f.seek(-_END_RECORD_SIZE, os.SEEK_END)
        end = f.read(_END_RECORD_SIZE)
    return end[:4] == b"PK\x05\x06" and end[-2:] == b"\x00\x00"


def load_torch_file(path: str | os.PathLike[str], *, verify: str = "checksum", map_location: Any = None) -> Any:
    """Verify `path` (when it has an embedded manifest) and load it with `torch.load(weights_only=True)`."""
    target = Path(path)
    if not target.is_file():
        raise CheckpointNotFoundError(
            f"{target}: no such checkpoint file. Check the path, or list the run's checkpoints.", path=str(target)
        )
    verify_file(target, verify)
    return load_weights_only(target, map_location)


def remove_file(path: str | os.PathLike[str]) -> None:
    """Delete a single-file checkpoint (what Lightning's `remove_checkpoint` asks for); a missing file is fine."""
    target = Path(path)
    try:
        target.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(exc, target, "remove the checkpoint") from exc
    fsync_dir(target.parent)
