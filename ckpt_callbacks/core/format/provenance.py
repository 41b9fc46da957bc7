"""Where a checkpoint came from, as its manifest records it: library versions and the git commit of the run."""

from __future__ import annotations

import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata

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
    """The commit of the git work tree the process runs in, when there is one."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory or os.getcwd(), capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None
