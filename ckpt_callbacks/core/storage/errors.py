"""OS failures while writing, turned into errors that say what to do."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from ckpt_callbacks.errors import CheckpointWriteError

__all__ = ["write_error"]

_HINTS = {
    errno.ENOSPC: "Free disk space or point output_dir at a larger disk.",
    errno.EDQUOT: "Free disk space or raise your quota.",
    errno.EACCES: "Make the folder writable or choose another output_dir.",
    errno.EPERM: "Make the folder writable or choose another output_dir.",
    errno.EROFS: "The file system is read-only: choose another output_dir.",
}


def write_error(exc: OSError, path: Path, action: str) -> CheckpointWriteError:
    """The user-facing error for an OS failure while writing `path`.

    Example:
        >>> write_error(OSError(errno.ENOSPC, "No space left on device"), Path("run"), "commit the checkpoint")
        CheckpointWriteError('Could not commit the checkpoint at run: No space left on device. Free disk space ...')
    """
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    hint = _HINTS.get(exc.errno or 0, "Check the disk and the folder's permissions.")
    return CheckpointWriteError(
        f"Could not {action} at {path}: {cause}. {hint} Earlier checkpoints are untouched.", path=str(path)
    )
