"""Parity across a migration, both ways: a run started with the stock Trainer and resumed with the callback
ends as an all-stock run does, and the stock Trainer resumes what the callback wrote as if stock had."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.parity.hf.differential import Run, Scripted, assert_same_observations, both

# Evaluations and saves every 4 steps; the scripted best is checkpoint-4, written before the interruption.
BEST_FIRST = {4: 1.0, 8: 3.0, 12: 2.0, 15: 2.5}
EVALUATED = dict(eval_strategy="steps", eval_steps=4, metric_for_best_model="scripted_loss")


@pytest.mark.parametrize(
    ("evaluated", "expected_steps"),
    [(False, [12, 15]), (True, [4, 15])],
    ids=["without-best", "stock-best-kept"],
)
def test_callback_resuming_a_stock_run_counts_the_stock_checkpoints(
    tmp_path: Path, evaluated: bool, expected_steps: list[int],
) -> None:
    args: dict[str, Any] = dict(save_steps=4, save_total_limit=2, **(EVALUATED if evaluated else {}))

    def scenario(run: Run) -> None:
        def metrics() -> Scripted | None:
            return Scripted("scripted_loss", BEST_FIRST) if evaluated else None

        run.train(crash_at=10, with_callback=False, compute_metrics=metrics(), **args)  # stock writes 4 and 8
        run.train(resume_from_checkpoint=True, model_seed=123, compute_metrics=metrics(), **args)

    stock, ours = both(tmp_path, scenario)

    assert stock.steps == expected_steps  # the stock half's own expectation
    assert_same_observations(stock, ours)


def test_stock_trainer_resumes_the_callbacks_run_past_its_lock_and_staging_leftovers(tmp_path: Path) -> None:
    """The callback's run is interrupted, with a staging folder of an unfinished save left behind; the stock
    Trainer then resumes it (`save_total_limit=2`): nothing of ours gets in its way."""
    args: dict[str, Any] = dict(save_steps=4, save_total_limit=2)

    def scenario(run: Run) -> None:
        run.train(crash_at=10, **args)  # ours in the second half: checkpoint-4, checkpoint-8, the lock file
        leftover = run.output_dir / ".staging-checkpoint-12-0badc0de"  # what a save killed midway leaves
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"\0" * 100)
        run.train(resume_from_checkpoint=True, model_seed=123, with_callback=False, **args)

    stock, ours = both(tmp_path, scenario)

    assert stock.error is None and stock.steps == [12, 15]
    assert_same_observations(stock, ours)
