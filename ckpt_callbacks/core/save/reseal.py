"""Accept a deliberately changed checkpoint: record its files as they are now in its manifest.

Every load and `verify` refuses a checkpoint whose files no longer match its `manifest.json`
(`core/read/verify.py`): a file missing, resized or with another checksum. When the change was made on
purpose (the user re-sharded `model.safetensors` into `model-0000k-of-0000n.safetensors` + index, as
transformers' own tests do, or replaced a file by a fixed one), `reseal_checkpoint` writes the manifest
anew: every file now in the folder with its size and checksum; everything else the manifest says (step,
epoch, metrics, states, engine, world size, versions, git commit, times, user metadata) is kept.

It refuses what would make the new manifest unsafe or the checkpoint unloadable, and then changes nothing:
a link anywhere in the folder (or the folder or manifest being one), anything but regular files and
folders, a file name the manifest format refuses, a state whose files are gone, a manifest that cannot
be read. The manifest is replaced atomically and durably (`storage/durable.write_bytes_durably`), after
the files it records are flushed to disk, so a crash leaves the old manifest or the new one.

Leftovers of interrupted writes inside the folder (staging names, `layout.is_leftover`) are not recorded.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines import get_engine_class
from ckpt_callbacks.core.format.manifest import (
    FORMAT_VERSION,
    FileEntry,
    Manifest,
    check_relative_path,
    read_manifest_file,
)
from ckpt_callbacks.core.storage.checksums import CHECKSUM_ALGORITHM, checksum_file
from ckpt_callbacks.core.storage.durable import fsync_dir, fsync_file, write_bytes_durably
from ckpt_callbacks.core.storage.errors import write_error
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError

__all__ = ["ResealResult", "plan_reseal", "reseal_checkpoint"]


@dataclass(frozen=True)
class ResealResult:
    """What a reseal recorded (or, from `plan_reseal`, would record)."""

    path: Path
    manifest: Manifest  # the new manifest
    added: list[str]  # files now recorded that the old manifest did not list
    removed: list[str]  # files the old manifest listed that are gone
    changed: list[str]  # files listed in both whose size or checksum differs
    ignored: list[str]  # leftovers of interrupted writes in the folder, not recorded
    written: bool  # False when the manifest already matched every file (nothing was written)

    @property
    def unchanged(self) -> bool:
        return not (self.added or self.removed or self.changed)


def plan_reseal(folder: str | os.PathLike[str]) -> ResealResult:
    """What `reseal_checkpoint(folder)` would record, with every refusal it would raise; writes nothing."""
    directory = Path(folder)
    _refuse_link(directory, "the checkpoint folder", f"give the real folder, {directory.resolve()}")
    manifest_path = directory / layout.MANIFEST_NAME
    _refuse_link(manifest_path, "its manifest", "replace the link by the manifest file itself")
    old = read_manifest_file(manifest_path)  # bounded; missing, a folder, unreadable, damaged: named errors
    entries, ignored = _current_files(directory)
    _check_states(directory, old)
    new = dataclasses.replace(old, files=entries, format_version=FORMAT_VERSION, checksum_algorithm=CHECKSUM_ALGORITHM)
    before = {entry.path: entry for entry in old.files}
    after = {entry.path: entry for entry in entries}
    changed = sorted(path for path in before.keys() & after.keys()
                     if (before[path].size, before[path].checksum) != (after[path].size, after[path].checksum)
                     or old.checksum_algorithm != CHECKSUM_ALGORITHM)
    return ResealResult(directory, new, added=sorted(after.keys() - before.keys()),
                        removed=sorted(before.keys() - after.keys()), changed=changed, ignored=ignored, written=False)


def reseal_checkpoint(folder: str | os.PathLike[str]) -> ResealResult:
    """Rewrite the manifest of the checkpoint in `folder` to record every file as it is now.

    Raises `CheckpointError` (naming the file and the fix) for anything `plan_reseal` refuses, and
    `CheckpointWriteError` when the manifest cannot be written; the old manifest is then untouched.

    Example:
        >>> result = reseal_checkpoint("runs/demo/checkpoint-8")
        >>> result.added, result.removed
        (['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json'],
         ['model.safetensors'])
    """
    plan = plan_reseal(folder)
    if plan.unchanged:
        return plan
    manifest_path = plan.path / layout.MANIFEST_NAME
    try:
        for entry in plan.manifest.files:  # what the manifest vouches for is on disk before the manifest is
            fsync_file(plan.path / entry.path)
        for sub in {(plan.path / entry.path).parent for entry in plan.manifest.files}:
            fsync_dir(sub)
        write_bytes_durably(manifest_path, plan.manifest.to_json())
    except OSError as exc:
        raise write_error(exc, manifest_path, "write the resealed manifest") from exc
    return dataclasses.replace(plan, written=True)


def _refuse_link(path: Path, what: str, fix: str) -> None:
    if path.is_symlink():
        raise CheckpointError(f"{path}: {what} is a link; reseal does not follow links. Fix: {fix}.", path=str(path))


def _current_files(directory: Path) -> tuple[list[FileEntry], list[str]]:
    """Every regular file under `directory` but the manifest, with size and checksum; refuses links and specials."""
    entries: list[FileEntry] = []
    ignored: list[str] = []
    pending = [directory]
    while pending:
        folder = pending.pop()
        try:
            names = sorted(os.listdir(folder))
        except OSError as exc:
            raise _unreadable(folder, exc) from None
        for name in names:
            path = folder / name
            relpath = path.relative_to(directory).as_posix()
            if relpath == layout.MANIFEST_NAME:
                continue
            if layout.is_leftover(name):
                ignored.append(relpath)
                continue
            try:
                mode = path.lstat().st_mode
            except OSError as exc:
                raise _unreadable(path, exc) from None
            if stat.S_ISLNK(mode):
                raise CheckpointError(
                    f"{path}: is a link; a manifest records only the checkpoint's own files, and reseal never "
                    "follows links. Replace the link by a copy of the file, or remove it, then reseal.",
                    path=str(path))
            if stat.S_ISDIR(mode):
                pending.append(path)
                continue
            if not stat.S_ISREG(mode):
                raise CheckpointError(f"{path}: is not a regular file (a device, pipe or socket); remove it from "
                                      "the checkpoint, then reseal.", path=str(path))
            _check_name(relpath, directory)
            try:
                entries.append(FileEntry(path=relpath, size=path.stat().st_size, checksum=checksum_file(path)))
            except OSError as exc:
                raise _unreadable(path, exc) from None
    return sorted(entries, key=lambda entry: entry.path), sorted(ignored)


def _check_name(relpath: str, directory: Path) -> None:
    try:
        check_relative_path(relpath, source=str(directory / layout.MANIFEST_NAME))
    except CheckpointCorruptError:
        raise CheckpointError(
            f"{directory / relpath}: a name the manifest format refuses (no ':', '\\' or '..' in file names); rename "
            "or remove it, then reseal.", path=str(directory / relpath)) from None


def _check_states(directory: Path, manifest: Manifest) -> None:
    """Every state the manifest lists still has its files, as its engine lays them out: else it would not load."""
    try:
        engine = get_engine_class(manifest.engine)(world_size=manifest.world_size)
    except ValueError:
        raise CheckpointError(
            f"{directory}: written by engine '{manifest.engine}', which is not registered in this process, so reseal "
            "cannot check that every state still has its files. Import the module that defines it first "
            "(`ckpt-callbacks reseal --import MODULE`).", path=str(directory)) from None
    engine.open(str(directory))
    missing = []
    for state in manifest.states:
        try:
            files = engine.files_of(state)
            present = engine.has(state) and all((directory / name).is_file() for name in files)
        except CheckpointError as exc:
            raise CheckpointError(f"{directory}: state '{state}' cannot be read as it is now ({exc}). Fix its files, "
                                  "then reseal.", path=str(directory)) from None
        if not present:
            missing.append(f"'{state}' ({', '.join(files) or 'no files'})")
    if missing:
        raise CheckpointError(
            f"{directory}: the manifest lists state(s) whose files are gone: {'; '.join(missing)}. A resealed "
            "checkpoint would not load; restore those files (or re-save the checkpoint), then reseal.",
            path=str(directory))


def _unreadable(path: Path, exc: OSError) -> CheckpointError:
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    return CheckpointError(f"{path}: cannot be read ({cause}). Make it readable (check its permissions), then reseal.",
                           path=str(path))
