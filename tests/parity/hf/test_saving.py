"""Parity of what a training run leaves behind: strategies, rotation, the best checkpoint and the model at the end.

Each test plays one scenario with the stock Trainer and with `CheckpointCallback()` added (differential.py)
and asserts that everything a user observes is equal. The tiny GPT-2 trains 15 optimizer steps, 5 per epoch.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
from transformers import Trainer

from tests.hf.conftest import EVAL, RandomTokens
from tests.parity.hf.differential import (
    Run,
    Scenario,
    Scripted,
    assert_holds_checkpoint_weights,
    assert_same_checkpoint_contents,
    assert_same_checkpoint_files,
    assert_same_final_model,
    assert_same_observations,
    both,
    frozen_embeddings_and_first_block,
)

# Evaluations at steps 4, 8, 12 and the final step 15, each at a save step.
EVALUATE = dict(eval_strategy="steps", eval_steps=4, save_steps=4)
# The scripted metric's best (lowest) value is at step 8: neither the first nor the last checkpoint.
LOWER_IS_BETTER = {4: 3.0, 8: 1.0, 12: 2.0, 15: 2.5}
HIGHER_IS_BETTER = {4: 0.2, 8: 0.9, 12: 0.5, 15: 0.4}


def scripted_run(run: Run, metric: str = "scripted_loss", values: dict[int, float] = LOWER_IS_BETTER, **args: Any) -> None:
    """A run whose evaluations report `eval_{metric}` from a script (lower is better for `*loss` names)."""
    run.train(compute_metrics=Scripted(metric, values), metric_for_best_model=metric, **{**EVALUATE, **args})


@pytest.mark.parametrize(
    "args",
    [
        dict(save_strategy="steps", save_steps=4),
        dict(save_strategy="steps", save_steps=0.3),  # a ratio: every ceil(15 * 0.3) = 5 steps
        dict(save_strategy="epoch"),
        dict(save_strategy="no"),
        dict(save_strategy="best", metric_for_best_model="loss", eval_strategy="steps", eval_steps=3),
    ],
    ids=["steps", "steps-ratio", "epoch", "no", "best-eval-loss"],
)
def test_each_save_strategy_writes_the_stock_checkpoints(tmp_path: Path, args: dict[str, Any]) -> None:
    stock, ours = both(tmp_path, lambda run: run.train(**args))

    assert_same_observations(stock, ours)


@pytest.mark.parametrize(
    ("metric", "values", "greater_is_better"),
    [("scripted_loss", LOWER_IS_BETTER, None), ("accuracy", HIGHER_IS_BETTER, True)],
    ids=["loss-like", "accuracy-like"],
)
def test_best_strategy_saves_at_each_new_best_only(
    tmp_path: Path, metric: str, values: dict[int, float], greater_is_better: bool | None,
) -> None:
    stock, ours = both(tmp_path, lambda run: scripted_run(run, metric, values, save_strategy="best",
                                                          greater_is_better=greater_is_better))

    assert stock.steps == [4, 8]  # the stock half's own expectation: a save at each new best
    assert_same_observations(stock, ours)


@pytest.mark.parametrize(
    ("args", "expected_steps"),
    [
        (dict(save_strategy="steps", save_total_limit=2), [12, 15]),
        (dict(save_strategy="steps", save_total_limit=1), [15]),
        (dict(save_strategy="epoch", save_total_limit=1), [15]),
    ],
    ids=["steps-limit2", "steps-limit1", "epoch-limit1"],
)
def test_rotation_without_a_best_keeps_the_newest(tmp_path: Path, args: dict[str, Any], expected_steps: list[int]) -> None:
    stock, ours = both(tmp_path, lambda run: run.train(**args))

    assert stock.steps == expected_steps
    assert_same_observations(stock, ours)


@pytest.mark.parametrize(
    ("limit", "expected_steps"),
    [(2, [8, 15]), (1, [8])],  # limit 1: the stock end of training deletes all but the best
    ids=["limit2", "limit1"],
)
def test_rotation_with_a_best_keeps_the_best(tmp_path: Path, limit: int, expected_steps: list[int]) -> None:
    stock, ours = both(tmp_path, lambda run: scripted_run(run, save_total_limit=limit))

    assert stock.steps == expected_steps and stock.best[1] == 8
    assert_same_observations(stock, ours)


@pytest.mark.parametrize(
    ("metric", "values", "greater_is_better"),
    [
        (None, None, None),  # TrainingArguments' default: metric "loss", the real eval loss
        ("scripted_loss", LOWER_IS_BETTER, None),  # greater_is_better inferred False from the name
        ("accuracy", HIGHER_IS_BETTER, True),
    ],
    ids=["eval-loss", "loss-like", "accuracy-like"],
)
def test_load_best_model_at_end_loads_the_stock_best(
    tmp_path: Path, metric: str | None, values: dict[int, float] | None, greater_is_better: bool | None,
) -> None:
    def scenario(run: Run) -> None:
        metrics = Scripted(metric, values) if metric is not None else None
        run.train(compute_metrics=metrics, metric_for_best_model=metric, greater_is_better=greater_is_better,
                  load_best_model_at_end=True, save_total_limit=2, **EVALUATE)

    stock, ours = both(tmp_path, scenario)

    best = stock.best[0]
    assert best is not None
    assert_holds_checkpoint_weights(stock, Path(best).name)  # the stock half's own expectation
    assert_same_observations(stock, ours)


def test_load_best_model_at_end_given_to_the_callback_only_ends_with_the_stock_best(tmp_path: Path) -> None:
    """The flags moved from TrainingArguments to the callback: the same checkpoints, and the same best weights at
    the end (the callback loads them itself). `trainer.state.best_*` is not compared: the Trainer tracks no
    best when it has no metric."""
    flags = dict(metric_for_best_model="scripted_loss", load_best_model_at_end=True)

    def scenario(run: Run) -> None:
        metrics = Scripted("scripted_loss", LOWER_IS_BETTER)
        if run.with_callback:
            run.train(compute_metrics=metrics, callback_flags=flags, **EVALUATE)
        else:
            run.train(compute_metrics=metrics, **flags, **EVALUATE)

    stock, ours = both(tmp_path, scenario)

    assert stock.best[1] == 8
    assert_same_checkpoint_files(stock, ours)
    assert_same_checkpoint_contents(stock, ours)  # training_args.bin records the flags the run saved with
    assert_same_final_model(stock, ours)


SECOND_EVAL = RandomTokens(12, seed=2)  # a different size than EVAL: `Scripted` tells them apart


@pytest.mark.parametrize("metric_of", ["first", "second"])
@pytest.mark.parametrize(
    "args", [dict(save_total_limit=1), dict(save_total_limit=2, load_best_model_at_end=True)],
    ids=["limit1", "limit2-load-best"],
)
def test_best_of_one_of_several_eval_datasets_is_kept_and_loaded(
    tmp_path: Path, metric_of: str, args: dict[str, Any],
) -> None:
    # The metric of one dataset ranks checkpoints (the Trainer's docs: metric_for_best_model="eval_first_score").
    scripts = {len(EVAL): LOWER_IS_BETTER if metric_of == "first" else {},
               len(SECOND_EVAL): LOWER_IS_BETTER if metric_of == "second" else {}}

    def scenario(run: Run) -> None:
        run.train(eval_dataset={"first": EVAL, "second": SECOND_EVAL}, compute_metrics=Scripted("score", scripts),
                  metric_for_best_model=f"eval_{metric_of}_score", greater_is_better=False, **EVALUATE, **args)

    stock, ours = both(tmp_path, scenario)

    assert stock.error is None and stock.best[1] == 8
    assert_same_observations(stock, ours)


class AddsMetricTrainer(Trainer):
    """A Trainer subclass whose `evaluate()` adds the metric that ranks checkpoints, after the callbacks ran."""

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        metrics["eval_custom_loss"] = LOWER_IS_BETTER[self.state.global_step]
        return metrics


@pytest.mark.parametrize(
    "args", [dict(save_total_limit=1), dict(save_total_limit=2, load_best_model_at_end=True)],
    ids=["limit1", "limit2-load-best"],
)
def test_best_from_a_metric_a_trainer_subclass_adds_is_kept_and_loaded(tmp_path: Path, args: dict[str, Any]) -> None:
    def scenario(run: Run) -> None:
        run.train(trainer_class=AddsMetricTrainer, metric_for_best_model="custom_loss", **EVALUATE, **args)

    stock, ours = both(tmp_path, scenario)

    assert stock.error is None and stock.best[1] == 8
    assert_same_observations(stock, ours)


@pytest.mark.parametrize("given_to", ["TrainingArguments", "callback"])
def test_save_only_model_writes_the_stock_weights_only_checkpoints(tmp_path: Path, given_to: str) -> None:
    def scenario(run: Run) -> None:
        if run.with_callback and given_to == "callback":
            run.train(callback_flags=dict(save_only_model=True))
        else:
            run.train(save_only_model=True)

    stock, ours = both(tmp_path, scenario)

    assert "optimizer.pt" not in stock.checkpoints["checkpoint-4"]
    assert_same_observations(stock, ours)


def test_frozen_parameters_are_saved_and_trained_as_stock(tmp_path: Path) -> None:
    stock, ours = both(tmp_path, lambda run: run.train(model=frozen_embeddings_and_first_block))

    assert_same_observations(stock, ours)


def callback_only_metric_scenario(trainer_options: dict[str, Any], metric: str,
                                  greater_is_better: bool | None = None) -> Scenario:
    """`load_best_model_at_end` and the metric that ranks checkpoints given to the stock Trainer, or moved to the
    callback (the Trainer then tracks no best: the callback ranks the checkpoints itself)."""
    flags: dict[str, Any] = dict(metric_for_best_model=metric, load_best_model_at_end=True)
    if greater_is_better is not None:
        flags["greater_is_better"] = greater_is_better

    def scenario(run: Run) -> None:
        if run.with_callback:
            run.train(callback_flags=flags, **trainer_options, **EVALUATE)
        else:
            run.train(**flags, **trainer_options, **EVALUATE)

    return scenario


@pytest.mark.parametrize("source", ["several-eval-datasets", "trainer-subclass"])
def test_a_metric_given_to_the_callback_only_ranks_as_the_stock_trainer_ranks_it(
    tmp_path: Path, source: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """The metric reaches the callback whole, whatever path it took: the second of two eval datasets, or a
    Trainer subclass whose `evaluate()` adds it after the callbacks ran. Same checkpoints, same best weights
    loaded at the end, and no warning (the metric is not missing)."""
    if source == "several-eval-datasets":
        options: dict[str, Any] = dict(eval_dataset={"first": EVAL, "second": SECOND_EVAL},
                                       compute_metrics=Scripted("score", {len(EVAL): {}, len(SECOND_EVAL): LOWER_IS_BETTER}))
        scenario = callback_only_metric_scenario(options, "eval_second_score", greater_is_better=False)
    else:
        scenario = callback_only_metric_scenario(dict(trainer_class=AddsMetricTrainer), "custom_loss")

    with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
        stock, ours = both(tmp_path, scenario)

    assert stock.error is None and stock.best[1] == 8
    assert ours.error is None, ours.error
    assert_same_checkpoint_files(stock, ours)
    assert_same_checkpoint_contents(stock, ours)
    assert_same_final_model(stock, ours)
    assert_holds_checkpoint_weights(ours, 8)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("ckpt_callbacks")]
    assert not warnings, warnings


def evaluate_patched(values: dict[int, float], metric: str) -> Scenario:
    """transformers' own checkpoint tests patch `trainer._evaluate` on the instance: no evaluation runs and no
    `on_evaluate` fires, but the Trainer still ranks the metrics the patch returns."""
    def scenario(run: Run, **args: Any) -> None:
        trainer = run.trainer(metric_for_best_model=metric, **{**EVALUATE, **args})

        def scripted(*_: Any, **__: Any) -> dict[str, float]:
            return {f"eval_{metric}": values[trainer.state.global_step], "epoch": trainer.state.epoch or 0.0}

        with patch.object(trainer, "_evaluate", side_effect=scripted):
            trainer.train()
    return scenario


@pytest.mark.parametrize(
    "args", [dict(save_total_limit=1), dict(save_total_limit=2, load_best_model_at_end=True)],
    ids=["limit1", "limit2-load-best"],
)
def test_the_trainers_best_is_kept_and_loaded_when_its_evaluate_is_patched(tmp_path: Path, args: dict[str, Any]) -> None:
    patched = evaluate_patched(LOWER_IS_BETTER, "scripted_loss")
    stock, ours = both(tmp_path, lambda run: patched(run, **args))

    assert stock.error is None and stock.best[1] == 8
    assert_same_observations(stock, ours)
    if args.get("load_best_model_at_end"):
        assert_holds_checkpoint_weights(ours, 8)


@pytest.mark.parametrize("given_to", ["TrainingArguments", "callback"])
def test_an_evaluation_before_the_first_step_ranks_nothing_as_stock(tmp_path: Path, given_to: str) -> None:
    """`eval_on_start=True`: stock evaluates before the first step but ranks nothing there (no best, no save),
    so the untrained model's better score does not stop the saves at the later new bests."""
    values = {0: 0.5, **LOWER_IS_BETTER}
    flags = dict(save_strategy="best", metric_for_best_model="scripted_loss")

    def scenario(run: Run) -> None:
        options: dict[str, Any] = dict(compute_metrics=Scripted("scripted_loss", values), eval_on_start=True,
                                       eval_strategy="steps", eval_steps=4)
        if run.with_callback and given_to == "callback":
            run.train(save_strategy="no", callback_flags=flags, **options)
        else:
            run.train(**flags, **options)

    stock, ours = both(tmp_path, scenario)

    assert stock.steps == [4, 8]  # the stock half's own expectation: step 0 ranked nothing
    if given_to == "TrainingArguments":
        assert_same_observations(stock, ours)
    else:  # the Trainer tracks no best when the metric is the callback's
        assert_same_checkpoint_files(stock, ours)
        assert_same_final_model(stock, ours)
