"""Exact resume of loaders that save their own position (torchdata's `StatefulDataLoader`).

Such a loader restores where it was in the epoch from its own `state_dict`, but
creating its iterator still draws a base seed from the global torch RNG (when it
has no generator of its own). The uninterrupted run drew that number at the start
of the epoch, before the checkpoint; the resumed run draws it again right after
the load restored the RNG, which shifts every later draw (dropout, augmentation).
So, for a loader saved in the middle of an epoch, the RNG state restored by the
load is put back once more right after the loader's next iterator is created.
A loader saved at an epoch boundary needs nothing: the uninterrupted run drew at
the next epoch's start too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ckpt_callbacks.core.state.rng import restore_rng_state

__all__ = ["keep_rng_through_next_iterator", "saved_mid_epoch"]

_RNG_AFTER_ITERATOR = "_ckpt_callbacks_rng_after_iterator"
_ARMED_MARK = "_ckpt_callbacks_armed"
_ARMED_CLASSES: dict[type, type] = {}  # a loader class -> the same class with the one-shot `__iter__`


def saved_mid_epoch(loader_state: Any) -> bool:
    """Whether a `StatefulDataLoader` state was taken in the middle of an epoch (some batches of it yielded)."""
    if not isinstance(loader_state, Mapping) or loader_state.get("_iterator_finished") is not False:
        return False
    snapshot = loader_state.get("_snapshot")
    if isinstance(snapshot, Mapping):  # with worker processes: the main process's part of the snapshot
        main = snapshot.get("_main_snapshot")
        yielded = main.get("_sampler_iter_yielded") if isinstance(main, Mapping) else None
    else:
        yielded = loader_state.get("_num_yielded")
    return isinstance(yielded, int) and yielded > 0


def keep_rng_through_next_iterator(loader: Any, rng_state: Mapping[str, Any]) -> None:
    """Right after `loader`'s next `iter()`, restore `rng_state` (once), undoing the draw that creating the
    iterator made and the uninterrupted run did not.

    Example:
        >>> loader.load_state_dict(saved["loader"]); restore_rng_state(saved["rng"])
        >>> keep_rng_through_next_iterator(loader, saved["rng"])
        >>> for batch in loader: ...   # the same random numbers as the run that was interrupted
    """
    cls = type(loader)
    original = cls.__bases__[0] if getattr(cls, _ARMED_MARK, False) else cls
    setattr(loader, _RNG_AFTER_ITERATOR, dict(rng_state))
    loader.__class__ = _armed_class(original)


def _armed_class(cls: type) -> type:
    armed = _ARMED_CLASSES.get(cls)
    if armed is None:

        def __iter__(self: Any) -> Any:  # noqa: N807 - the method the armed class overrides
            iterator = cls.__iter__(self)  # type: ignore[attr-defined]
            state = self.__dict__.pop(_RNG_AFTER_ITERATOR, None)
            self.__class__ = cls
            if state is not None:
                restore_rng_state(state)
            return iterator

        armed_class = type(cls.__name__, (cls,), {"__iter__": __iter__, "__qualname__": cls.__qualname__,
                                                  "__module__": cls.__module__, _ARMED_MARK: True})
        _ARMED_CLASSES[cls] = armed = armed_class
    return armed
