"""Is a checkpoint intact? Every file its manifest lists, checked by size and, by default, by checksum.

Problems come back as `CheckpointCorruptError`s naming the file and what failed, so a report can list them
all (`ckpt-callbacks verify`) and a load can refuse with the first. Files are never followed outside the
checkpoint folder (links and `..` are refused).
"""

from __future__ import annotations

import os
from pathlib import Path

from ckpt_callbacks.core.format.manifest import Manifest
from ckpt_callbacks.core.storage.checksums import checksum_file
from ckpt_callbacks.errors import CheckpointCorruptError

__all__ = ["RESEAL_COMMAND", "find_problems", "verify_files"]

RESEAL_COMMAND = "ckpt-callbacks reseal"


def _ways_out(checkpoint_dir: Path) -> str:
    """What to do about a file that no longer matches the manifest: a change made on purpose (re-sharded or
    converted files) is accepted by resealing; otherwise the checkpoint is damaged."""
    return (f"If you changed {checkpoint_dir} on purpose (re-sharded or converted its files), accept it as it is now "
            f"with `{RESEAL_COMMAND} {checkpoint_dir}`; otherwise it is damaged: re-save, or resume from an earlier "
            "checkpoint (pass its path, or set fallback_to_verified=True).")


def verify_files(checkpoint_dir: Path, manifest: Manifest, mode: str) -> None:
    """Check every file the manifest lists; raise `CheckpointCorruptError` for the first bad one.

    `mode` is "checksum" (size and xxh3-128), "size", or "none".

    Example:
        >>> verify_files(Path("run/checkpoint-40"), manifest, "checksum")
    """
    for problem in find_problems(checkpoint_dir, manifest, mode):
        raise problem


def find_problems(checkpoint_dir: Path, manifest: Manifest, mode: str) -> list[CheckpointCorruptError]:
    """Every bad file of a checkpoint (empty when it is intact), for reports that name them all."""
    if mode == "none":
        return []
    root = checkpoint_dir.resolve()
    hint = _ways_out(checkpoint_dir)
    problems = []
    for entry in manifest.files:
        problem = _problem_of(checkpoint_dir / entry.path, f"{checkpoint_dir.name}/{entry.path}", entry.size,
                              entry.checksum, root, manifest.step, mode, hint)
        if problem is not None:
            problems.append(problem)
    return problems


def _problem_of(path: Path, label: str, size: int, checksum: str, root: Path, step: int,
                mode: str, hint: str) -> CheckpointCorruptError | None:
    if path.is_symlink() or not path.resolve().is_relative_to(root):
        return CheckpointCorruptError(f"{label}: is a link leading outside the checkpoint; refusing to read it.",
                                      path=str(path), step=step, reason="unsafe path")
    try:
        if not path.is_file():
            return CheckpointCorruptError(f"{label}: missing (listed in the manifest). {hint}",
                                          path=str(path), step=step, reason="missing")
        actual_size = path.stat().st_size
        if actual_size != size:
            return CheckpointCorruptError(
                f"{label}: size mismatch (expected {size} bytes, found {actual_size}): truncated or appended to. {hint}",
                path=str(path), step=step, reason="size mismatch")
        if mode == "checksum":
            actual = checksum_file(path)
            if actual != checksum:
                return CheckpointCorruptError(
                    f"{label}: checksum mismatch (expected {checksum[:12]}..., got {actual[:12]}...). {hint}",
                    path=str(path), step=step, reason="checksum mismatch")
    except OSError as exc:
        cause = os.strerror(exc.errno) if exc.errno else str(exc)
        return CheckpointCorruptError(
            f"{label}: cannot be read ({cause}). Make it readable (check its permissions and the disk), then retry.",
            path=str(path), step=step, reason="unreadable")
    return None
