"""Reading pieces of a checkpoint on a background thread, before the loader that restores them asks.

A resume spends most of its load time putting the optimizer state into fresh
memory (0.2-0.4 s per GB on the project machine). An adapter whose framework
loads the checkpoint itself (the stock Trainer does: weights, then setup, then
optimizer and scheduler) starts that read as soon as it knows which checkpoint
the resume starts from, so it overlaps verification and the framework's own
work, and hands the result to the framework's loader when it asks.

What is read ahead is new objects only: nothing live changes until the caller
takes them and restores them itself, after its own checks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckpt_callbacks.core.format.engines.base import CheckpointEngine

__all__ = ["ReadAhead"]

logger = logging.getLogger("ckpt_callbacks")


class ReadAhead:
    """At most one background read of some pieces of one checkpoint, taken once.

    Example:
        >>> read_ahead = ReadAhead()
        >>> read_ahead.start(HFEngine, "out/checkpoint-500", ("optimizer", "scheduler"))
        >>> ...                                   # verify, load the weights, build the data loader
        >>> states = read_ahead.take("out/checkpoint-500")   # None: read them yourself
    """

    def __init__(self) -> None:
        self._directory: str | None = None
        self._pieces: Future[dict[str, Any]] | None = None

    def start(self, engine_class: type[CheckpointEngine], directory: str | os.PathLike[str],
              relpaths: Sequence[str], map_location: Any = "cpu") -> None:
        """Begin reading `relpaths` of the checkpoint in `directory`; replaces an earlier read not yet taken."""
        self.discard()
        engine = engine_class()
        engine.open(str(directory))
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-read-ahead")
        self._pieces = executor.submit(_read, engine, tuple(relpaths), map_location)
        executor.shutdown(wait=False)
        self._directory = _identity(directory)

    def take(self, directory: str | os.PathLike[str] | None) -> dict[str, Any] | None:
        """The pieces read for `directory` (waiting for the read to end), or None when none were read for it or
        the read failed: the caller's own loader then reads the files and meets any error itself."""
        pieces, expected = self._pieces, self._directory
        self._pieces = self._directory = None
        if pieces is None:
            return None
        if directory is None or _identity(directory) != expected:
            _drop(pieces)
            return None
        try:
            return pieces.result()
        except Exception as exc:
            logger.debug("Reading %s ahead failed (%r); its loader reads it again.", expected, exc)
            return None

    def discard(self) -> None:
        """Drop a read not taken, after it ends (so two reads never hold memory at once)."""
        pieces = self._pieces
        self._pieces = self._directory = None
        if pieces is not None:
            _drop(pieces)


def _read(engine: CheckpointEngine, relpaths: tuple[str, ...], map_location: Any) -> dict[str, Any]:
    return {relpath: engine.load(relpath, map_location) for relpath in relpaths}


def _drop(pieces: Future[dict[str, Any]]) -> None:
    if not pieces.cancel():
        pieces.exception()  # waits for the end; an error of a read nobody takes is nobody's to report


def _identity(directory: str | os.PathLike[str]) -> str:
    return os.path.realpath(Path(directory))
