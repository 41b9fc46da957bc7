"""`manifest.json`: what a checkpoint holds, every file with its size and checksum.

Parsing is strict and bounded: a manifest larger than `MAX_MANIFEST_BYTES`,
nested too deep, or of the wrong shape is a `CheckpointCorruptError` naming
the file, never a traceback and never a stall, so one damaged checkpoint can
not break listing, retention or resume of the run around it. Checking files
against a manifest is the read side's job (`core/read/verify.py`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from ckpt_callbacks.core.storage.checksums import CHECKSUM_ALGORITHM, checksum_file
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_MANIFEST_BYTES",
    "FileEntry",
    "Manifest",
    "check_relative_path",
    "describe_files",
    "parse_manifest",
    "read_manifest_bytes",
    "read_manifest_file",
]

FORMAT_NAME = "ckpt_callbacks"
FORMAT_VERSION = 1
# Far above any real manifest (100k files take ~15 MB), far below what could stall a listing.
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


@dataclass
class FileEntry:
    path: str
    size: int
    checksum: str


@dataclass
class Manifest:
    step: int
    engine: str
    files: list[FileEntry]
    epoch: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    states: list[str] = field(default_factory=list)
    world_size: int = 1
    versions: dict[str, str] = field(default_factory=dict)
    git_commit: str | None = None
    start_time: float | None = None
    save_time: float = field(default_factory=time.time)
    user_metadata: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    checksum_algorithm: str = CHECKSUM_ALGORITHM

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @property
    def total_size(self) -> int:
        return sum(entry.size for entry in self.files)


def describe_files(
    root: Path, exclude: Iterable[str] = (), known_checksum: Callable[[Path, os.stat_result], str | None] | None = None
) -> list[FileEntry]:
    """Size and checksum of every file under `root`, with POSIX relative paths, sorted.

    `known_checksum(path, stat)` may supply a checksum computed while the file was written
    (`written_files.py`); files it returns None for are read back and hashed."""
    excluded = set(exclude)
    entries = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel in excluded:
                continue
            stat = full.stat()
            known = known_checksum(full, stat) if known_checksum is not None else None
            entries.append(FileEntry(path=rel, size=stat.st_size, checksum=known or checksum_file(full)))
    return sorted(entries, key=lambda e: e.path)


def parse_manifest(data: bytes, *, source: str) -> Manifest:
    """Parse and type-check manifest JSON; any problem is a `CheckpointCorruptError` naming `source`."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise CheckpointCorruptError(
            f"{source}: manifest of {len(data)} bytes, above the limit of {MAX_MANIFEST_BYTES} bytes: not written by "
            "this library, or damaged. Delete the checkpoint or resume from another.",
            path=source, reason="malformed manifest",
        )
    try:
        raw = json.loads(data)
    except RecursionError:
        raise CheckpointCorruptError(
            f"{source}: manifest nested too deep to be one this library wrote (damaged or crafted). "
            "Delete the checkpoint or resume from another.",
            path=source, reason="malformed manifest",
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorruptError(
            f"{source}: manifest is not valid JSON ({exc}). The checkpoint was not committed by this library "
            "or was damaged; delete it or resume from another checkpoint.",
            path=source, reason="malformed manifest",
        ) from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise CheckpointCorruptError(
            f"{source}: not a ckpt_callbacks manifest (missing \"format\": \"{FORMAT_NAME}\").",
            path=source, reason="malformed manifest",
        )
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{source}: manifest format_version {version!r} is not supported by this version of ckpt_callbacks "
            f"(supports <= {FORMAT_VERSION}). Upgrade ckpt-callbacks to read it.",
            path=source,
        )
    try:
        files = [FileEntry(path=str(f["path"]), size=_as_int(f["size"]), checksum=str(f["checksum"])) for f in raw["files"]]
        manifest = Manifest(
            step=_as_int(raw["step"]),
            engine=str(raw["engine"]),
            files=files,
            epoch=None if raw.get("epoch") is None else float(raw["epoch"]),
            metrics={str(k): float(v) for k, v in dict(raw.get("metrics") or {}).items()},
            states=[str(s) for s in raw.get("states") or []],
            world_size=_as_int(raw.get("world_size", 1)),
            versions={str(k): str(v) for k, v in dict(raw.get("versions") or {}).items()},
            git_commit=raw.get("git_commit"),
            start_time=raw.get("start_time"),
            save_time=float(raw.get("save_time") or 0.0),
            user_metadata=dict(raw.get("user_metadata") or {}),
            format_version=version,
            checksum_algorithm=str(raw.get("checksum_algorithm", CHECKSUM_ALGORITHM)),
        )
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        raise CheckpointCorruptError(
            f"{source}: manifest has a missing or mistyped field ({exc!r}). Delete the checkpoint or resume from another.",
            path=source, reason="malformed manifest",
        ) from None
    for entry in manifest.files:
        check_relative_path(entry.path, source=source)
    return manifest


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def check_relative_path(relpath: str, *, source: str) -> None:
    """Refuse manifest paths that could reach outside the checkpoint folder."""
    pure = PurePosixPath(relpath)
    if relpath == "" or pure.is_absolute() or ".." in pure.parts or "\\" in relpath or ":" in relpath:
        raise CheckpointCorruptError(
            f"{source}: manifest names a file outside the checkpoint ({relpath!r}); refusing to read it.",
            path=source, reason="unsafe path",
        )


def read_manifest_file(path: Path) -> Manifest:
    """Read and parse the manifest file `path`, bounded in size; any problem (missing, a folder, unreadable,
    too large, malformed) is a `CheckpointError` naming it: `CheckpointNotFoundError` when there is no file."""
    return parse_manifest(read_manifest_bytes(path), source=str(path))


def read_manifest_bytes(path: Path) -> bytes:
    """The bytes of manifest file `path`, at most `MAX_MANIFEST_BYTES` + 1 (parsing refuses more);
    `CheckpointNotFoundError` when there is none, `CheckpointCorruptError` naming what else is wrong."""
    try:
        with open(path, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except (FileNotFoundError, NotADirectoryError):
        raise CheckpointNotFoundError(
            f"{path.parent}: no {path.name}, so it is not a committed checkpoint (an interrupted save, or written by "
            "another tool). Use a checkpoint listed by `ckpt-callbacks list`.",
            path=str(path.parent),
        ) from None
    except IsADirectoryError:
        raise CheckpointCorruptError(f"{path}: is a folder, not a manifest file. Delete the checkpoint or resume "
                                     "from another.", path=str(path), reason="malformed manifest") from None
    except OSError as exc:
        raise CheckpointCorruptError(
            f"{path}: cannot read the manifest ({os.strerror(exc.errno) if exc.errno else exc}). Make it readable "
            "(check its permissions), or resume from another checkpoint.",
            path=str(path), reason="unreadable",
        ) from None
