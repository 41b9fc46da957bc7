"""`CheckpointCallback` (with the plugin) in place of `ModelCheckpoint`, configured as docs/migration.md maps it,
saves the same steps, names the same best and last checkpoints, resumes the same way, and trains the same.

The layout differs by design (`checkpoint-{step}/checkpoint.ckpt` plus `manifest.json`), so the comparison is by
step, not by file name. Modules here are deterministic (no dropout, no shuffling) unless a test is about the RNG,
so that runs can be compared weight for weight.
"""

from __future__ import annotations

import io
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointError
from tests.lightning.helpers import Namespace
from tests.parity.lightning.differential import (
    Outcome,
    Run,
    SimulatedCrash,
    assert_callback_parity,
    assert_same,
    crash_at,
    differences,
    differential,
    saved_steps,
    step_of,
)


def stock_and_ours(ns: Namespace, tmp_path: Path, scenario: Any, **kwargs: Any) -> tuple[Outcome, Outcome]:
    stock, ours = differential(ns, tmp_path, scenario, flavors=("stock", "ours"), **kwargs)
    assert all(fit.error is None or isinstance(fit.error, SimulatedCrash) for fit in stock.fits), (
        f"the stock half failed on its own: {[fit.error for fit in stock.fits]}")
    return stock, ours


# --------------------------------------------------------------------------- when to save


@pytest.mark.parametrize(("stock_args", "our_args", "epochs", "expected"), [
    ({"every_n_train_steps": 5}, {"save_steps": 5}, 2, [5, 10, 15, 20]),
    ({"every_n_train_steps": 6}, {"save_steps": 6}, 2, [6, 12, 18]),  # the run's last step (20) is no multiple
    ({"every_n_epochs": 1}, {"save_strategy": "epoch"}, 3, [10, 20, 30]),
    ({"train_time_interval": timedelta(0)}, {"save_strategy": "no", "save_time_interval": 1e-9}, 1, list(range(1, 11))),
], ids=["every_n_train_steps", "every_n_train_steps-not-dividing", "every_n_epochs", "train_time_interval"])
def test_saves_where_model_checkpoint_saves(ns: Namespace, tmp_path: Path, stock_args: dict[str, Any],
                                            our_args: dict[str, Any], epochs: int, expected: list[int]) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"save_top_k": -1, "save_last": True, **stock_args}, our_args)
        run.fit(run.trainer([checkpoint], max_epochs=epochs), run.module())

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == expected
    assert_callback_parity(stock, ours, best=False)


def test_accumulated_gradients_save_on_the_same_optimizer_steps(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"every_n_train_steps": 3, "save_top_k": -1, "save_last": True},
                                       {"save_steps": 3})
        run.fit(run.trainer([checkpoint], max_epochs=3, accumulate_grad_batches=2), run.module())

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == [3, 6, 9, 12, 15]
    assert_callback_parity(stock, ours, best=False)


def test_manual_optimization_with_two_optimizers_saves_where_every_n_train_steps_does(
    ns: Namespace, tmp_path: Path,
) -> None:
    """Issue 15, defect 5: global_step counts optimizer steps (2 per batch), not batches."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"every_n_train_steps": 6, "save_top_k": -1, "save_last": True},
                                       {"save_steps": 6})
        run.fit(run.trainer([checkpoint], max_epochs=3), run.module(manual=True))

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == list(range(6, 61, 6))
    assert_callback_parity(stock, ours, best=False)


def test_step_saves_wait_for_the_validation_metric(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing(
            {"monitor": "val_loss", "every_n_train_steps": 5, "save_top_k": -1, "save_last": True},
            {"save_steps": 5, "metric_for_best_model": "val_loss"})
        run.fit(run.trainer([checkpoint], max_epochs=2, val_check_interval=0.5), run.module())

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == [5, 10, 15, 20]
    assert_callback_parity(stock, ours)


# --------------------------------------------------------------------------- best and last


def test_monitored_top_k_keeps_the_same_best_checkpoints(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing(
            {"monitor": "val_loss", "mode": "min", "save_top_k": 2, "save_last": True},
            {"save_strategy": "epoch", "metric_for_best_model": "val_loss", "greater_is_better": False,
             "save_best_limit": 2, "save_total_limit": 1})
        run.fit(run.trainer([checkpoint], max_epochs=4), run.module(val_losses=(3, 1, 2, 0.5)))

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == [20, 40]
    assert step_of(stock, stock.callbacks[0]["best_model_path"]) == 40
    assert_callback_parity(stock, ours)


def test_last_is_the_newest_checkpoint_where_stock_last_goes_stale(ns: Namespace, tmp_path: Path) -> None:
    """Deliberately better (docs/migration.md, `save_last=True` row): since Lightning 2.6, `last.ckpt` is only
    rewritten together with a top-k save, so after an epoch that is not in the top k it names an older step."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing(
            {"monitor": "val_loss", "save_top_k": 2, "save_last": True},
            {"save_strategy": "epoch", "metric_for_best_model": "val_loss", "save_best_limit": 2, "save_total_limit": 1})
        run.fit(run.trainer([checkpoint], max_epochs=5), run.module(val_losses=(3, 1, 2, 0.5, 4)))

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert step_of(stock, stock.callbacks[0]["last_model_path"]) == 40
    assert step_of(ours, ours.callbacks[0]["last_model_path"]) == 50
    assert step_of(ours, ours.callbacks[0]["best_model_path"]) == step_of(stock, stock.callbacks[0]["best_model_path"])


def test_best_model_path_without_a_monitor_is_the_newest_checkpoint(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 6: stock `ModelCheckpoint(monitor=None)` points best at its newest checkpoint, and
    `ckpt_path="best"` resumes from it."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"every_n_train_steps": 5, "save_last": True},
                                       {"save_steps": 5, "save_total_limit": 1})
        trainer = run.trainer([checkpoint], max_epochs=2)
        module = run.module()
        run.fit(trainer, module)
        run.extra["best after fit"] = checkpoint.best_model_path
        trainer.fit_loop.max_epochs = 3
        run.fit(trainer, module, ckpt_path="best")

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert step_of(stock, stock.extra["best after fit"]) == 20 and stock.fits[1].start_step == 20
    assert step_of(ours, ours.extra["best after fit"]) == 20, f"ours: {ours.extra['best after fit']!r}"
    assert_callback_parity(stock, ours)


# --------------------------------------------------------------------------- ckpt_path and a second fit


@pytest.mark.parametrize("ckpt_path", ["last", "best", "path", None])
def test_ckpt_path_means_what_it_means_with_model_checkpoint(ns: Namespace, tmp_path: Path,
                                                             ckpt_path: str | None) -> None:
    """Issue 15, defect 3 (for None): a new Trainer resumes from "last", "best" (the first Trainer's, see the
    plugin test) or a path, and from nothing with `ckpt_path=None`."""
    losses = (1, 3, 2, 0.5)  # after 3 epochs: best is step 10, last step 30

    def scenario(run: Run) -> None:
        def checkpoint() -> Any:
            return run.checkpointing({"monitor": "val_loss", "save_top_k": -1, "save_last": True},
                                     {"save_strategy": "epoch", "metric_for_best_model": "val_loss"})

        first = run.trainer([checkpoint()], max_epochs=3)
        run.fit(first, run.module(val_losses=losses))
        steps = {step: path for step, path in _paths_by_step(run).items()}
        path = str(steps[20]) if ckpt_path == "path" else ckpt_path
        second = first if ckpt_path == "best" else run.trainer([checkpoint()], max_epochs=4)
        second.fit_loop.max_epochs = 4
        run.fit(second, run.module(val_losses=losses), ckpt_path=path)

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert stock.fits[1].start_step == {"last": 30, "best": 10, "path": 20, None: 0}[ckpt_path]
    assert_callback_parity(stock, ours, best=False)


def _paths_by_step(run: Run) -> dict[int, Path]:
    found = {}
    for path in sorted(run.dirpath.rglob("*.ckpt")):
        if not path.name.startswith("last"):
            found.setdefault(int(torch.load(path, weights_only=True)["global_step"]), path)
    return found


@pytest.mark.parametrize(("stock_args", "our_args"), [
    ({}, {"save_strategy": "epoch"}),  # ModelCheckpoint's default: every epoch, the newest kept
    ({"every_n_train_steps": 10}, {"save_steps": 10}),  # steps dividing the epoch
], ids=["every-epoch", "steps-dividing-the-epoch"])
def test_a_second_fit_on_the_same_trainer_trains_the_extra_epoch(ns: Namespace, tmp_path: Path,
                                                                 stock_args: dict[str, Any],
                                                                 our_args: dict[str, Any]) -> None:
    """Issue 15, defect 3: `fit_loop.max_epochs += 1; trainer.fit(model)` trains one more epoch, from the
    module's weights in memory and new optimizers (stock Lightning re-runs `configure_optimizers`): `ckpt_path=None`
    loads nothing."""

    def scenario(run: Run) -> None:
        # save_last: the callback always keeps the newest; save_total_limit=1 is save_top_k=1 without a monitor
        checkpoint = run.checkpointing({"save_last": True, **stock_args}, {"save_total_limit": 1, **our_args})
        trainer = run.trainer([checkpoint], max_epochs=2)
        module = run.module()
        run.fit(trainer, module)
        trainer.fit_loop.max_epochs += 1
        run.fit(trainer, module)

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert (stock.fits[1].batches, stock.fits[1].global_step) == (10, 30)
    assert_callback_parity(stock, ours, best=False)


def test_missing_checkpoint_raises_file_not_found_error(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 7: a missing checkpoint is a FileNotFoundError (and still a CheckpointError)."""

    def scenario(run: Run) -> None:
        for missing in (run.dirpath / "checkpoint-99" / "checkpoint.ckpt", run.root / "missing.ckpt"):
            run.fit(run.trainer([run.checkpointing({}, {"save_strategy": "epoch"})]), run.module(),
                    ckpt_path=str(missing))

    stock, ours = differential(ns, tmp_path, scenario, flavors=("stock", "ours"))
    assert all(isinstance(fit.error, FileNotFoundError) for fit in stock.fits)
    assert all(isinstance(fit.error, FileNotFoundError) and isinstance(fit.error, CheckpointError)
               for fit in ours.fits), [repr(fit.error) for fit in ours.fits]


def test_fast_dev_run_writes_nothing(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 10: stock writes no checkpoint under fast_dev_run; the callback's defaults (an export
    at the end included) must not either."""

    def scenario(run: Run) -> None:
        callbacks = [run.callback(export_at_end=True)] if run.ours else []  # stock: Lightning's default ModelCheckpoint
        run.fit(run.trainer(callbacks, fast_dev_run=True), run.module())

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert stock.files == {}
    assert ours.files == {}, sorted(ours.files)


# --------------------------------------------------------------------------- resume


def test_mid_epoch_resume_is_exact_where_stock_is_not(ns: Namespace, tmp_path: Path) -> None:
    """Deliberately better: with dropout and a shuffled loader, a run interrupted at step 7 and resumed from its
    step-5 checkpoint ends with the uninterrupted run's weights; stock replays the epoch's first batches."""

    def scenario(run: Run) -> None:
        def checkpoint() -> Any:
            return run.checkpointing({"every_n_train_steps": 5, "save_last": True}, {"save_steps": 5})

        uninterrupted = run.sub("uninterrupted")
        uninterrupted.fit(uninterrupted.trainer([uninterrupted.checkpointing({}, {"save_strategy": "no"})]),
                          uninterrupted.module(dropout=0.3, seed=0), shuffle=True)
        run.fit(run.trainer([checkpoint(), crash_at(run.ns, 7)], max_epochs=2), run.module(dropout=0.3, seed=0),
                shuffle=True)
        run.fit(run.trainer([checkpoint()], max_epochs=2), run.module(dropout=0.3, seed=1), shuffle=True,
                ckpt_path="last")  # other seeds: only the checkpoint can make the runs match

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    for outcome in (stock, ours):
        uninterrupted, crashed, resumed = outcome.fits
        assert isinstance(crashed.error, SimulatedCrash) and resumed.error is None, outcome.flavor
        assert (resumed.start_step, resumed.global_step) == (5, 20), outcome.flavor
    assert not differences(ours.fits[0].weights, ours.fits[2].weights), "ours: resumed != uninterrupted"
    assert differences(stock.fits[0].weights, stock.fits[2].weights), "stock became exact: update this test"


def test_crash_then_resume_from_last_ends_where_stock_ends(ns: Namespace, tmp_path: Path) -> None:
    """`save_on_exception` family. Stock `ModelCheckpoint(save_on_exception=True)` saves at the failing step (here
    an epoch's last, from where stock resumes exactly); the callback deliberately does not (a checkpoint taken
    mid-failure is not trusted, callback.py `on_exception`) and resumes exactly from its last periodic save. Both
    end where the uninterrupted run ends."""

    def scenario(run: Run) -> None:
        def checkpoint(part: Run) -> Any:
            return part.checkpointing({"every_n_train_steps": 5, "save_last": True, "save_on_exception": True},
                                      {"save_steps": 5})

        uninterrupted = run.sub("uninterrupted")
        uninterrupted.fit(uninterrupted.trainer([checkpoint(uninterrupted)]), uninterrupted.module(seed=0))
        run.fit(run.trainer([checkpoint(run), crash_at(run.ns, 10)]), run.module(seed=0))
        run.fit(run.trainer([checkpoint(run)]), run.module(seed=1), ckpt_path="last")

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert [fit.start_step for fit in stock.fits] == [0, 0, 10] and [fit.start_step for fit in ours.fits] == [0, 0, 5]
    for outcome in (stock, ours):
        assert isinstance(outcome.fits[1].error, SimulatedCrash) and outcome.fits[2].global_step == 20
        assert_same(outcome.fits[0].weights, outcome.fits[2].weights, f"{outcome.flavor}: resumed vs uninterrupted")
    assert_same(stock.fits[2].weights, ours.fits[2].weights, "final weights")


def test_early_stopping_run_resumes_from_a_checkpoint_on_an_epochs_last_step(lightning_ns: Namespace,
                                                                             tmp_path: Path) -> None:
    """Issue 15, defect 4: the callback saves an epoch's last step after validation, and Lightning replays the
    epoch end after the restore with empty callback_metrics: EarlyStopping raised "not available"."""

    def scenario(run: Run) -> None:
        def callbacks() -> list[Any]:
            early = run.ns.callback_class("EarlyStopping")(monitor="val_loss", patience=2)
            return [early, run.checkpointing({"every_n_train_steps": 10, "save_top_k": -1}, {"save_steps": 10})]

        run.fit(run.trainer(callbacks(), max_epochs=2), run.module(seed=0))
        path = _paths_by_step(run)[10]
        run.fit(run.trainer(callbacks(), max_epochs=3), run.module(seed=1), ckpt_path=str(path))

    stock, ours = stock_and_ours(lightning_ns, tmp_path, scenario)
    assert stock.fits[1].error is None and stock.fits[1].global_step == 30
    assert ours.fits[1].error is None, repr(ours.fits[1].error)
    assert (ours.fits[1].start_step, ours.fits[1].global_step) == (10, 30)
    assert_same(stock.fits[1].weights, ours.fits[1].weights, "final weights")


@pytest.mark.parametrize("callback", ["EarlyStopping", "LearningRateMonitor", "StochasticWeightAveraging",
                                      "BackboneFinetuning"])
def test_resume_with_stock_callbacks_is_exact_from_any_step(lightning_ns: Namespace, tmp_path: Path,
                                                             callback: str) -> None:
    """Issue 15, defect 4: exact resume, with the stock callbacks users combine with checkpointing, from a
    checkpoint in mid-epoch, on an epoch's last step and on the next epoch's first step. The stock half: a
    ModelCheckpoint run with the same callback resumes from its mid-epoch checkpoint without error."""
    ns = lightning_ns

    def stock_callback() -> Any:
        cls = ns.callback_class(callback)
        return {"EarlyStopping": lambda: cls(monitor="val_loss", patience=5),
                "LearningRateMonitor": lambda: cls(logging_interval="step"),
                "StochasticWeightAveraging": lambda: cls(swa_lrs=0.01, swa_epoch_start=1),
                "BackboneFinetuning": lambda: cls(unfreeze_backbone_at_epoch=1)}[callback]()

    def logger(root: Path) -> Any:
        return ns.pl.loggers.CSVLogger(str(root), name="logs") if callback == "LearningRateMonitor" else False

    steps = (5, 10, 11)

    def scenario(run: Run) -> None:
        def trainer(part: Run) -> Any:
            checkpoint = part.checkpointing({"every_n_train_steps": 1, "save_top_k": -1}, {"save_steps": 1})
            return part.trainer([stock_callback(), checkpoint], max_epochs=3, logger=logger(part.root))

        run.fit(trainer(run), run.module(dropout=0.3, seed=0), shuffle=True)
        paths = _paths_by_step(run)
        # the stock half resumes mid-epoch: stock BackboneFinetuning cannot resume from an epoch's last step
        # (TypeError in finetune_function, Lightning's own bug), so that step is asked of ours only
        for step in steps if run.ours else (5,):
            part = run.sub(f"resumed-from-{step}")
            part.fit(trainer(part), part.module(dropout=0.3, seed=1), shuffle=True, ckpt_path=str(paths[step]))

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert stock.fits[1].error is None and stock.fits[1].global_step == 30, repr(stock.fits[1].error)
    uninterrupted = ours.fits[0]
    for step, resumed in zip(steps, ours.fits[1:], strict=True):
        assert resumed.error is None, f"resume from step {step}: {resumed.error!r}"
        assert (resumed.start_step, resumed.global_step) == (step, uninterrupted.global_step), f"step {step}"
        assert_same(uninterrupted.weights, resumed.weights, f"weights after resuming from step {step}")


# --------------------------------------------------------------------------- the rest of the contract


def test_trainer_pickles_after_fit(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 12."""

    def scenario(run: Run) -> None:
        trainer = run.trainer([run.checkpointing({"every_n_train_steps": 5}, {"save_steps": 5})], max_epochs=1)
        run.fit(trainer, run.module())
        try:
            torch.save(trainer, io.BytesIO())
            run.extra["pickled"] = "ok"
        except Exception as exc:
            run.extra["pickled"] = repr(exc)

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert stock.extra["pickled"] == "ok"
    assert ours.extra["pickled"] == "ok"


def test_memory_filesystem_output_dir(ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 15, defect 9: the callback accepts the fsspec URLs TorchCheckpointIO accepts (and does not write
    them as a local folder named `memory:` in the working directory)."""
    base = f"memory://parity-ours-{tmp_path.name}"
    workdir = tmp_path / "workdir"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    def scenario(run: Run) -> None:
        url = f"{base}/{run.flavor}/checkpoints"
        checkpoint = (run.callback(output_dir=url, save_steps=5) if run.ours
                      else run.model_checkpoint(dirpath=url, every_n_train_steps=5, save_top_k=-1, save_last=True))
        run.fit(run.trainer([checkpoint], max_epochs=2), run.module())
        resume = f"{url}/checkpoint-15/checkpoint.ckpt" if run.ours else f"{url}/epoch=1-step=15.ckpt"
        run.fit(run.trainer([], max_epochs=3, enable_checkpointing=False), run.module(), ckpt_path=resume)

    stock, ours = stock_and_ours(ns, tmp_path, scenario,
                                 locations=lambda run: [f"{base}/{run.flavor}/checkpoints"])
    assert saved_steps(stock) == [5, 10, 15, 20] and stock.fits[1].start_step == 15
    assert sorted(p.name for p in workdir.iterdir()) == [], "a URL was written as a local path"
    assert_callback_parity(stock, ours, best=False)


# --------------------------------------------------------------------------- what a ModelCheckpoint user reads


def test_trainer_sees_a_model_checkpoint(ns: Namespace, tmp_path: Path) -> None:
    """`trainer.checkpoint_callback` is the callback and it is a `ModelCheckpoint` (code that looks for one finds it);
    two callbacks with different schedules keep their states apart, as two ModelCheckpoints do."""
    plugin = ns.adapter.CheckpointIOPlugin()
    first = ns.adapter.CheckpointCallback(output_dir=str(tmp_path / "a"), save_steps=5, export_at_end=False)
    second = ns.adapter.CheckpointCallback(output_dir=str(tmp_path / "b"), save_strategy="epoch", export_at_end=False)
    trainer = ns.pl.Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False,
                            callbacks=[first, second], plugins=[plugin], max_epochs=1, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0)
    assert trainer.checkpoint_callback is first
    assert isinstance(first, ns.callback_class("ModelCheckpoint"))
    assert first.state_key != second.state_key
    from tests.parity.lightning.differential import net_class, train_loader, val_loader

    trainer.fit(net_class(ns.name)(), train_loader(), val_loader())
    steps = {name: sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("a", "b")}
    assert steps == {"a": ["checkpoint-10", "checkpoint-5"], "b": ["checkpoint-10"]}
    checkpoint = torch.load(tmp_path / "a" / "checkpoint-10" / "checkpoint.ckpt", weights_only=True)
    assert {first.state_key, second.state_key} <= set(checkpoint["callbacks"])


def test_best_k_models_hold_the_same_steps_and_scores(ns: Namespace, tmp_path: Path) -> None:
    """`best_k_models`, `kth_best_model_path`, `kth_value`, `current_score` (what loggers and user code read):
    the same steps and scores as ModelCheckpoint's top k."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing(
            {"monitor": "val_loss", "mode": "min", "save_top_k": 2},
            {"save_strategy": "epoch", "metric_for_best_model": "val_loss", "save_best_limit": 2,
             "save_total_limit": 1})
        run.fit(run.trainer([checkpoint], max_epochs=5), run.module(val_losses=(3, 1, 2, 0.5, 4)))
        run.extra["best_k"] = {_step(run, path): float(score) for path, score in checkpoint.best_k_models.items()}
        run.extra["kth"] = (_step(run, checkpoint.kth_best_model_path), float(checkpoint.kth_value))
        run.extra["current_score"] = float(checkpoint.current_score)

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert stock.extra["best_k"] == {20: 1.0, 40: 0.5}
    for name in ("best_k", "kth"):
        assert ours.extra[name] == stock.extra[name], name
    # stock: the score of its last top-k save (epoch 3); ours: of the newest checkpoint (epoch 4, kept as newest)
    assert stock.extra["current_score"] == 0.5 and ours.extra["current_score"] == 4.0


def _step(run: Run, path: str) -> int:
    return int(torch.load(path, weights_only=True)["global_step"])


def test_a_metric_logged_in_training_ranks_checkpoints(ns: Namespace, tmp_path: Path) -> None:
    """ModelCheckpoint ranks by whatever is logged when it saves, training metrics and `step` included."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"monitor": "step", "mode": "max", "every_n_train_steps": 4, "save_top_k": 2,
                                        "save_last": True},
                                       {"save_steps": 4, "metric_for_best_model": "step", "greater_is_better": True,
                                        "save_best_limit": 2, "save_total_limit": 1})
        run.fit(run.trainer([checkpoint], max_epochs=2, limit_val_batches=0), run.module())

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == [16, 20]
    assert_callback_parity(stock, ours)


def test_a_nan_metric_is_the_worst_not_missing(ns: Namespace, tmp_path: Path) -> None:
    """ModelCheckpoint ranks a NaN as the worst value; the callback raised "metric not found" for it."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"monitor": "val_loss", "mode": "min", "save_top_k": -1, "save_last": True},
                                       {"save_strategy": "epoch", "metric_for_best_model": "val_loss"})
        run.fit(run.trainer([checkpoint], max_epochs=3), run.module(val_losses=(float("nan"), 2, 1)))
        run.extra["scores"] = sorted(float(v) for v in checkpoint.best_k_models.values())

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert stock.extra["scores"] == [1.0, 2.0, float("inf")]
    assert ours.extra["scores"] == stock.extra["scores"]
    assert_callback_parity(stock, ours)


def test_loggers_hear_of_each_checkpoint_once_it_exists(ns: Namespace, tmp_path: Path) -> None:
    """`logger.after_save_checkpoint(callback)` per save, as ModelCheckpoint calls it (WandB/MLflow loggers upload
    `last_model_path`/`best_k_models` from there); with the asynchronous callback, once the file exists."""

    def scenario(run: Run) -> None:
        calls: list[tuple[int, bool]] = []

        class Recording(run.ns.pl.loggers.CSVLogger):  # type: ignore[name-defined,misc]
            def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
                path = checkpoint_callback.best_model_path  # without a monitor: the newest checkpoint
                calls.append((_step(run, path), Path(path).is_file()))

        checkpoint = run.checkpointing({"every_n_train_steps": 5, "save_top_k": -1, "save_last": True},
                                       {"save_steps": 5})
        logger = Recording(str(run.root), name="logs")
        run.fit(run.trainer([checkpoint], max_epochs=2, logger=logger), run.module())
        run.extra["calls"] = calls

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    # stock: once for each top-k file and once for each last.ckpt copy, each written when it is told
    assert stock.extra["calls"] == [(5, True), (5, True), (10, True), (10, True), (15, True), (15, True), (20, True),
                                    (20, True)]
    # ours: once per checkpoint, once it is complete (the newest complete one is named, maybe a later one)
    steps = [step for step, _ in ours.extra["calls"]]
    assert len(steps) == 4 and all(exists for _, exists in ours.extra["calls"]), ours.extra["calls"]
    assert steps == sorted(steps) and steps[-1] == 20 and all(step >= (i + 1) * 5 for i, step in enumerate(steps))


def test_a_run_from_scratch_keeps_an_earlier_runs_checkpoints(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 3 (the folder): a new run with `ckpt_path=None` in a folder of an earlier run trains from
    scratch and keeps the earlier run's checkpoints, as ModelCheckpoint does with `-v1` names; ours writes to
    `{output_dir}-v1` (docs/migration.md). "last" then finds the newest of both."""

    def scenario(run: Run) -> None:
        def checkpoint() -> Any:
            return run.checkpointing({"every_n_train_steps": 5, "save_top_k": -1, "save_last": True},
                                     {"save_steps": 5})

        run.fit(run.trainer([checkpoint()], max_epochs=2), run.module(seed=0))
        run.fit(run.trainer([checkpoint()], max_epochs=1), run.module(seed=1))
        third = run.trainer([checkpoint()], max_epochs=2)
        run.fit(third, run.module(seed=2), ckpt_path="last")

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert [fit.start_step for fit in stock.fits] == [0, 0, 10]
    assert "checkpoints/epoch=0-step=5-v1.ckpt" in stock.files
    assert {"checkpoints/checkpoint-20/checkpoint.ckpt", "checkpoints-v1/checkpoint-10/checkpoint.ckpt"} <= set(ours.files)
    assert_callback_parity(stock, ours, contents=False)
    # the first run's checkpoints are intact: the same as stock's
    first = stock.checkpoint("checkpoints/epoch=1-step=20.ckpt")
    assert_same(first["state_dict"], ours.checkpoint("checkpoints/checkpoint-20/checkpoint.ckpt")["state_dict"],
                "the first run's step-20 weights")


def test_ratio_save_steps_with_manual_optimization_counts_optimizer_steps(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 5 (ratios): two optimizers step twice per batch; a fifth of the run is 12 of its 60
    optimizer steps, not 6 (a fifth of its 30 batches)."""

    def scenario(run: Run) -> None:
        checkpoint = run.checkpointing({"every_n_train_steps": 12, "save_top_k": -1, "save_last": True},
                                       {"save_steps": 0.2})
        run.fit(run.trainer([checkpoint], max_epochs=3), run.module(manual=True))

    stock, ours = stock_and_ours(ns, tmp_path, scenario)
    assert saved_steps(stock) == [12, 24, 36, 48, 60]
    assert_callback_parity(stock, ours, best=False)


def test_home_in_output_dir_is_expanded(ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As ModelCheckpoint(dirpath="~/..."), not a folder literally named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    callback = ns.adapter.CheckpointCallback(output_dir="~/runs/a")
    stock = ns.callback_class("ModelCheckpoint")(dirpath="~/runs/a")
    assert callback.dirpath == stock.dirpath == str(tmp_path / "home" / "runs" / "a")
    assert callback.output_dir == tmp_path / "home" / "runs" / "a"


def test_s3_output_dir_on_a_local_moto_server(lightning_ns: Namespace, tmp_path: Path, bucket: str) -> None:
    """Issue 15, defect 9: run folders on S3 (moto's server on 127.0.0.1), committed manifest-last; resume from a
    path, and with ckpt_path="last" (stock finds no "last" on a remote dirpath: ours does)."""
    base = f"s3://{bucket}"

    def scenario(run: Run) -> None:
        url = f"{base}/{run.flavor}/checkpoints"

        def checkpoint() -> Any:
            return (run.callback(output_dir=url, save_steps=5) if run.ours
                    else run.model_checkpoint(dirpath=url, every_n_train_steps=5, save_top_k=-1, save_last=True))

        run.fit(run.trainer([checkpoint()], max_epochs=2), run.module())
        resume = f"{url}/checkpoint-20/checkpoint.ckpt" if run.ours else f"{url}/epoch=1-step=20.ckpt"
        run.fit(run.trainer([checkpoint()], max_epochs=3), run.module(), ckpt_path=resume)
        if run.ours:  # observed apart: it saves nothing, and is not part of the comparison
            last = run.fit(run.trainer([run.callback(output_dir=url, save_strategy="no")], max_epochs=4),
                           run.module(), ckpt_path="last")
            run.extra["last"] = (last.start_step, repr(last.error))
            run.fits.pop()
            run.trainers.pop()

    stock, ours = stock_and_ours(lightning_ns, tmp_path, scenario,
                                 locations=lambda run: [f"{base}/{run.flavor}/checkpoints"])
    assert saved_steps(stock) == [5, 10, 15, 20, 25, 30] and stock.fits[1].start_step == 20
    assert ours.extra["last"] == (30, "None")
    assert_callback_parity(stock, ours, best=False, attributes=False)
