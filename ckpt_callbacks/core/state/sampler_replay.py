"""Exact mid-epoch resume of a plain shuffled DataLoader by replaying its sampler.

A `RandomSampler` without its own generator draws the epoch's permutation from
the global torch RNG at the moment it starts iterating: when the iterator is
created with worker processes, at the first batch fetch without. A training
framework's hooks rarely sit exactly at that moment, so capturing the RNG "at
epoch start" from a hook is wrong in some epochs. `ReplayableSampler` wraps the
loader's sampler and records the RNG state at exactly that moment; on resume it
regenerates the same permutation from it and yields only the indices not yet
consumed. No skipped sample is loaded, and it works with worker processes
because indices always come from the main process.

`SamplerResume` is the protocol around it, independent of any framework:

1. `attach(loader)` before the epoch's iterator exists;
2. `state_dict(batches_done)` at save time (the RNG itself is saved by the caller);
3. after a load, `load_state_dict(position, rng, batches_per_epoch)` arms the replay;
4. `before_iterator()` just before the resumed run creates its iterator puts
   the RNG back, so an epoch-boundary resume draws the next permutation from
   the same state as the uninterrupted run (call it again if the loop
   discards that iterator and creates another for the epoch it trains);
5. `after_iterator()` once the iterator exists puts it back again for a
   mid-epoch resume, undoing the draws that re-creating the iterator made and
   the uninterrupted run did not;
6. `finish()` once the first batch is fetched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler

from ckpt_callbacks.core.state.rng import restore_rng_state

__all__ = ["ReplayableSampler", "SamplerResume", "install_replayable_sampler"]


class ReplayableSampler(Sampler[Any]):
    """Wraps a sampler; records the torch RNG state when each epoch's order is drawn and can replay an epoch.

    Example:
        >>> sampler = ReplayableSampler(RandomSampler(dataset))
        >>> sampler.replay_from(saved_epoch_rng, skip=12)   # the next epoch yields the saved order minus 12 indices
    """

    def __init__(self, inner: Sampler[Any]) -> None:
        self.inner = inner
        self.epoch_rng: torch.Tensor | None = None
        self._replay: tuple[torch.Tensor, int] | None = None

    def __len__(self) -> int:
        assert isinstance(self.inner, Sized), "only sized samplers are wrapped"
        return len(self.inner)

    @property
    def replay_armed(self) -> bool:
        return self._replay is not None

    def replay_from(self, epoch_rng: torch.Tensor, skip: int) -> None:
        """Make the next iteration yield the order drawn from `epoch_rng`, without its first `skip` indices."""
        self._replay = (epoch_rng, skip)

    def disarm(self) -> None:
        self._replay = None

    def set_epoch(self, epoch: int) -> None:
        # Samplers seeded per epoch (DistributedSampler) must still see the framework's set_epoch call.
        set_epoch = getattr(self.inner, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)

    def __iter__(self) -> Iterator[Any]:
        if self._replay is None:
            self.epoch_rng = torch.get_rng_state()
            yield from self.inner
            return
        epoch_rng, skip = self._replay
        self._replay = None
        self.epoch_rng = epoch_rng
        yield from _order_drawn_from(self.inner, epoch_rng)[skip:]


def _order_drawn_from(sampler: Sampler[Any], rng_state: torch.Tensor) -> list[Any]:
    """The order `sampler` yields when it draws from `rng_state`; the global RNG is left untouched."""
    current = torch.get_rng_state()
    torch.set_rng_state(rng_state)
    try:
        return list(sampler)
    finally:
        torch.set_rng_state(current)


def install_replayable_sampler(loader: Any) -> ReplayableSampler | None:
    """Wrap `loader`'s sampler in place; None for loaders without a sized `BatchSampler` to wrap, and for
    loaders that resume themselves.

    `DataLoader` forbids replacing `sampler`/`batch_sampler` after construction, but the batch sampler reads its
    `sampler` attribute lazily on each iteration, so wrapping it there is seen by every later iterator.
    """
    if not isinstance(loader, DataLoader) or not isinstance(loader.batch_sampler, BatchSampler):
        return None
    if callable(getattr(loader, "state_dict", None)) and callable(getattr(loader, "load_state_dict", None)):
        return None  # it saves its own position (torchdata's StatefulDataLoader): replaying too would skip twice
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler.sampler, ReplayableSampler):
        return batch_sampler.sampler
    inner = batch_sampler.sampler
    if not isinstance(inner, Sampler) or not isinstance(inner, Sized):
        return None
    wrapper = ReplayableSampler(inner)
    batch_sampler.sampler = wrapper
    return wrapper


class SamplerResume:
    """The position of a training loop in its loader's epoch, saved and replayed exactly (see the module doc)."""

    def __init__(self) -> None:
        self.sampler: ReplayableSampler | None = None
        self.batch_size = 1
        self.batches_per_epoch: int | None = None
        self._rng: dict[str, Any] | None = None
        self._position: dict[str, Any] = {}

    @property
    def attached(self) -> bool:
        return self.sampler is not None

    @property
    def resuming(self) -> bool:
        """A loaded state waits to be applied by `before_iterator` / `after_iterator`."""
        return self._rng is not None

    @property
    def resuming_mid_epoch(self) -> bool:
        if self._rng is None:
            return False
        batches_done = int(self._position.get("batches_done", 0))
        return batches_done > 0 and (self.batches_per_epoch is None or batches_done < self.batches_per_epoch)

    def is_wrapping(self, loader: Any) -> bool:
        batch_sampler = getattr(loader, "batch_sampler", None)
        return self.sampler is not None and getattr(batch_sampler, "sampler", None) is self.sampler

    def attach(self, loader: Any, batches_per_epoch: int | None = None) -> bool:
        """Wrap `loader`'s sampler; False when it cannot be wrapped (then only the RNG is resumed).

        `batches_per_epoch` is what the loop takes from the loader per epoch (default: its length).
        """
        sampler = install_replayable_sampler(loader)
        if sampler is None:
            return False
        self.sampler = sampler
        self.batch_size = int(loader.batch_sampler.batch_size or 1)
        self.batches_per_epoch = batches_per_epoch if batches_per_epoch is not None else len(loader)
        self._arm_replay()
        return True

    def state_dict(self, batches_done: int) -> dict[str, Any]:
        """The position to save: batches of the current epoch already trained on, and the epoch's draw state."""
        epoch_rng = self.sampler.epoch_rng if self.sampler is not None else None
        return {"batches_done": int(batches_done), "epoch_rng": epoch_rng}

    def load_state_dict(self, position: dict[str, Any], rng: dict[str, Any]) -> None:
        """Arm the resume: `position` from `state_dict`, `rng` the RNG state saved with the checkpoint."""
        self._rng = rng
        self._position = dict(position)
        self._arm_replay()

    def _arm_replay(self) -> None:
        epoch_rng = self._position.get("epoch_rng")
        if self.sampler is None or epoch_rng is None or not self.resuming_mid_epoch:
            return
        self.sampler.replay_from(epoch_rng, int(self._position["batches_done"]) * self.batch_size)

    def before_iterator(self) -> None:
        """Put the saved RNG back just before the resumed run creates its iterator."""
        if self._rng is not None:
            restore_rng_state(self._rng)

    def after_iterator(self) -> None:
        """The iterator exists: for a mid-epoch resume, undo the RNG draws its creation made.

        An epoch-boundary resume stays armed: a loop may still discard this iterator and create the next epoch's
        afresh, which must then again start from the saved RNG (`before_iterator`). `finish` ends the resume.
        """
        if self.resuming_mid_epoch:
            assert self._rng is not None
            restore_rng_state(self._rng)
            self.finish()
        elif self.sampler is not None:
            self.sampler.disarm()  # the loop starts a new epoch (e.g. limit_train_batches reached): no replay

    def finish(self) -> None:
        """The resumed run has consumed its first batch: the saved state has done its work."""
        self._rng = None
        self._position = {}
