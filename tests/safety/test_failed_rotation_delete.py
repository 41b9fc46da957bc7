"""Issue 16: a delete that fails during rotation is logged, retried by the next run, and reported by the CLI.

Rotation renames the old checkpoint to a hidden `.trash-*` name and then deletes it. When the delete fails
(a file that cannot be removed), the disk space stays taken: the user must hear of it, and the next run
must try again.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from tests.safety.helpers import (
    assert_no_traceback,
    checkpoint_dirs,
    release_all,
    run_cli_many,
    tiny_model,
    undeletable,
)


def _save(run: Path, step: int) -> None:
    args = CheckpointArguments(output_dir=str(run), save_total_limit=1, async_save=False)
    with CheckpointManager(args) as manager:
        manager.save(step, {"model": tiny_model(step)})


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING and r.name.startswith("ckpt_callbacks"))


def _trash(run: Path) -> list[Path]:
    """Hidden folders of the run: where the undeletable remains of a rotated checkpoint wait (any name)."""
    return sorted(p for p in run.iterdir() if p.name.startswith(".") and p.is_dir())


def test_a_failed_delete_during_rotation_is_logged_retried_and_reported(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    _save(run, 10)
    try:
        with undeletable(run / "checkpoint-10"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
                _save(run, 20)  # rotation (save_total_limit=1) deletes checkpoint-10, which cannot go
            assert checkpoint_dirs(run) == ["checkpoint-20"], checkpoint_dirs(run)
            trash = _trash(run)
            assert len(trash) == 1 and (trash[0] / "locked").is_dir(), (
                f"expected the undeletable remains of checkpoint-10 under one hidden name: {trash}")
            said = _warnings(caplog)
            assert "checkpoint-10" in said or trash[0].name in said, (
                f"the failed delete of checkpoint-10 ({trash[0].name} stays on disk) was not logged; logged: {said!r}")

            listed, verified = run_cli_many([("list", run), ("verify", run)])
            for result in (listed, verified):
                assert_no_traceback(result)
                lines = [line for line in result.text.splitlines() if trash[0].name in line]
                assert lines, f"{trash[0].name} is not reported:\n{result.describe()}"
                assert any("delet" in line.lower() for line in lines), (
                    f"{trash[0].name} is reported, but not as a checkpoint whose deletion failed:\n{result.describe()}")

            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
                _save(run, 30)  # the next run retries; it still fails, and says so
            said = _warnings(caplog)
            assert trash[0].name in said or "checkpoint-10" in said, (
                f"the next run's retry of {trash[0].name} failed silently; logged: {said!r}")
    finally:
        release_all(run)

    _save(run, 40)  # the obstacle is gone: the next run's retry removes the remains
    assert _trash(run) == [], f"the remains of a failed delete were not retried by the next run: {_trash(run)}"
    assert checkpoint_dirs(run) == ["checkpoint-40"]
