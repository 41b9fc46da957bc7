"""The position of a training loop in its data, for exact mid-epoch resume of plain DataLoaders.

A shuffled `DataLoader` without its own generator draws its shuffle seed from
the global torch RNG when the epoch's iterator is created. So the order of the
rest of an interrupted epoch is fixed by the RNG state *at the epoch's start*,
not at the checkpoint. `DataPosition` records that state and the number of
batches consumed; `resume(loader)` rebuilds the epoch's iterator from it,
skips the consumed batches, and puts the RNG back to the checkpoint's state.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from ckpt_callbacks.core.state.rng import capture_rng_state, restore_rng_state

__all__ = ["DataPosition", "skip_batches"]


class DataPosition:
    """Epoch, batches consumed in it, and the RNG state the epoch's shuffle was drawn from.

    Example:
        >>> position = DataPosition()
        >>> for epoch in range(epochs):
        ...     batches = position.start_epoch(epoch, loader)   # or position.resume(loader) after a load
        ...     for batch in batches:
        ...         train_step(batch); position.advance()
    """

    def __init__(self) -> None:
        self.epoch = 0
        self.batches_consumed = 0
        self.epoch_start_rng: dict[str, Any] | None = None

    def start_epoch(self, epoch: int, loader: Iterable[Any] | None = None) -> Iterator[Any]:
        """Mark the start of `epoch` (capturing the RNG its shuffle uses) and return the loader's iterator."""
        self.epoch = epoch
        self.batches_consumed = 0
        self.epoch_start_rng = capture_rng_state()
        return iter(loader) if loader is not None else iter(())

    def advance(self, batches: int = 1) -> None:
        self.batches_consumed += batches

    def resume(self, loader: Iterable[Any]) -> Iterator[Any]:
        """The iterator over the rest of the current epoch, exactly as the uninterrupted run would see it.

        Call after the checkpoint (and its RNG) was loaded; the RNG is left as the checkpoint had it.
        """
        if self.epoch_start_rng is None:
            return self.start_epoch(self.epoch, loader)
        resumed_rng = capture_rng_state()
        restore_rng_state(self.epoch_start_rng)
        iterator = iter(loader)
        skip_batches(iterator, loader, self.batches_consumed)
        restore_rng_state(resumed_rng)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "batches_consumed": self.batches_consumed, "epoch_start_rng": self.epoch_start_rng}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.batches_consumed = int(state["batches_consumed"])
        self.epoch_start_rng = state.get("epoch_start_rng")


def skip_batches(iterator: Iterator[Any], loader: Any, count: int) -> None:
    """Advance `iterator` past `count` batches.

    A single-process map-style DataLoader skips on its index sampler, so no sample is loaded or
    transformed; anything else (workers prefetch indices, iterable datasets) fetches and drops.
    """
    if count <= 0:
        return
    sampler_iter = getattr(iterator, "_sampler_iter", None)
    if getattr(loader, "num_workers", None) == 0 and sampler_iter is not None and hasattr(iterator, "_num_yielded"):
        for _ in range(count):
            next(sampler_iter)
        iterator._num_yielded += count
        return
    for _ in range(count):
        next(iterator)
