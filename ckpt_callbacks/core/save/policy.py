"""When to save: the one place that decides, for every strategy and trigger.

Adapters report events (a step ended, an epoch ended, an evaluation produced
metrics, training ended); `SavePolicy` answers whether a checkpoint is due.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.best import BestTracker

__all__ = ["SavePolicy", "timing_of"]


class SavePolicy:
    def __init__(self, args: CheckpointArguments, best: BestTracker | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.args = args
        self.best = best
        self._clock = clock
        self._last_save_time = clock()
        self._last_saved_step: int | None = None
        self._max_steps: int | None = None

    def set_max_steps(self, max_steps: int | None) -> None:
        """The run's total optimizer steps; needed to resolve a ratio `save_steps` and the final-step save."""
        self._max_steps = max_steps

    @property
    def save_interval(self) -> int | None:
        """`save_steps` as a number of steps: ratios resolve as ceil(max_steps * ratio), as in the stock Trainer."""
        steps = self.args.save_steps
        if steps < 1:
            if self._max_steps is None:
                return None
            return max(1, math.ceil(self._max_steps * steps))
        return int(steps)

    @property
    def saves_during_training(self) -> bool:
        """Whether any save can fall due during training: a strategy other than "no", or a time interval."""
        return self.args.save_strategy != "no" or self.args.save_time_interval is not None

    def same_timing(self, other: CheckpointArguments) -> bool:
        """Whether `other` saves at exactly the steps these flags do (strategy, interval, metric and direction)."""
        return timing_of(self.args) == timing_of(other)

    def on_step_end(self, step: int) -> bool:
        """A save is due after optimizer step `step` (the `steps` strategy, the final step, or the time interval)."""
        if self.args.save_strategy == "steps":
            interval = self.save_interval
            if interval is not None and step > 0 and step % interval == 0:
                return True
            if self._max_steps is not None and step >= self._max_steps:
                return True  # the stock Trainer always saves the final step under `steps`
        return self.time_interval_elapsed()

    def on_epoch_end(self) -> bool:
        return self.args.save_strategy == "epoch"

    def on_evaluate(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record the evaluation for best tracking; under `best`, a save is due exactly when it is a new best."""
        is_new_best = self.best.observe(metrics, step) if self.best is not None else False
        return self.args.save_strategy == "best" and is_new_best

    def time_interval_elapsed(self) -> bool:
        interval = self.args.save_time_interval
        if interval is None:
            return False
        return self._clock() - self._last_save_time >= interval

    def on_train_end(self, step: int) -> bool:
        """A forced final save: due unless this step is already saved or saving is off."""
        return self.args.save_strategy != "no" and self._last_saved_step != step

    def record_save(self, step: int) -> None:
        self._last_saved_step = step
        self._last_save_time = self._clock()

    @property
    def last_saved_step(self) -> int | None:
        return self._last_saved_step


def timing_of(args: CheckpointArguments) -> tuple[object, ...]:
    """What decides at which steps a checkpoint is written."""
    if args.save_strategy == "steps":
        return ("steps", float(args.save_steps))
    if args.save_strategy == "best":
        return ("best", args.metric_key, args.metric_greater_is_better)
    return (args.save_strategy,)
