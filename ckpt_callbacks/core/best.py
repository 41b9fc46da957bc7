"""Which metric value is better, and which checkpoint is the best: the stock Trainer's rules."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckpt_callbacks.config import CheckpointArguments

__all__ = ["DEFAULT_SCORE_KEY", "BestTracker", "MetricRule", "metric_rule_for"]

DEFAULT_SCORE_KEY = "score"  # what `Transaction.save_score` records when no metric_for_best_model is set


@dataclass
class MetricRule:
    """How to read and compare the metric that ranks checkpoints."""

    key: str  # e.g. "eval_loss"
    greater_is_better: bool
    aliases: tuple[str, ...] = ()  # other names accepted for the same metric (e.g. "loss")

    def value_in(self, metrics: Mapping[str, float]) -> float | None:
        for name in (self.key, *self.aliases):
            if name in metrics:
                value = float(metrics[name])
                return None if math.isnan(value) else value
        return None

    def is_better(self, candidate: float, incumbent: float | None) -> bool:
        """Strictly better, so the first checkpoint reaching a value stays the best (as in the stock Trainer)."""
        if incumbent is None:
            return True
        return candidate > incumbent if self.greater_is_better else candidate < incumbent

    def ranked(self, scored: Iterable[tuple[int, float]]) -> list[int]:
        """Steps from best to worst; ties go to the earlier step."""
        sign = -1.0 if self.greater_is_better else 1.0
        return [step for step, _ in sorted(scored, key=lambda item: (sign * item[1], item[0]))]


@dataclass
class BestTracker:
    """The best metric seen so far and the step that reached it; survives restarts via `reset_from`."""

    rule: MetricRule
    best_value: float | None = None
    best_step: int | None = None

    def observe(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record an evaluation; True when it is a new best."""
        value = self.rule.value_in(metrics)
        if value is None or not self.rule.is_better(value, self.best_value):
            return False
        self.best_value, self.best_step = value, step
        return True

    def reset_from(self, scored: Iterable[tuple[int, float]]) -> None:
        ranked = dict(scored)
        order = self.rule.ranked(ranked.items())
        if order:
            self.best_step = order[0]
            self.best_value = ranked[order[0]]


def metric_rule_for(args: CheckpointArguments) -> MetricRule:
    """The run's rule: `metric_for_best_model` (with the stock Trainer's `eval_` prefix and direction), else the
    saved score (higher is better unless `greater_is_better=False`)."""
    if args.metric_for_best_model is None:
        greater = True if args.greater_is_better is None else args.greater_is_better
        return MetricRule(DEFAULT_SCORE_KEY, greater)
    key = args.metric_key
    assert key is not None
    return MetricRule(key, args.metric_greater_is_better, aliases=(args.metric_for_best_model,))
