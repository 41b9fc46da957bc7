"""Where a checkpoint came from, as its manifest records it: library versions and the git commit of the run."""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

__all__ = ["git_commit", "library_versions"]

_REPORTED_PACKAGES = ("ckpt-callbacks", "torch", "numpy", "safetensors", "transformers", "accelerate", "lightning", "pytorch-lightning")


@lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Versions of Python and of the installed packages that shape a checkpoint."""
    versions = {"python": platform.python_version()}
    for package in _REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit(directory: str | None = None) -> str | None:
    """The commit checked out in the git work tree that `directory` (default: the working directory) is in, when
    there is one.

    Read from the repository's own files (`HEAD`, the ref it names, `packed-refs`; linked work trees through
    `.git` files and `commondir`), never by running `git`: the manifest's provenance is gathered on a thread while
    training starts, and a process started there races with the forks of DataLoader workers (a worker forked while
    `subprocess` waits for its child's exec keeps the exec-check pipe open, and the wait never ends)."""
    git_dir = _git_dir(Path(directory or os.getcwd()))
    return _checked_out_commit(git_dir) if git_dir is not None else None


def _git_dir(start: Path) -> Path | None:
    """The git folder of the work tree holding `start` (`$GIT_DIR` when set, as git itself takes it)."""
    if os.environ.get("GIT_DIR"):
        return Path(os.environ["GIT_DIR"])
    try:
        start = start.resolve()
    except OSError:
        return None
    for folder in (start, *start.parents):
        dot_git = folder / ".git"
        if dot_git.is_dir():
            return dot_git
        if dot_git.is_file():  # a linked work tree or a submodule: "gitdir: <path>"
            text = _read(dot_git)
            if text is None or not text.startswith("gitdir:"):
                return None
            return folder / text[len("gitdir:"):].strip()
    return None


def _checked_out_commit(git_dir: Path) -> str | None:
    head = _read(git_dir / "HEAD")
    if head is None:
        return None
    if _is_commit(head):  # a detached HEAD
        return head
    if not head.startswith("ref:"):
        return None
    ref = head[len("ref:"):].strip()
    common = _read(git_dir / "commondir")  # a linked work tree keeps its branches in the main repository
    common_dir = git_dir / common if common else git_dir
    for folder in dict.fromkeys((git_dir, common_dir)):
        loose = _read(folder / ref)
        if loose is not None and _is_commit(loose):
            return loose
    for line in (_read(common_dir / "packed-refs") or "").splitlines():
        commit, _, name = line.partition(" ")
        if name == ref and _is_commit(commit):
            return commit
    return None  # a branch without commits yet


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except (OSError, ValueError):
        return None


def _is_commit(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text)
