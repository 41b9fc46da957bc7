"""`Transaction`: one checkpoint being assembled; nothing is visible until it commits.

The transaction only collects: it asks its owner (the manager, through the
small `TransactionOwner` protocol) to snapshot each piece as it is saved, and
hands everything over at commit. What a commit then does (write, seal,
publish, retain) is `commit.py`'s.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.state.capture import capture
from ckpt_callbacks.errors import InvalidOperationError

__all__ = ["Transaction", "TransactionOwner", "piece_path"]


class TransactionOwner(Protocol):
    """What a transaction needs from the manager that opened it."""

    def snapshot_piece(self, transaction: Transaction, relpath: str, value: Any) -> Any | None:
        """The value to commit for `relpath` (a host copy when saving asynchronously), or None to leave it out."""

    def score_key(self) -> str:
        """The metric name `save_score` records; raises `ValueError` when the score has no known direction."""

    def commit_transaction(self, transaction: Transaction) -> None: ...

    def abort_transaction(self, transaction: Transaction) -> None: ...


class Transaction:
    """One checkpoint being assembled; nothing is visible until `commit()` (or a clean `with` exit).

    Example:
        >>> with manager.begin(step, epoch=1.0) as tx:
        ...     tx.save_state({"model": model, "optimizer": optimizer})
        ...     tx.save_state({"ema": ema}, name="ema")
        ...     tx.save_score(val_loss)
    """

    def __init__(self, owner: TransactionOwner, step: int, epoch: float | None) -> None:
        self.owner = owner
        self.step = step
        self.epoch = epoch
        self.metrics: dict[str, float] = {}
        self.metadata: dict[str, Any] = {}
        self.pieces: dict[str, Any] = {}
        self.capture_rng = True
        self.defer_staging = False
        self.copy_now: frozenset[int] = frozenset()  # storages copied at once even when staging is deferred
        self.started = time.perf_counter()
        self._open = True
        self._state_saved = False

    def save_state(self, state: Mapping[str, Any], name: str | None = None) -> None:
        """Capture each named object (`state_dict()` or the value itself); `name` namespaces the pieces."""
        self._check_open("save_state")
        self._state_saved = True
        for key, value in capture(state).items():
            relpath = piece_path(key, name)
            snapshot = self.owner.snapshot_piece(self, relpath, value)
            if snapshot is not None:
                self.pieces[relpath] = snapshot

    def save_score(self, value: float) -> None:
        """The score that ranks this checkpoint (best tracking, `save_best_limit`): stored under
        `metric_for_best_model`, or as "score" with the direction `greater_is_better` gives."""
        self._check_open("save_score")
        self.metrics[self.owner.score_key()] = float(value)

    def save_metrics(self, metrics: Mapping[str, Any]) -> None:
        self._check_open("save_metrics")
        self.metrics.update({str(k): float(v) for k, v in metrics.items() if _is_number(v)})

    def commit(self) -> None:
        self._check_open("commit")
        if not self._state_saved:
            self.abort()
            raise InvalidOperationError(
                f"The checkpoint of step {self.step} holds no state: call tx.save_state({{...}}) before it commits "
                "(nothing was written, no checkpoint was deleted).", step=self.step)
        self._open = False
        self.owner.commit_transaction(self)

    def abort(self) -> None:
        """Drop everything captured; nothing was written."""
        if self._open:
            self._open = False
            self.pieces.clear()
            self.owner.abort_transaction(self)

    @property
    def is_open(self) -> bool:
        return self._open

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif self._open:
            self.commit()

    def _check_open(self, operation: str) -> None:
        if not self._open:
            raise InvalidOperationError(
                f"{operation}() after the checkpoint of step {self.step} was committed or aborted. "
                "Start a new one with manager.begin(step).",
                step=self.step,
            )


def piece_path(key: str, name: str | None) -> str:
    """The relative path of a piece of state: `key`, or `name/key`; refuses names that could leave the folder."""
    relpath = key if name is None else f"{name}/{key}"
    parts = relpath.split("/")
    if any(part in ("", ".", "..") or part.startswith(".") for part in parts) or relpath == layout.MANIFEST_NAME:
        raise ValueError(f"State name {relpath!r} is not allowed: use plain names such as 'model' or 'ema'.")
    return relpath


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, bool)
