"""Crash mid-run, resume with fit(ckpt_path="last"): bitwise the uninterrupted run. Stock Lightning is not.

The model has dropout, the loader shuffles, the optimizer is Adam and the learning rate follows a per-step
StepLR; the resumed process seeds differently, so only the checkpoint can make it match.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.lightning.helpers import (
    Namespace,
    SimulatedCrash,
    crash_callback,
    seed_everything,
    tensors_equal,
    train_loader,
    training_state,
    val_loader,
)


@dataclass(frozen=True)
class Scenario:
    """Where the checkpoint is taken and how the data arrives."""

    args: dict[str, Any]
    crash_at: int
    resumed_from: int
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)
    num_workers: int = 0
    datamodule: bool = False


SCENARIOS = {
    # the checkpoint of step 15 is taken in the middle of epoch 1 (10 batches per epoch)
    "mid_epoch": Scenario({"save_steps": 5}, crash_at=17, resumed_from=15),
    # step 10 is the last batch of epoch 0: saved before that epoch's validation, which Lightning then skips
    "epoch_boundary": Scenario({"save_steps": 10}, crash_at=12, resumed_from=10),
    "epoch_boundary_without_validation": Scenario({"save_steps": 10}, crash_at=12, resumed_from=10,
                                                  trainer_kwargs={"limit_val_batches": 0}),
    "epoch_strategy": Scenario({"save_strategy": "epoch"}, crash_at=12, resumed_from=10),
    # validation every 5 batches: the due save waits for it, so the checkpoint carries its metrics
    "mid_epoch_validation": Scenario({"save_steps": 5}, crash_at=17, resumed_from=15,
                                     trainer_kwargs={"val_check_interval": 5}),
    "best_strategy": Scenario({"save_strategy": "best", "metric_for_best_model": "val_loss"}, crash_at=17,
                              resumed_from=-1, trainer_kwargs={"val_check_interval": 5}),
    # loaders from a DataModule exist only once fit has started
    "datamodule": Scenario({"save_steps": 5}, crash_at=17, resumed_from=15, datamodule=True),
    "workers": Scenario({"save_steps": 5}, crash_at=13, resumed_from=10, num_workers=2),
    "datamodule_workers": Scenario({"save_steps": 5}, crash_at=17, resumed_from=15, datamodule=True, num_workers=2),
}


@dataclass
class Run:
    trainer: Any
    module: Any
    callback: Any


def fit_ours(ns: Namespace, root: Path, scenario: Scenario, *, seed: int, crash_at: int | None = None,
             ckpt_path: str | None = None, async_save: bool = False) -> Run:
    seed_everything(seed)
    module = ns.Tiny()
    plugin, callback = ns.ours(root, async_save=async_save, **scenario.args)
    callbacks = [callback] + ([crash_callback(ns, crash_at)] if crash_at is not None else [])
    trainer = ns.trainer(root, callbacks=callbacks, plugins=[plugin], **scenario.trainer_kwargs)
    if scenario.datamodule:
        data = {"datamodule": ns.pl.LightningDataModule.from_datasets(
            train_loader().dataset, val_loader().dataset, batch_size=4)}
        data["datamodule"].train_dataloader = lambda: train_loader(scenario.num_workers)
    else:
        data = {"train_dataloaders": train_loader(scenario.num_workers), "val_dataloaders": val_loader()}
    try:
        trainer.fit(module, ckpt_path=ckpt_path, **data)
    except SimulatedCrash:
        assert crash_at is not None
    return Run(trainer, module, callback)


def crash_and_resume(ns: Namespace, root: Path, scenario: Scenario, *, async_save: bool) -> tuple[Run, Run]:
    crashed = fit_ours(ns, root, scenario, seed=0, crash_at=scenario.crash_at, async_save=async_save)
    latest = crashed.callback.manager.latest()
    assert latest is not None and Path(crashed.callback.ckpt_path) == Path(latest.path) / "checkpoint.ckpt"
    # a new process would start from a different seed: only the checkpoint may make the runs agree
    resumed = fit_ours(ns, root, scenario, seed=12345, ckpt_path="last", async_save=async_save)
    assert resumed.callback.manager.resumed_from_step == latest.step
    return crashed, resumed


def assert_same_training(reference: Run, crashed: Run, resumed: Run, resumed_from: int) -> None:
    batches_before_checkpoint = crashed.module.seen[:resumed_from]
    assert batches_before_checkpoint + resumed.module.seen == reference.module.seen, "data order differs"
    expected, actual = training_state(reference.trainer), training_state(resumed.trainer)
    for part in ("weights", "optimizer", "scheduler", "global_step"):
        assert tensors_equal(expected[part], actual[part]), f"{part} differs from the uninterrupted run"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_mid_epoch_is_bitwise_exact(ns: Namespace, tmp_path: Path, async_save: bool) -> None:
    scenario = SCENARIOS["mid_epoch"]
    reference = fit_ours(ns, tmp_path / "reference", scenario, seed=0, async_save=async_save)
    crashed, resumed = crash_and_resume(ns, tmp_path / "run", scenario, async_save=async_save)
    # the crash came after step 17; the background write of step 15 was flushed on the way out
    assert resumed.callback.manager.resumed_from_step == 15
    assert_same_training(reference, crashed, resumed, resumed_from=15)


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n != "mid_epoch"])
def test_resume_is_bitwise_exact_wherever_the_checkpoint_was_taken(ns: Namespace, tmp_path: Path, name: str) -> None:
    scenario = SCENARIOS[name]
    reference = fit_ours(ns, tmp_path / "reference", scenario, seed=0)
    crashed, resumed = crash_and_resume(ns, tmp_path / "run", scenario, async_save=False)
    resumed_from = resumed.callback.manager.resumed_from_step
    assert resumed_from is not None and resumed_from < scenario.crash_at
    if scenario.resumed_from >= 0:
        assert resumed_from == scenario.resumed_from
    assert_same_training(reference, crashed, resumed, resumed_from=resumed_from)


def test_checkpoint_saved_after_mid_epoch_validation_records_its_metric(ns: Namespace, tmp_path: Path) -> None:
    run = fit_ours(ns, tmp_path, SCENARIOS["mid_epoch_validation"], seed=0)
    metrics = {info.step: info.metrics for info in run.callback.manager.list()}
    assert sorted(metrics) == [5, 10, 15, 20, 25, 30]
    assert all("val_loss" in m for m in metrics.values()), metrics


def stock_run(ns: Namespace, root: Path, *, crash_at: int | None = None, ckpt_path: str | None = None) -> Run:
    seed_everything(0)  # the best a stock user can do: the same seed again
    module = ns.Tiny()
    checkpoint = ns.callback_class("ModelCheckpoint")(
        dirpath=str(root / "checkpoints"), every_n_train_steps=5, save_top_k=-1, save_last=True)
    callbacks = [checkpoint] + ([crash_callback(ns, crash_at)] if crash_at is not None else [])
    trainer = ns.trainer(root, callbacks=callbacks)  # default TorchCheckpointIO
    try:
        trainer.fit(module, train_loader(), val_loader(), ckpt_path=ckpt_path)
    except SimulatedCrash:
        assert crash_at is not None
    return Run(trainer, module, checkpoint)


def test_stock_model_checkpoint_with_torch_checkpoint_io_does_not_resume_exactly(ns: Namespace, tmp_path: Path) -> None:
    reference = stock_run(ns, tmp_path / "reference")
    crashed = stock_run(ns, tmp_path / "run", crash_at=17)
    assert Path(crashed.callback.last_model_path).name == "last.ckpt"
    resumed = stock_run(ns, tmp_path / "run", ckpt_path="last")
    expected, actual = training_state(reference.trainer), training_state(resumed.trainer)
    assert actual["global_step"] == expected["global_step"] == 30  # the step count is right...
    assert crashed.module.seen[:15] + resumed.module.seen != reference.module.seen  # ...the data is not
    assert not tensors_equal(expected["weights"], actual["weights"])
    assert not tensors_equal(expected["optimizer"], actual["optimizer"])


@pytest.mark.parametrize("stop_at", [9, 10, 11], ids=["before_last_batch", "last_batch", "first_batch"])
def test_preemption_around_an_epoch_end_resumes_exactly(ns: Namespace, tmp_path: Path, stop_at: int) -> None:
    """SIGUSR1 during the step that ends epoch 0 (10 batches per epoch, validation at each epoch end): the
    save waits for that validation, so the resumed run does not replay it with other random draws."""
    scenario = Scenario({"save_steps": 100}, crash_at=-1, resumed_from=stop_at)

    class Preempt(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == stop_at:
                os.kill(os.getpid(), signal.SIGUSR1)

    reference = fit_ours(ns, tmp_path / "reference", scenario, seed=0)
    seed_everything(0)
    module = ns.Tiny()
    plugin, callback = ns.ours(tmp_path / "run", **scenario.args)
    stopped = ns.trainer(tmp_path / "run", callbacks=[callback, Preempt()], plugins=[plugin])
    stopped.fit(module, train_loader(), val_loader())
    assert callback.preempted and stopped.global_step == stop_at
    resumed = fit_ours(ns, tmp_path / "run", scenario, seed=12345, ckpt_path="last")
    assert resumed.callback.manager.resumed_from_step == stop_at
    expected, actual = training_state(reference.trainer), training_state(resumed.trainer)
    for part in ("weights", "optimizer", "scheduler", "global_step"):
        assert tensors_equal(expected[part], actual[part]), f"{part} differs from the uninterrupted run"
