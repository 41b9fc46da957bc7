"""Checkpoints that must stay one file at a given path: atomic, durable, verified, readable by stock loaders.

Some consumers name a single file and read exactly that path (Lightning's
`ModelCheckpoint` writes `epoch=0-step=5.ckpt` and `last.ckpt`, and stock
loaders `torch.load` it), so the checkpoint cannot become a folder, and no
second file may appear beside it (code that lists or loads every file of the
folder would trip over it). The file is written under a hidden staging name in
the same folder (`layout.staging_file_name`, which does not contain the
target's name: Lightning numbers `hpc_ckpt_{N}` from every name containing
`ckpt_`), fsynced, renamed over the target, and the folder fsynced, so
readers see the old file or the whole new one, and the file is complete when
`save_torch_file` returns. Leftovers of killed writers on this host are removed
by the next write into the folder.

fsspec URLs (`s3://`, `gs://`, `memory://`, ...) are written as
`TorchCheckpointIO` writes them, with the same embedded manifest: the file is
built locally, then uploaded in one `put_file` (an object store makes an
object visible only once its upload completes, so readers see the old object
or the new one; a file system without that property, such as SFTP, may show a
partial file while it uploads). Loading downloads, verifies, then loads.

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
import tempfile
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
from ckpt_callbacks.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
)

__all__ = ["EMBEDDED_MANIFEST", "is_url", "load_torch_file", "read_embedded_manifest", "remove_file",
           "save_torch_file", "verify_file"]


EMBEDDED_MANIFEST = "ckpt_callbacks_manifest.json"
_COVERS = "covered_bytes"  # user_metadata key: the file's bytes the checksum covers (all before the record)
_END_RECORD_SIZE = 22  # a zip's end-of-central-directory record, without comment


def is_url(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is an fsspec URL of a remote file system (`file://` counts as local)."""
    text = os.fspath(path)
    return "://" in text and not text.startswith("file://")


def _local(path: str | os.PathLike[str]) -> Path:
    return Path(os.fspath(path).removeprefix("file://"))


def not_found_message(path: str | os.PathLike[str]) -> str:
    """`TorchCheckpointIO`'s words (code matches them), then what to do."""
    return f"Checkpoint file not found: {os.fspath(path)}. Check the path, or list the run's checkpoints."


def save_torch_file(state: Any, path: str | os.PathLike[str], *, step: int, epoch: float | None = None,
                    metrics: Mapping[str, float] | None = None) -> None:
    """`torch.save(state)` to `path` (a local path or an fsspec URL), atomically, with its manifest embedded;
    complete on return.

    Example:
        >>> save_torch_file(checkpoint_dict, "lightning_logs/version_0/checkpoints/last.ckpt", step=500)
    """
    if is_url(path):
        _save_remote(state, os.fspath(path), step=step, epoch=epoch, metrics=metrics)
        return
    target = _local(path)
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


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _save_remote(state: Any, url: str, *, step: int, epoch: float | None,
                 metrics: Mapping[str, float] | None) -> None:
    fs, remote = _filesystem(url)
    name = remote.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory(prefix="ckpt_callbacks-upload-") as folder:
        local = Path(folder) / name
        with open(local, "w+b") as f:
            _write_with_manifest(f, state, name, step, epoch, metrics)
        try:
            parent = remote.rstrip("/").rsplit("/", 1)[0]
            if parent and parent != remote:
                fs.makedirs(parent, exist_ok=True)
            fs.put_file(str(local), remote)  # one object, visible once complete
        except OSError as exc:
            raise CheckpointWriteError(f"Could not upload the checkpoint to {url}: {exc}. An object store keeps the "
                                       "previous object until an upload completes.", path=url) from exc
    fs.invalidate_cache()


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
    """Verify `path` (a local path or an fsspec URL; when it has an embedded manifest) and load it with
    `torch.load(weights_only=True)`. A missing file raises `CheckpointNotFoundError`, a `FileNotFoundError`."""
    if is_url(path):
        return _load_remote(os.fspath(path), verify=verify, map_location=map_location)
    target = _local(path)
    if not target.is_file():
        raise CheckpointNotFoundError(not_found_message(path), path=os.fspath(path))
    verify_file(target, verify)
    return load_weights_only(target, map_location)


def _load_remote(url: str, *, verify: str, map_location: Any) -> Any:
    fs, remote = _filesystem(url)
    if not fs.isfile(remote):
        raise CheckpointNotFoundError(not_found_message(url), path=url)
    with tempfile.TemporaryDirectory(prefix="ckpt_callbacks-download-") as folder:
        local = Path(folder) / remote.rstrip("/").rsplit("/", 1)[-1]
        fs.get_file(remote, str(local))
        try:
            verify_file(local, verify)
        except CheckpointCorruptError as exc:  # name the object, not the temporary copy
            raise CheckpointCorruptError(str(exc).replace(str(local), url), path=url, reason=exc.reason) from None
        return load_weights_only(local, map_location)


def remove_file(path: str | os.PathLike[str]) -> None:
    """Delete a single-file checkpoint (what Lightning's `remove_checkpoint` asks for); a missing file is fine."""
    if is_url(path):
        fs, remote = _filesystem(os.fspath(path))
        if fs.isfile(remote):
            fs.rm(remote)  # one object: a prefix (a "folder" of other objects) is never removed
        elif fs.exists(remote):
            raise CheckpointError(f"{path} is a folder, not a checkpoint file: not deleted. Remove it yourself if it "
                                  "is meant to go.")
        return
    target = _local(path)
    try:
        target.unlink(missing_ok=True)
    except OSError as exc:
        raise write_error(exc, target, "remove the checkpoint") from exc
    fsync_dir(target.parent)
