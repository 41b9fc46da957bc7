"""The two places where the adapter reaches into a `Trainer` instance, and finding that instance.

Callback events receive the model, optimizer and scheduler but not the Trainer,
and no event fires between the stock loop's save decision and its call to
`Trainer._save_checkpoint`. So the adapter (1) finds the Trainer that fired an
event, (2) shadows `_save_checkpoint` on that instance (an instance attribute
wins over the class method; the Trainer's own flow still decides when to call
it and still fires `on_save` after it), and (3) wraps `train` on the instance, to verify the checkpoint a
resume starts from before the stock loader reads it, and to flush pending
background writes when training raises (`on_train_end` does not fire then).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

from transformers import Trainer

SAVE_METHOD = "_save_checkpoint"


def find_trainer(callback: object) -> Any | None:
    """The Trainer whose callback list holds `callback`, found on the call stack of the event being fired.

    The frame that fires an event is a Trainer method (`__init__` for `on_init_end`, the training loop for
    later events), so its `self` is the Trainer, subclasses included.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in getattr(candidate.callback_handler, "callbacks", ()):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def shadow_save_checkpoint(trainer: Any, save: Callable[[Any, Any], None]) -> None:
    """Route the Trainer's `_save_checkpoint(model, trial)` calls to `save`; the stock writer never runs."""
    setattr(trainer, SAVE_METHOD, save)


def restore_save_checkpoint(trainer: Any) -> None:
    """Give the Trainer its own `_save_checkpoint` back."""
    trainer.__dict__.pop(SAVE_METHOD, None)


def wrap_train(trainer: Any, resolve_resume: Callable[[Any], Any], on_failure: Callable[[], None]) -> None:
    """Make `trainer.train` pass its `resume_from_checkpoint` through `resolve_resume` first, and call
    `on_failure()` before an exception leaves it (then re-raise)."""
    train = trainer.train

    @functools.wraps(train)
    def train_with_checked_resume(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return train(resolve_resume(resume_from_checkpoint), *args, **kwargs)
        except BaseException:
            on_failure()
            raise

    trainer.train = train_with_checked_resume
