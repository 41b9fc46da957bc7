"""Exceptions raised by ckpt_callbacks.

Every message names what happened and what to do about it. Structured fields
(`path`, `step`) let callers react without parsing the message.
"""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""

    def __init__(self, message: str, *, path: str | None = None, step: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.step = step


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No (complete) checkpoint exists where one was asked for. Also a `FileNotFoundError`, as the stock tools raise."""


class InvalidOperationError(CheckpointError):
    """The API was called out of order, e.g. a second `begin()` while one is open."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated, or fails its checksum.

    `path` names the file, `reason` says which check failed.
    """

    def __init__(self, message: str, *, path: str | None = None, step: int | None = None, reason: str = "") -> None:
        super().__init__(message, path=path, step=step)
        self.reason = reason


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permission denied, I/O error, ...).

    Earlier checkpoints are untouched when this is raised: nothing is ever
    deleted before a new checkpoint is committed.
    """
