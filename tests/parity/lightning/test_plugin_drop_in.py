"""`CheckpointIOPlugin` is a drop-in for `TorchCheckpointIO`: a stock `ModelCheckpoint` next to it sees the same
file system, keeps the same files, points at the same best and last checkpoints, and the run trains the same.

Each test runs its scenario stock (TorchCheckpointIO) and with `CheckpointIOPlugin()` (its defaults: async) and
compares everything: the files under the run's root, every file's `torch.load` content, the callback's
`best_model_path` / `best_k_models` / `last_model_path`, every fit's progress, final weights and exception type.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lightning.helpers import Namespace
from tests.parity.lightning.differential import (
    Run,
    SimulatedCrash,
    assert_plugin_parity,
    crash_at,
    differential,
    saved_steps,
)


def plugin_parity(ns: Namespace, tmp_path: Path, scenario: Any, **kwargs: Any) -> tuple[Any, Any]:
    stock, plugin = differential(ns, tmp_path, scenario, **kwargs)
    assert all(fit.error is None or isinstance(fit.error, SimulatedCrash) for fit in stock.fits), (
        f"the stock half failed on its own: {[fit.error for fit in stock.fits]}")
    assert_plugin_parity(stock, plugin)
    return stock, plugin


# --------------------------------------------------------------------------- top-k, last, versions


def test_top_k_with_a_monitor_keeps_the_same_best_files(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        trainer = run.trainer([run.model_checkpoint(monitor="val_loss", save_top_k=2)], max_epochs=4)
        run.fit(trainer, run.module(dropout=0.3, val_losses=(3, 1, 2, 0.5)), shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert sorted(stock.files) == ["checkpoints", "checkpoints/epoch=1-step=20.ckpt", "checkpoints/epoch=3-step=40.ckpt"]
    assert stock.callbacks[0]["best_model_path"] == "<root>/checkpoints/epoch=3-step=40.ckpt"


@pytest.mark.parametrize("save_top_k", [1, -1])
def test_top_k_without_a_monitor_keeps_the_same_files(ns: Namespace, tmp_path: Path, save_top_k: int) -> None:
    def scenario(run: Run) -> None:
        trainer = run.trainer([run.model_checkpoint(every_n_train_steps=4, save_top_k=save_top_k)])
        run.fit(trainer, run.module(dropout=0.3), shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert saved_steps(stock) == ([20] if save_top_k == 1 else [4, 8, 12, 16, 20])


@pytest.mark.parametrize("save_last", [True, "link"], ids=["copy", "link"])
def test_save_last_copy_and_link_resume_the_same(ns: Namespace, tmp_path: Path, save_last: Any) -> None:
    def scenario(run: Run) -> None:
        # val_loss gets worse: since Lightning 2.6 last.ckpt is only rewritten on a top-k save (it stays at step 10)
        checkpoint = run.model_checkpoint(monitor="val_loss", save_top_k=1, save_last=save_last)
        run.fit(run.trainer([checkpoint], max_epochs=3), run.module(val_losses=(1, 2, 3, 4)))
        resumed = run.trainer([run.model_checkpoint(monitor="val_loss", save_top_k=1, save_last=save_last)],
                              max_epochs=4)
        run.fit(resumed, run.module(val_losses=(1, 2, 3, 4)), ckpt_path="last")

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert stock.fits[1].start_step == 10
    if save_last == "link":
        assert stock.files["checkpoints/last.ckpt"] == "link -> epoch=0-step=10.ckpt"


def test_version_counter_sees_every_earlier_file(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 1: the version counter checks whether the file exists; an asynchronous write that is not
    there yet made it reuse a name and overwrite a checkpoint it was told to keep."""

    def scenario(run: Run) -> None:
        checkpoint = run.model_checkpoint(save_top_k=-1, monitor="epoch", filename="test")
        run.fit(run.trainer([checkpoint], max_epochs=4), run.module(dropout=0.3, ballast_mb=16), shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert sorted(stock.files) == ["checkpoints", "checkpoints/test-v1.ckpt", "checkpoints/test-v2.ckpt",
                                   "checkpoints/test-v3.ckpt", "checkpoints/test.ckpt"]


def test_rerun_in_the_same_folder_adds_v1_names(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        for _ in range(2):  # a second, fresh run into the same dirpath: stock keeps the first run's files
            checkpoint = run.model_checkpoint(every_n_train_steps=5, save_top_k=2, monitor="step", mode="max",
                                              save_last=True)
            run.fit(run.trainer([checkpoint]), run.module())

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert "checkpoints/epoch=1-step=20-v1.ckpt" in stock.files and "checkpoints/last-v1.ckpt" in stock.files


# --------------------------------------------------------------------------- triggers


@pytest.mark.parametrize("trigger", [
    {"every_n_train_steps": 3}, {"every_n_epochs": 2}, {"train_time_interval": timedelta(0)},
], ids=["every_n_train_steps", "every_n_epochs", "train_time_interval"])
def test_save_triggers_write_the_same_checkpoints(ns: Namespace, tmp_path: Path, trigger: dict[str, Any]) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.model_checkpoint(save_top_k=-1, **trigger)
        run.fit(run.trainer([checkpoint], max_epochs=4), run.module(dropout=0.3), shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    expected = {"every_n_train_steps": list(range(3, 41, 3)), "every_n_epochs": [20, 40],
                "train_time_interval": list(range(1, 41))}
    assert saved_steps(stock) == expected[next(iter(trigger))]


def test_step_saves_wait_for_the_validation_metric(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.model_checkpoint(monitor="val_loss", every_n_train_steps=5, save_top_k=2)
        run.fit(run.trainer([checkpoint], max_epochs=3, val_check_interval=0.5), run.module())

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert len(saved_steps(stock)) == 2


def test_accumulated_gradients_save_on_the_same_optimizer_steps(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.model_checkpoint(every_n_train_steps=3, save_top_k=-1)
        run.fit(run.trainer([checkpoint], max_epochs=3, accumulate_grad_batches=2), run.module(dropout=0.3),
                shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert saved_steps(stock) == [3, 6, 9, 12, 15]


def test_manual_optimization_with_two_optimizers_saves_the_same(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        checkpoint = run.model_checkpoint(every_n_train_steps=6, save_top_k=-1)
        run.fit(run.trainer([checkpoint], max_epochs=3), run.module(manual=True))

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert saved_steps(stock) == list(range(6, 61, 6))


# --------------------------------------------------------------------------- exceptions and resume


def test_save_on_exception_then_resume_from_last(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        def checkpoint() -> Any:
            return run.model_checkpoint(save_on_exception=True, save_last=True, every_n_train_steps=4, save_top_k=-1)

        run.fit(run.trainer([crash_at(run.ns, 7), checkpoint()], max_epochs=3), run.module(dropout=0.3),
                shuffle=True)
        run.fit(run.trainer([checkpoint()], max_epochs=3), run.module(dropout=0.3), shuffle=True, ckpt_path="last")

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert isinstance(stock.fits[0].error, SimulatedCrash)
    assert "checkpoints/epoch=0-step=7.ckpt" in stock.files and stock.fits[1].start_step == 7


@pytest.mark.parametrize("ckpt_path", ["last", "best", "path", None])
def test_ckpt_path_resolves_to_the_same_checkpoint(ns: Namespace, tmp_path: Path, ckpt_path: str | None) -> None:
    """A new Trainer resumes from "last", a path or nothing (None); "best" is the first Trainer's best (a new
    ModelCheckpoint knows no best before its fit restores its state, so stock refuses "best" there)."""
    losses = (1, 3, 2, 0.5)  # after 3 epochs: best is step 10, last step 30

    def scenario(run: Run) -> None:
        def checkpoint() -> Any:
            return run.model_checkpoint(monitor="val_loss", save_top_k=3, save_last=True)

        first = run.trainer([checkpoint()], max_epochs=3)
        run.fit(first, run.module(dropout=0.3, val_losses=losses), shuffle=True)
        path = str(run.dirpath / "epoch=1-step=20.ckpt") if ckpt_path == "path" else ckpt_path
        second = first if ckpt_path == "best" else run.trainer([checkpoint()], max_epochs=4)
        second.fit_loop.max_epochs = 4
        run.fit(second, run.module(dropout=0.3, val_losses=losses), shuffle=True, ckpt_path=path)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert stock.fits[1].start_step == {"last": 30, "best": 10, "path": 20, None: 0}[ckpt_path]


def test_a_second_fit_on_the_same_trainer_trains_the_extra_epoch(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        trainer = run.trainer([run.model_checkpoint()], max_epochs=2)
        module = run.module(dropout=0.3)
        run.fit(trainer, module, shuffle=True)
        trainer.fit_loop.max_epochs += 1
        run.fit(trainer, module, shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert (stock.fits[1].batches, stock.fits[1].global_step) == (10, 30)


def test_missing_checkpoint_raises_file_not_found_error(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 7: user code that catches FileNotFoundError must keep working."""

    def scenario(run: Run) -> None:
        run.fit(run.trainer([run.model_checkpoint()]), run.module(), ckpt_path=str(run.root / "missing.ckpt"))

    stock, plugin = differential(ns, tmp_path, scenario)
    assert isinstance(stock.fits[0].error, FileNotFoundError)
    assert isinstance(plugin.fits[0].error, FileNotFoundError), repr(plugin.fits[0].error)
    from ckpt_callbacks import CheckpointError

    assert isinstance(plugin.fits[0].error, CheckpointError)
    # code (Lightning's own tests among it) matches TorchCheckpointIO's words
    assert str(stock.fits[0].error).startswith("Checkpoint file not found: ")
    assert str(stock.fits[0].error) in str(plugin.fits[0].error).replace(str(plugin.root), str(stock.root))
    assert_plugin_parity(stock, plugin)


def test_hpc_checkpoints_get_increasing_numbers_and_slurm_auto_resumes_from_the_newest(
    ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15, defect 2: Lightning numbers `hpc_ckpt_N` from the files it finds, and on SLURM `ckpt_path=None`
    becomes "hpc", the highest N; both must see every earlier save. The saves are what Lightning's SLURM
    requeue handler does on a signal (`trainer.save_checkpoint(hpc_save_path(default_root_dir))`)."""
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "parity", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}

    def scenario(run: Run) -> None:
        hpc_save_path = run.ns.pl.trainer.connectors.checkpoint_connector._CheckpointConnector.hpc_save_path

        class SaveEveryStep(run.ns.pl.Callback):  # type: ignore[name-defined,misc]
            def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
                trainer.save_checkpoint(hpc_save_path(trainer.default_root_dir))

        run.fit(run.trainer([SaveEveryStep()], max_epochs=2, enable_checkpointing=False), run.module(dropout=0.3),
                shuffle=True)
        with monkeypatch.context() as env:  # the requeued job: SLURM resumes it with ckpt_path=None
            for key, value in slurm.items():
                env.setenv(key, value)
            run.fit(run.trainer([], max_epochs=3, enable_checkpointing=False), run.module(dropout=0.3),
                    shuffle=True)

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert sorted(stock.files) == sorted(f"hpc_ckpt_{n}.ckpt" for n in range(1, 21))
    assert stock.fits[1].start_step == 20


KILLED_WRITE = """
import resource, signal, sys
import torch
from ckpt_callbacks.lightning import CheckpointIOPlugin
plugin = CheckpointIOPlugin(async_save=False)
checkpoint = {"state_dict": {"w": torch.zeros(2**20)}, "global_step": 3}
resource.setrlimit(resource.RLIMIT_FSIZE, (2**16, 2**16))  # the kernel kills the writer in the middle of its write
signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
plugin.save_checkpoint(checkpoint, sys.argv[1])
"""


def test_hpc_numbering_is_not_poisoned_by_a_killed_write(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 2 (hpc_ckpt_N): Lightning numbers `hpc_ckpt_{N}` by the digits of every name in the folder
    that contains "ckpt_". A write killed mid-way leaves its hidden staging file; named after its target (with a
    host, a pid and a random part) it made the next number huge."""
    import signal
    import subprocess
    import sys

    hpc_save_path = ns.pl.trainer.connectors.checkpoint_connector._CheckpointConnector.hpc_save_path
    plugin = ns.adapter.CheckpointIOPlugin()
    for number in (1, 2):
        plugin.save_checkpoint({"state_dict": {}, "global_step": number}, hpc_save_path(tmp_path))
    assert hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_3.ckpt")
    repo = Path(__file__).resolve().parents[3]
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(tmp_path / "hpc_ckpt_3.ckpt")], cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGXFSZ, killed.stderr[-2000:]
    leftovers = [name for name in os.listdir(tmp_path) if name.startswith(".")]
    assert leftovers, "the killed write left nothing behind (nothing to check)"
    assert hpc_save_path(tmp_path) == str(tmp_path / "hpc_ckpt_3.ckpt"), leftovers
    plugin.save_checkpoint({"state_dict": {}, "global_step": 3}, hpc_save_path(tmp_path))  # the next writer cleans up
    assert sorted(os.listdir(tmp_path)) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt", "hpc_ckpt_3.ckpt"]


# --------------------------------------------------------------------------- files in dirpath


def test_every_file_in_dirpath_is_a_checkpoint_torch_load_reads(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 8: code that loads every file of the checkpoint folder must not meet a sidecar."""

    def scenario(run: Run) -> None:
        checkpoint = run.model_checkpoint(every_n_train_steps=5, save_top_k=-1, save_last=True)
        run.fit(run.trainer([checkpoint]), run.module())

    stock, plugin = differential(ns, tmp_path, scenario)
    for outcome in (stock, plugin):
        names = sorted(os.listdir(outcome.root / "checkpoints"))
        loaded = {name: torch.load(outcome.root / "checkpoints" / name, weights_only=True) for name in names}
        assert all(isinstance(data, dict) and "state_dict" in data for data in loaded.values()), outcome.flavor
    assert_plugin_parity(stock, plugin)


def test_fast_dev_run_writes_nothing(ns: Namespace, tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        run.fit(run.trainer(fast_dev_run=True), run.module())  # Lightning's default ModelCheckpoint

    stock, _ = plugin_parity(ns, tmp_path, scenario)
    assert stock.files == {}


# --------------------------------------------------------------------------- saves the library does not schedule


def test_save_checkpoint_is_complete_when_it_returns(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 2: `trainer.save_checkpoint(path)` then, at once, every reader a user has: `torch.load`,
    `load_from_checkpoint`, a new Trainer's `fit(ckpt_path=path)`; and no writer thread left behind."""
    import threading

    def scenario(run: Run) -> None:
        trainer = run.trainer([], max_epochs=1, enable_checkpointing=False)
        module = run.module(dropout=0.3, ballast_mb=16)
        run.fit(trainer, module, shuffle=True)
        net = type(module)
        reads = []
        threads_before = set(threading.enumerate())
        for attempt in range(3):
            path = run.root / f"manual-{attempt}.ckpt"
            trainer.save_checkpoint(path)
            reads.append(("torch.load", _outcome(lambda path=path: torch.load(path, weights_only=True)["global_step"])))
            path = run.root / f"manual-model-{attempt}.ckpt"
            trainer.save_checkpoint(path)
            reads.append(("load_from_checkpoint", _outcome(lambda path=path: net.load_from_checkpoint(path).hparams.dropout)))
            path = run.root / f"manual-fit-{attempt}.ckpt"
            trainer.save_checkpoint(path)
            fit = run.fit(run.trainer([], max_epochs=2, enable_checkpointing=False),
                          run.module(dropout=0.3, ballast_mb=16), shuffle=True, ckpt_path=str(path))
            reads.append(("fit(ckpt_path)", fit.start_step if fit.error is None else type(fit.error).__name__))
        run.extra["reads"] = reads
        run.extra["new threads"] = sorted(t.name for t in set(threading.enumerate()) - threads_before if t.is_alive())

    stock, plugin = differential(ns, tmp_path, scenario)
    assert stock.extra["reads"] == [("torch.load", 10), ("load_from_checkpoint", 0.3), ("fit(ckpt_path)", 10)] * 3
    assert plugin.extra["reads"] == stock.extra["reads"]
    assert plugin.extra["new threads"] == stock.extra["new threads"] == []
    assert_plugin_parity(stock, plugin)


def _outcome(read: Any, *, detail: bool = False) -> Any:
    try:
        return read()
    except Exception as exc:
        return repr(exc) if detail else type(exc).__name__


def test_a_process_that_exits_right_after_save_checkpoint_keeps_the_file(lightning_ns: Namespace,
                                                                         tmp_path: Path) -> None:
    """Issue 15, defect 2: forked workers and some launchers end with `os._exit`, which runs no cleanup."""
    ns = lightning_ns
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[3]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    found = {}
    for flavor in ("stock", "plugin"):
        path = tmp_path / flavor / "saved.ckpt"
        done = subprocess.run([sys.executable, "-m", "tests.parity.lightning.exit_after_save", ns.name, flavor, str(path)],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-3000:]
        found[flavor] = _outcome(lambda path=path: torch.load(path, weights_only=True)["global_step"])
    assert found == {"stock": 10, "plugin": 10}


def test_trainer_pickles_after_fit(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 12: `torch.save(trainer)` after fit (people do, to keep a run's state around)."""
    import io

    def scenario(run: Run) -> None:
        trainer = run.trainer([run.model_checkpoint(every_n_train_steps=5)], max_epochs=1)
        run.fit(trainer, run.module())
        run.extra["pickled"] = _outcome(lambda: torch.save(trainer, io.BytesIO()) or "ok", detail=True)

    stock, plugin = differential(ns, tmp_path, scenario)
    assert stock.extra["pickled"] == "ok"
    assert plugin.extra["pickled"] == "ok"
    assert_plugin_parity(stock, plugin)


# --------------------------------------------------------------------------- fsspec paths


def remote_scenario(base: str) -> Any:
    def scenario(run: Run) -> None:
        url = f"{base}/{run.flavor}/checkpoints"

        def checkpoint() -> Any:
            return run.model_checkpoint(dirpath=url, every_n_train_steps=5, save_top_k=2, monitor="step", mode="max",
                                        save_last=True)

        run.fit(run.trainer([checkpoint()], max_epochs=2), run.module(dropout=0.3), shuffle=True)
        run.fit(run.trainer([checkpoint()], max_epochs=3), run.module(dropout=0.3), shuffle=True,
                ckpt_path=f"{url}/epoch=1-step=15.ckpt")
        # ckpt_path="last" finds nothing on a remote dirpath with stock Lightning (fsspec `ls` drops the protocol,
        # so `_find_last_checkpoints` looks for local files): users name the file.
        run.fit(run.trainer([checkpoint()], max_epochs=4), run.module(dropout=0.3), shuffle=True,
                ckpt_path=f"{url}/last.ckpt")

    return scenario


def test_memory_filesystem_dirpath(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 9: TorchCheckpointIO writes and reads fsspec URLs; `memory://` is fsspec's own."""
    base = f"memory://parity-{tmp_path.name}"
    stock, plugin = differential(ns, tmp_path, remote_scenario(base),
                                 locations=lambda run: [f"{base}/{run.flavor}/checkpoints"])
    assert not any(fit.error for fit in stock.fits), [fit.error for fit in stock.fits]
    assert sorted(stock.files) == ["<remote>/epoch=1-step=20.ckpt", "<remote>/epoch=3-step=35.ckpt",
                                   "<remote>/epoch=3-step=40.ckpt", "<remote>/last.ckpt"]
    assert [fit.start_step for fit in stock.fits] == [0, 15, 30]
    assert_plugin_parity(stock, plugin)


def test_s3_dirpath_on_a_local_moto_server(lightning_ns: Namespace, tmp_path: Path, bucket: str) -> None:
    """Issue 15, defect 9: the same against a real S3 API (moto's server on 127.0.0.1)."""
    base = f"s3://{bucket}"
    stock, plugin = differential(lightning_ns, tmp_path, remote_scenario(base),
                                 locations=lambda run: [f"{base}/{run.flavor}/checkpoints"])
    assert not any(fit.error for fit in stock.fits), [fit.error for fit in stock.fits]
    assert [fit.start_step for fit in stock.fits] == [0, 15, 30]
    assert_plugin_parity(stock, plugin)
