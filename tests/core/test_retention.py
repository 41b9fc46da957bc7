"""Retention: exactly the expected checkpoints survive; never the best, the newest or the resumed-from."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.best import MetricRule
from ckpt_callbacks.core.save.retention import RetentionCandidate, RetentionPolicy

LOSSES = {1: 5.0, 2: 1.0, 3: 4.0, 4: 2.0, 5: 3.0, 6: 6.0}  # best is step 2, then 4, then 5


def folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name.startswith("checkpoint-"))


def save_all(manager: CheckpointManager) -> None:
    for step, loss in LOSSES.items():
        manager.save(step, {}, metrics={"eval_loss": loss})
    manager.wait()


@pytest.mark.parametrize(
    ("total", "best", "expected"),
    [
        (2, None, ["checkpoint-2", "checkpoint-6"]),  # best + newest
        (3, None, ["checkpoint-2", "checkpoint-5", "checkpoint-6"]),
        (1, None, ["checkpoint-2", "checkpoint-6"]),  # the best is never deleted, even past the limit
        (2, 2, ["checkpoint-2", "checkpoint-4", "checkpoint-6"]),  # best-2 adds step 4
        (None, 3, ["checkpoint-2", "checkpoint-4", "checkpoint-5", "checkpoint-6"]),
    ],
)
def test_limits_keep_exactly_the_expected_set(tmp_path: Path, total: int | None, best: int | None, expected: list[str]) -> None:
    args = CheckpointArguments(output_dir=str(tmp_path), save_total_limit=total, save_best_limit=best,
                               metric_for_best_model="loss")
    save_all(CheckpointManager(args))
    assert folders(tmp_path) == expected


def test_newest_is_kept_when_it_is_the_best(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), save_total_limit=2, metric_for_best_model="loss"))
    for step in range(1, 5):
        manager.save(step, {}, metrics={"eval_loss": 10.0 - step})
    manager.wait()
    assert folders(tmp_path) == ["checkpoint-3", "checkpoint-4"]


def test_checkpoint_resumed_from_is_never_deleted(tmp_path: Path) -> None:
    args = CheckpointArguments(output_dir=str(tmp_path), save_total_limit=2, async_save=False)
    first = CheckpointManager(args)
    first.save(1, {})
    first.close()
    resumed = CheckpointManager(args)
    resumed.load_last({})
    for step in (2, 3, 4):
        resumed.save(step, {})
    # Like the best, the resumed-from checkpoint is protected and counts toward the limit.
    assert folders(tmp_path) == ["checkpoint-1", "checkpoint-4"]


def test_ordering_uses_steps_from_manifests_not_file_times(tmp_path: Path) -> None:
    import os

    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), save_total_limit=2, async_save=False))
    for step in (10, 20):
        manager.save(step, {})
    os.utime(tmp_path / "checkpoint-20", (1, 1))  # make the newest look oldest by mtime
    manager.save(30, {})
    assert folders(tmp_path) == ["checkpoint-20", "checkpoint-30"]


def test_best_survives_restarts_through_manifests(tmp_path: Path) -> None:
    args = CheckpointArguments(output_dir=str(tmp_path), metric_for_best_model="accuracy")
    manager = CheckpointManager(args)
    for step, accuracy in ((1, 0.5), (2, 0.9), (3, 0.7)):
        manager.save(step, {}, metrics={"eval_accuracy": accuracy})
    manager.close()
    reopened = CheckpointManager(args)
    best = reopened.best()
    assert best is not None and best.step == 2
    assert reopened.best_tracker.best_step == 2 and reopened.best_tracker.best_value == 0.9


def test_policy_with_only_best_limit_keeps_best_n_and_newest() -> None:
    policy = RetentionPolicy(None, 2, MetricRule("eval_loss", False))
    candidates = [RetentionCandidate(step, loss) for step, loss in LOSSES.items()]
    assert policy.steps_to_delete(candidates) == [1, 3, 5]
    assert policy.steps_to_delete(candidates, protected={3}) == [1, 5]


def test_retention_waits_for_the_commit(tmp_path: Path) -> None:
    """Deletion happens only after the new checkpoint is committed: a failed save deletes nothing."""
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), save_total_limit=1, async_save=False))
    manager.save(1, {})

    class Unstorable:
        pass

    with pytest.raises(Exception, match="cannot store"):
        manager.save(2, {"thing": Unstorable()})
    assert folders(tmp_path) == ["checkpoint-1"]
