"""Which checkpoints survive: `save_total_limit` (newest N) and `save_best_limit` (best N).

Never deleted: the newest, the best, and the checkpoint this run resumed from.
Ordering is by step as recorded in the manifests, never by file times.
"""

from __future__ import annotations

from dataclasses import dataclass

from ckpt_callbacks.core.best import MetricRule

__all__ = ["RetentionCandidate", "RetentionPolicy"]


@dataclass(frozen=True)
class RetentionCandidate:
    step: int
    score: float | None


@dataclass
class RetentionPolicy:
    save_total_limit: int | None = None
    save_best_limit: int | None = None
    rule: MetricRule | None = None

    def steps_to_delete(self, candidates: list[RetentionCandidate], protected: frozenset[int] | set[int] = frozenset()) -> list[int]:
        """Steps of the checkpoints that fall outside the policy, oldest first."""
        if not candidates or (self.save_total_limit is None and self.save_best_limit is None):
            return []
        steps = sorted(c.step for c in candidates)
        ranked_by_metric = self._ranked(candidates)
        keep = {steps[-1]} | (set(protected) & set(steps))
        if ranked_by_metric:
            keep.add(ranked_by_metric[0])
        if self.save_total_limit is not None:
            # The best counts toward the limit, so the newest fill only what it leaves.
            for step in reversed(steps):
                if len(keep) >= self.save_total_limit:
                    break
                keep.add(step)
        # With only save_best_limit set, the best N (plus the newest and protected) are what survive.
        if self.save_best_limit is not None:
            keep.update(ranked_by_metric[: self.save_best_limit])
        return [step for step in steps if step not in keep]

    def _ranked(self, candidates: list[RetentionCandidate]) -> list[int]:
        if self.rule is None:
            return []
        return self.rule.ranked((c.step, c.score) for c in candidates if c.score is not None)
