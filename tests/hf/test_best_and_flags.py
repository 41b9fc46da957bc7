"""Best tracking, retention and load_best_model_at_end; flags taken from TrainingArguments or overridden."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import ScriptedMetric, checkpoint_steps, make_trainer

# Evaluations every 2 steps (2, 4, ..., 14, and the final step 15); lower is better.
SCORES = [5, 3, 4, 1, 2.5, 2, 1.5, 1.8]  # the best evaluation is at step 8
EVALUATE = dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="score", greater_is_better=False)


def train(output_dir: Path, callbacks: list[Any], **flags: Any) -> Any:
    trainer = make_trainer(output_dir, callbacks, **flags)
    trainer.compute_metrics = ScriptedMetric(SCORES)
    trainer.train()
    return trainer


def best_model_checkpoint(checkpoint: Path) -> str | None:
    return json.loads((checkpoint / "trainer_state.json").read_text())["best_model_checkpoint"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("flags", "expected_steps"),
    [
        (dict(save_strategy="best", save_total_limit=2), [4, 8]),  # saves at new bests only: 2, 4, 8
        (dict(save_strategy="steps", save_steps=4, save_total_limit=2), [8, 15]),  # the best and the newest
        (dict(save_strategy="steps", save_steps=4, save_total_limit=1), [8]),  # the stock end-of-training cleanup
    ],
    ids=["best-limit2", "steps-limit2", "steps-limit1"],
)
def test_folders_left_are_exactly_those_the_stock_trainer_leaves(
    tmp_path: Path, flags: dict[str, Any], expected_steps: list[int],
) -> None:
    stock = train(tmp_path / "stock", [], **EVALUATE, **flags)
    ours = train(tmp_path / "ours", [CheckpointCallback(export_at_end=False)], **EVALUATE, **flags)

    assert checkpoint_steps(tmp_path / "ours") == checkpoint_steps(tmp_path / "stock") == expected_steps
    # Before transformers 5.4, the stock Trainer leaves best_model_checkpoint unset under save_strategy="best".
    stock_tracks_best = flags["save_strategy"] != "best" or Version(transformers.__version__) >= Version("5.4")
    expected_best = str(tmp_path / "ours" / "checkpoint-8") if stock_tracks_best else None
    assert stock.state.best_model_checkpoint == (expected_best and expected_best.replace("/ours/", "/stock/"))
    assert ours.state.best_model_checkpoint == expected_best
    assert best_model_checkpoint(tmp_path / "ours" / f"checkpoint-{expected_steps[-1]}") == ours.state.best_model_checkpoint


@pytest.mark.parametrize("flag_source", ["TrainingArguments", "CheckpointCallback"])
def test_load_best_model_at_end_restores_the_best_checkpoint_weights(tmp_path: Path, flag_source: str) -> None:
    if flag_source == "TrainingArguments":  # the stock _load_best_model reads our checkpoint
        trainer = train(tmp_path, [CheckpointCallback()], load_best_model_at_end=True, **EVALUATE)
    else:  # the callback loads it
        trainer = train(tmp_path, [CheckpointCallback(load_best_model_at_end=True)], **EVALUATE)

    best = load_file(tmp_path / "checkpoint-8" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-15" / "model.safetensors")
    live = trainer.model.state_dict()
    assert all(torch.equal(live[name], tensor) for name, tensor in best.items())
    assert not all(torch.equal(live[name], tensor) for name, tensor in last.items())
    exported = load_file(tmp_path / "export" / "model.safetensors")
    assert exported.keys() == best.keys() and all(torch.equal(exported[k], best[k]) for k in best)


@pytest.mark.parametrize(
    ("trainer_flags", "callback_flags", "expected_steps"),
    [
        (dict(save_strategy="steps", save_steps=4), dict(save_steps=5), [5, 10, 15]),
        (dict(save_strategy="no"), dict(save_strategy="epoch"), [5, 10, 15]),
        (dict(save_strategy="no", eval_strategy="steps", eval_steps=2),
         dict(save_strategy="best", metric_for_best_model="score", greater_is_better=False), [2, 4, 8]),
    ],
    ids=["save_steps", "epoch-over-no", "best-over-no"],
)
def test_callback_flags_override_training_arguments(
    tmp_path: Path, stock_save_calls: list[int], trainer_flags: dict[str, Any], callback_flags: dict[str, Any],
    expected_steps: list[int],
) -> None:
    train(tmp_path, [CheckpointCallback(CheckpointArguments(export_at_end=False, **callback_flags))], **trainer_flags)

    assert checkpoint_steps(tmp_path) == expected_steps
    assert stock_save_calls == []
    if callback_flags.get("save_strategy") == "best":
        assert best_model_checkpoint(tmp_path / "checkpoint-8") == str(tmp_path / "checkpoint-8")


def test_a_strategy_the_trainer_would_overrule_is_refused_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="save_strategy='no'"):
        make_trainer(tmp_path, [CheckpointCallback(save_strategy="steps")], save_strategy="best", **EVALUATE)


def test_unknown_flags_are_refused_with_the_valid_names() -> None:
    with pytest.raises(TypeError, match="save_stepz.*save_steps"):
        CheckpointCallback(save_stepz=10)


def test_save_time_interval_adds_saves_to_the_trainer_strategy(tmp_path: Path) -> None:
    train(tmp_path, [CheckpointCallback(save_time_interval=1e-9, export_at_end=False)], save_strategy="no", max_steps=3)
    assert checkpoint_steps(tmp_path) == [1, 2, 3]


def test_save_only_model_writes_weights_and_state_but_no_training_state(tmp_path: Path) -> None:
    train(tmp_path / "stock", [], save_only_model=True, max_steps=4)
    train(tmp_path / "ours", [CheckpointCallback(export_at_end=False)], save_only_model=True, max_steps=4)

    stock_files = {p.name for p in (tmp_path / "stock" / "checkpoint-4").iterdir()}
    our_files = {p.name for p in (tmp_path / "ours" / "checkpoint-4").iterdir()}
    assert stock_files <= our_files
    assert {"optimizer.pt", "scheduler.pt"}.isdisjoint(our_files)
