"""Sharded safetensors export in the Hugging Face format, that never replaces anything but an earlier export.

Shards are planned by `huggingface_hub.split_torch_state_dict_into_shards` (the
same greedy splitter `save_pretrained` uses, same `model-0000k-of-0000N` names
and `model.safetensors.index.json`), written with this library's streaming
writer (byte for byte what `save_pretrained(max_shard_size=...)` writes) into a
hidden staging folder beside the target, fsynced, and put in place in one
rename, so an interrupted export never leaves a half-written export folder.

The weights are usually on disk already: the final checkpoint's
`model.safetensors` holds the same tensors in the same layout. Given that
checkpoint (`reuse_from`), a shard that would be byte-identical to one of its
committed files shares it instead of being written again: a reflink where the
file system has them (an independent copy-on-write copy: XFS, Btrfs, ...), else
a fresh write. Hard links are opt-in (`SHARE_COMMITTED_FILES = "link"`): this
library never modifies a checkpoint file in place, but a user's in-place write
into a linked export file (`save_pretrained` into the export folder opens its
files with "wb") would change the checkpoint's too, which its checksum then
refuses: a checkpoint is insurance, so it is not shared that way by default. "Would be
byte-identical" is checked, not assumed: the shard's header must equal the
file's, the xxh3-128 of that header followed by the tensors in memory must
equal the checksum the manifest recorded when the file was written (so a
checkpoint of other weights, e.g. an earlier step, is never reused), and the
file must be unchanged since: its size, a modification time no later than the
manifest's, and 16 blocks read back at spread positions equal to the bytes in
memory. (Reading the whole file back would cost about what writing it does;
a flipped bit between two sampled blocks with the modification time restored
is the one change this misses, where `verify` on the checkpoint would not.) Shards that no committed file matches (an export cut in smaller
shards than the checkpoint's single file) are written fresh from memory:
copying their byte ranges out of the checkpoint with `os.copy_file_range`
goes through the page cache of a file written with `O_DIRECT` and was slower
than the fresh `O_DIRECT` write on the project machine (0.19-0.69 s against
0.13-0.16 s for 200 MB, ext4).

An export folder holds a hidden marker (`layout.EXPORT_MARKER`) listing its
files. The export replaces an existing folder only when it is an earlier
export of this library (it has the marker) or is empty; a folder holding
anything else is refused with an error that names what is in the way, and is
left exactly as it was. Paths that cannot work at all (the run folder itself,
one of its parents, a checkpoint inside it) are refused when the flags are
validated (`export_path_problem`), before training starts.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from ckpt_callbacks.config import parse_size
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.manifest import FileEntry, read_manifest_file
from ckpt_callbacks.core.format.safetensors_io import (
    byte_view,
    file_prefix,
    unique_tensors,
    write_safetensors,
)
from ckpt_callbacks.core.storage.checksums import CHECKSUM_ALGORITHM, new_digest
from ckpt_callbacks.core.storage.durable import (
    delete_tree,
    fsync_tree,
    remove_stale_leftovers,
    remove_tree_quietly,
    replace_folder,
)
from ckpt_callbacks.errors import CheckpointError

__all__ = ["INDEX_NAME", "SHARE_COMMITTED_FILES", "check_export_target", "export_path_problem", "export_safetensors"]

logger = logging.getLogger("ckpt_callbacks")

INDEX_NAME = "model.safetensors.index.json"
ExportProgress = Callable[[int], object]  # called with the bytes of each tensor file as it is written
# How an export may share a committed checkpoint's files (`reuse_from`): "reflink" (copy-on-write clones only,
# independent of the checkpoint), "link" (also hard links where there are no reflinks), "off" (every shard written).
SHARE_COMMITTED_FILES = "reflink"
_FICLONE = 0x40049409  # Linux ioctl: make the target a copy-on-write clone of the source (btrfs, XFS, ...)
_SAMPLED_BLOCKS = 16


def export_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    pretrained_objects: Iterable[Any] = (),
    weights_name: str = "model",
    progress: ExportProgress | None = None,
    reuse_from: str | os.PathLike[str] | None = None,
) -> list[Path]:
    """Write `state_dict` as sharded safetensors (+ index when sharded) into `out_dir`, atomically.

    `pretrained_objects` (a model config, generation config, tokenizer, a PEFT config...) are saved beside the
    weights through their own `save_pretrained`, so `from_pretrained(out_dir)` works. `weights_name` is the file
    stem (`"adapter_model"` for a PEFT adapter). `reuse_from`: a committed checkpoint folder (with its manifest)
    whose files a shard shares where they are verified byte-identical to it (see the module's docstring).
    Raises `CheckpointError` when `out_dir` holds anything but an earlier export of this library, which it then
    leaves untouched.

    Example:
        >>> export_safetensors(model.state_dict(), "run/export", max_shard_size="500MB", pretrained_objects=[model.config])
    """
    target = Path(out_dir)
    check_export_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(target.parent, final_name=target.name)  # a killed export of this same target
    staging = target.parent / layout.staging_name_for(target.name)
    staging.mkdir()
    try:
        committed = _CommittedFiles(Path(reuse_from)) if reuse_from is not None and SHARE_COMMITTED_FILES != "off" else None
        written = _write_shards(unique_tensors(state_dict), staging, max_shard_size, weights_name, progress, committed)
        for obj in pretrained_objects:
            obj.save_pretrained(str(staging))
        _write_marker(staging)
        fsync_tree(staging)
        check_export_target(target)  # again: something may have appeared there while the shards were written
        retired = replace_folder(staging, target)
    except BaseException:
        remove_tree_quietly(staging)
        raise
    if retired is not None:
        try:
            delete_tree(retired)
        except OSError as exc:
            logger.error("Could not remove the previous export %s (%s); the new one is in place at %s.", retired, exc,
                         target)
    return [target / path.name for path in written]


def check_export_target(target: Path) -> None:
    """Refuse an export target that holds anything but an earlier export of this library (or nothing)."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(f"export_dir {target} exists and is not a folder; the export would replace it. "
                              "Choose another export_dir.", path=str(target))
    try:
        entries = sorted(os.listdir(target))
    except OSError as exc:
        raise CheckpointError(f"export_dir {target} cannot be read ({os.strerror(exc.errno or 0)}). Choose another "
                              "export_dir, or make it readable.", path=str(target)) from None
    if not entries or layout.EXPORT_MARKER in entries:
        return
    shown = ", ".join(repr(name) for name in entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise CheckpointError(
        f"export_dir {target} holds files this library did not write ({shown}); the export would replace them. "
        "Choose another export_dir (or an empty one), or move those files away.", path=str(target))


def export_path_problem(output_dir: str, export_dir: str) -> str | None:
    """Why `export_dir` cannot hold an export of the run in `output_dir` (None when it can): the run folder itself,
    one of its parents, or a checkpoint (or staging folder) inside it would be replaced by the export."""
    # Links and ".." resolved: a link to the run folder is the run folder.
    run = Path(os.path.realpath(output_dir))
    export = Path(os.path.realpath(export_dir))
    if export == run:
        return "is output_dir itself: the export would replace every checkpoint of the run"
    if run.is_relative_to(export):
        return f"is a parent of output_dir ({run}): the export would replace the whole run"
    if export.is_relative_to(run):
        first = export.relative_to(run).parts[0]
        if layout.parse_checkpoint_step(first) is not None or layout.is_leftover(first) or first == layout.LOCK_NAME:
            return (f"is the checkpoint folder {run / first} of output_dir, or inside it: retention and resume own it, "
                    "and the export would replace it")
    return None


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str, weights_name: str,
                  progress: ExportProgress | None, committed: _CommittedFiles | None) -> list[Path]:
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=weights_name + "{suffix}.safetensors", max_shard_size=parse_size(max_shard_size)
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        path = folder / filename
        shard = {name: tensors[name] for name in names}
        if committed is None or not committed.share(shard, path):
            write_safetensors(path, shard, {"format": "pt"}, fsync=False)
        written.append(path)
        if progress is not None:
            progress(path.stat().st_size)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": sum(t.numel() for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        index_path = folder / f"{weights_name}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    return written


def _write_marker(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    marker = {"format": "ckpt_callbacks", "kind": "export", "files": files}
    (folder / layout.EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")


class _CommittedFiles:
    """The safetensors files of a committed checkpoint, which an export shard may share (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._by_prefix: dict[bytes, tuple[Path, FileEntry]] | None = None

    def share(self, shard: Mapping[str, torch.Tensor], target: Path) -> bool:
        """Make `target` share the committed file that holds exactly what `shard` would be written as; False
        (and nothing at `target`) when there is none, it does not verify, or the file system cannot share it."""
        prefix, ordered = file_prefix(shard, {"format": "pt"})
        found = self._files().get(prefix)
        if found is None:
            return False
        source, entry = found
        if not _holds_exactly(source, entry, prefix, ordered):
            logger.info("Export: %s does not hold the final weights; writing %s afresh.", source, target.name)
            return False
        if _clone(source, target) or (SHARE_COMMITTED_FILES == "link" and _hard_link(source, target)):
            logger.debug("Export: %s shares the committed %s.", target.name, source)
            return True
        return False

    def _files(self) -> dict[bytes, tuple[Path, FileEntry]]:
        if self._by_prefix is None:
            self._by_prefix = {}
            try:
                manifest = read_manifest_file(self.folder / layout.MANIFEST_NAME)
            except (OSError, CheckpointError) as exc:
                logger.info("Export: not reusing %s (%s).", self.folder, exc)
                return self._by_prefix
            if manifest.checksum_algorithm != CHECKSUM_ALGORITHM:
                return self._by_prefix
            for entry in manifest.files:
                if entry.path.endswith(".safetensors"):
                    prefix = _read_prefix(self.folder / entry.path)
                    if prefix is not None:
                        self._by_prefix[prefix] = (self.folder / entry.path, entry)
        return self._by_prefix


def _read_prefix(path: Path) -> bytes | None:
    """A safetensors file's header length and header, or None when it is not readable as one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > 100 * 1024 * 1024:
                return None
            header = f.read(length)
    except OSError:
        return None
    return head + header if len(header) == length else None


def _holds_exactly(source: Path, entry: FileEntry, prefix: bytes, ordered: list[torch.Tensor]) -> bool:
    """Whether `source` is, byte for byte, `prefix` followed by the bytes of `ordered`: the size on disk and in the
    manifest match, and the checksum the manifest recorded is that of these bytes (hashed here from memory)."""
    views = [memoryview(prefix), *(byte_view(t) for t in ordered if t.numel())]
    size = sum(len(view) for view in views)
    try:
        stat, sealed = os.stat(source), os.stat(source.parent / layout.MANIFEST_NAME)
    except OSError:
        return False
    if stat.st_size != size or entry.size != size or stat.st_mtime_ns > sealed.st_mtime_ns:
        return False  # written to after the manifest sealed it
    digest = new_digest()
    for view in views:
        digest.update(view)
    return digest.hexdigest() == entry.checksum and _samples_match(source, views, size)


def _samples_match(source: Path, views: list[memoryview], size: int) -> bool:
    """Whether `_SAMPLED_BLOCKS` blocks of `source`, first and last included, equal those of the concatenated
    `views` (what the file should hold)."""
    block = min(4096, size)
    starts = sorted({round(i * (size - block) / max(1, _SAMPLED_BLOCKS - 1)) for i in range(_SAMPLED_BLOCKS)})
    try:
        with open(source, "rb", buffering=0) as f:
            return all(os.pread(f.fileno(), block, start) == _bytes_at(views, start, block) for start in starts)
    except OSError:
        return False


def _bytes_at(views: list[memoryview], start: int, length: int) -> bytes:
    """`length` bytes from offset `start` of the concatenation of `views`."""
    out = bytearray()
    for view in views:
        if start >= len(view):
            start -= len(view)
            continue
        piece = view[start:start + length - len(out)]
        out += piece
        start = 0
        if len(out) == length:
            break
    return bytes(out)


def _clone(source: Path, target: Path) -> bool:
    """A copy-on-write clone of `source` at `target` (Linux file systems with reflinks); False where there is none."""
    if not sys.platform.startswith("linux"):
        return False
    import fcntl

    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            try:
                fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
                return True
            except OSError:
                pass
    except OSError:
        return False
    target.unlink()
    return False


def _hard_link(source: Path, target: Path) -> bool:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links refused
        return False
    return True
