"""`manifest.json`: what a checkpoint holds, and the checks that prove it is intact.

Checksums use xxh3-128. Measured on this project's 2-core machine over 256 MiB
in memory: xxh3-128 32 GB/s, zlib crc32 7 GB/s, sha256 2 GB/s, blake2b 1.4 GB/s.
It is far faster than any disk, so hashing never becomes the bottleneck of a
save or a verify, and 128 bits make accidental collisions irrelevant.
"""

from __future__ import annotations

import json
import mmap
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import xxhash

from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError

FORMAT_NAME = "ckpt_callbacks"
FORMAT_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_128"
# Each hash update releases and retakes the GIL, so chunks are large (a busy training thread delays every retake),
# and mapped one at a time, so at most one chunk of a file is resident through the map. A multiple of mmap's
# offset granularity.
_READ_CHUNK = 64 * 1024 * 1024


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


def checksum_file(path: Path) -> str:
    """xxh3-128 of a file, hashed through read-only memory maps of one large chunk at a time.

    Mapping the file hashes the page cache in place; reading it into a buffer first copies every byte. On the
    project machine a warm 1 GB file took 0.045 s mapped vs 0.14 s read (f.read, 16 MiB chunks). Mapping one
    chunk at a time keeps the mapped (resident) part of a large file to one chunk.
    """
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for start in range(0, size, _READ_CHUNK):
            with mmap.mmap(f.fileno(), min(_READ_CHUNK, size - start), offset=start, access=mmap.ACCESS_READ) as chunk:
                if hasattr(chunk, "madvise"):
                    chunk.madvise(mmap.MADV_SEQUENTIAL)  # read ahead when the file is not cached
                view = memoryview(chunk)
                try:
                    digest.update(view)
                finally:
                    view.release()
    return digest.hexdigest()


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
    try:
        raw = json.loads(data)
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
    except (KeyError, TypeError, ValueError) as exc:
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


def verify_files(checkpoint_dir: Path, manifest: Manifest, mode: str) -> None:
    """Check every file the manifest lists; raise `CheckpointCorruptError` for the first bad one.

    `mode` is "checksum" (size and xxh3-128), "size", or "none".
    """
    for problem in find_problems(checkpoint_dir, manifest, mode):
        raise problem


def find_problems(checkpoint_dir: Path, manifest: Manifest, mode: str) -> list[CheckpointCorruptError]:
    """Every bad file of a checkpoint (empty when it is intact), for reports that name them all."""
    if mode == "none":
        return []
    problems = []
    root = checkpoint_dir.resolve()
    name = checkpoint_dir.name
    for entry in manifest.files:
        path = checkpoint_dir / entry.path
        label = f"{name}/{entry.path}"
        hint = "Re-save, or resume from an earlier checkpoint."
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            problems.append(CheckpointCorruptError(
                f"{label}: is a link leading outside the checkpoint; refusing to read it.",
                path=str(path), step=manifest.step, reason="unsafe path"))
            continue
        if not path.is_file():
            problems.append(CheckpointCorruptError(
                f"{label}: missing (listed in the manifest). {hint}", path=str(path), step=manifest.step, reason="missing"))
            continue
        size = path.stat().st_size
        if size != entry.size:
            problems.append(CheckpointCorruptError(
                f"{label}: size mismatch (expected {entry.size} bytes, found {size}): truncated or appended to. {hint}",
                path=str(path), step=manifest.step, reason="size mismatch"))
            continue
        if mode == "checksum":
            actual = checksum_file(path)
            if actual != entry.checksum:
                problems.append(CheckpointCorruptError(
                    f"{label}: checksum mismatch (expected {entry.checksum[:12]}..., got {actual[:12]}...). {hint}",
                    path=str(path), step=manifest.step, reason="checksum mismatch"))
    return problems
