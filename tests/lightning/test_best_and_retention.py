"""Best tracking from validation metrics, `ckpt_path="best"`, `load_from_checkpoint(best_model_path)`, retention."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lightning.helpers import (
    Namespace,
    checkpoint_steps,
    seed_everything,
    tensors_equal,
    train_loader,
    val_loader,
    weight_recorder,
    weights_of,
)

# Scripted validation loss per epoch: epoch 1 (global step 20) is the best, epoch 3 (step 40) the second best.
VAL_LOSSES = (0.5, 0.2, 0.4, 0.3, 0.6)
BEST_ARGS = {"save_strategy": "epoch", "metric_for_best_model": "val_loss"}


def fit_epochs(ns: Namespace, root: Path, *, ckpt_path: str | None = None, **args: Any) -> tuple[Any, Any, Any]:
    seed_everything(0)
    module = ns.Tiny(val_losses=VAL_LOSSES)
    plugin, callback = ns.ours(root, **{**BEST_ARGS, **args})
    recorder = weight_recorder(ns)
    trainer = ns.trainer(root, callbacks=[callback, recorder], plugins=[plugin], max_epochs=len(VAL_LOSSES))
    trainer.fit(module, train_loader(), val_loader(), ckpt_path=ckpt_path)
    return module, callback, recorder


@pytest.mark.parametrize(
    ("limits", "kept"),
    [({"save_total_limit": 2}, [20, 50]), ({"save_total_limit": 1, "save_best_limit": 2}, [20, 40, 50])],
    ids=["total_limit", "best_limit"],
)
def test_retention_leaves_exactly_the_expected_checkpoints(
    ns: Namespace, tmp_path: Path, limits: dict[str, int], kept: list[int]
) -> None:
    _, callback, _ = fit_epochs(ns, tmp_path, **limits)
    output_dir = tmp_path / "checkpoints"
    assert checkpoint_steps(output_dir) == kept
    assert sorted(os.listdir(output_dir)) == [f"checkpoint-{s}" for s in kept]  # the writer lock is gone after fit
    for step in kept:
        assert sorted(os.listdir(output_dir / f"checkpoint-{step}")) == ["checkpoint.ckpt", "manifest.json"]
    assert callback.best_model_path == str(output_dir / "checkpoint-20" / "checkpoint.ckpt")
    assert callback.last_model_path == str(output_dir / "checkpoint-50" / "checkpoint.ckpt")
    assert callback.best_model_score == pytest.approx(torch.tensor(0.2))


def test_best_model_path_loads_and_fit_resumes_from_the_best_epoch(ns: Namespace, tmp_path: Path) -> None:
    _, callback, recorder = fit_epochs(ns, tmp_path, save_total_limit=2)
    best_weights = recorder.weights[20]

    loaded = ns.Tiny.load_from_checkpoint(callback.best_model_path)
    assert tensors_equal(weights_of(loaded), best_weights)
    assert loaded.hparams.val_losses == VAL_LOSSES  # plain hyperparameters survive weights_only loading

    # A new Trainer and callback, as in a new process: "best" resolves from the manifests on disk.
    _, resumed_callback, resumed = fit_epochs(ns, tmp_path, ckpt_path="best", save_total_limit=2)
    assert resumed.start_step == 20
    assert tensors_equal(resumed.start_weights, best_weights)
    assert resumed_callback.manager.resumed_from_step == 20


def test_load_best_model_at_end_restores_and_exports_the_best_weights(ns: Namespace, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    module, callback, recorder = fit_epochs(ns, tmp_path, load_best_model_at_end=True, export_at_end=True)
    assert tensors_equal(weights_of(module), recorder.weights[20])
    exported = load_file(tmp_path / "checkpoints" / "export" / "model.safetensors")
    assert tensors_equal(exported, recorder.weights[20])


def test_best_strategy_saves_only_on_improvement(ns: Namespace, tmp_path: Path) -> None:
    fit_epochs(ns, tmp_path, save_strategy="best")
    # new bests at epochs 0 and 1 only; as with ModelCheckpoint(monitor=..., save_top_k=1), no extra save at the end
    assert checkpoint_steps(tmp_path / "checkpoints") == [10, 20]
