"""`CheckpointIOPlugin`: stock consumers read what it writes; writes are atomic, verified, and fail loudly."""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointCorruptError, CheckpointError, CheckpointWriteError
from ckpt_callbacks.core.format.single_file import verify_file
from ckpt_callbacks.core.read.verify import verify_files
from tests.lightning.helpers import (
    Namespace,
    seed_everything,
    tensors_equal,
    train_loader,
    val_loader,
    weight_recorder,
    weights_of,
)


def fit_ours(ns: Namespace, root: Path, *, callbacks: list[Any] = (), max_epochs: int = 2, **args: Any) -> tuple[Any, Any]:
    seed_everything(0)
    plugin, callback = ns.ours(root, **args)
    trainer = ns.trainer(root, callbacks=[callback, *callbacks], plugins=[plugin], max_epochs=max_epochs)
    trainer.fit(ns.Tiny(), train_loader(), val_loader())
    return trainer, callback


def test_adapter_classes_belong_to_their_namespace(ns: Namespace, tmp_path: Path) -> None:
    plugin, callback = ns.ours(tmp_path)
    trainer = ns.trainer(tmp_path, callbacks=[callback], plugins=[plugin])
    assert trainer.checkpoint_callback is callback  # so ckpt_path="best"/"last" consult it
    assert trainer.strategy.checkpoint_io is plugin
    assert isinstance(callback, ns.callback_class("Checkpoint"))


def test_committed_checkpoint_loads_with_stock_lightning_without_the_plugin(ns: Namespace, tmp_path: Path) -> None:
    recorder = weight_recorder(ns, "on_train_batch_end")
    _, callback = fit_ours(ns, tmp_path / "run", callbacks=[recorder], save_steps=5)
    path = str(tmp_path / "run" / "checkpoints" / "checkpoint-15" / "checkpoint.ckpt")

    loaded = ns.Tiny.load_from_checkpoint(path)
    assert tensors_equal(weights_of(loaded), recorder.weights[15])
    assert loaded.hparams.hidden == 16

    stock_start = weight_recorder(ns)
    stock = ns.trainer(tmp_path / "stock", callbacks=[stock_start], enable_checkpointing=False)  # no plugin
    stock.fit(ns.Tiny(), train_loader(), val_loader(), ckpt_path=path)
    assert stock_start.start_step == 15 and stock.global_step == 30
    assert tensors_equal(stock_start.start_weights, recorder.weights[15])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_stock_model_checkpoint_through_the_plugin_writes_verified_single_files(
    ns: Namespace, tmp_path: Path, async_save: bool
) -> None:
    from ckpt_callbacks import CheckpointArguments

    folder = tmp_path / "stock"
    plugin = ns.adapter.CheckpointIOPlugin(CheckpointArguments(async_save=async_save))
    model_checkpoint = ns.callback_class("ModelCheckpoint")(dirpath=str(folder), every_n_train_steps=5, save_last=True)
    trainer = ns.trainer(tmp_path, callbacks=[model_checkpoint], plugins=[plugin], max_epochs=2)
    seed_everything(0)
    module = ns.Tiny()
    trainer.fit(module, train_loader(), val_loader())

    # top-1 rotation removed every older file, no temporary file was left behind, and no file beside them: each
    # carries its manifest inside (TorchCheckpointIO writes exactly these files)
    assert sorted(os.listdir(folder)) == ["epoch=1-step=20.ckpt", "last.ckpt"]
    last = folder / "last.ckpt"
    assert verify_file(last, "checksum")
    assert tensors_equal(weights_of(ns.Tiny.load_from_checkpoint(str(last))), weights_of(module))

    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=r"stock/last\.ckpt: checksum mismatch"):
        plugin.load_checkpoint(last)
    resume = ns.trainer(tmp_path, callbacks=[], plugins=[ns.adapter.CheckpointIOPlugin()], max_epochs=3)
    with pytest.raises(CheckpointCorruptError, match="checksum mismatch"):
        resume.fit(ns.Tiny(), train_loader(), val_loader(), ckpt_path=str(last))


def test_load_checkpoint_takes_both_signatures_and_never_runs_pickled_code(ns: Namespace, tmp_path: Path) -> None:
    plugin = ns.adapter.CheckpointIOPlugin()
    path = tmp_path / "plain.ckpt"
    plugin.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 3}, path)
    plugin.teardown()
    for loaded in (plugin.load_checkpoint(path),  # Lightning 2.6: (path, weights_only=None)
                   plugin.load_checkpoint(path, "cpu"),  # Lightning 2.5: (path, map_location)
                   plugin.load_checkpoint(path, map_location=None, weights_only=False)):
        assert torch.equal(loaded["state_dict"]["w"], torch.ones(2)) and loaded["global_step"] == 3

    # hyperparameters such as an argparse.Namespace need a full unpickle: refused, with the way out named
    torch.save({"state_dict": {}, "hyper_parameters": argparse.Namespace(lr=0.1)}, tmp_path / "namespace.ckpt")
    with pytest.raises(CheckpointError, match=r"refused to load.*weights_only=False"):
        plugin.load_checkpoint(tmp_path / "namespace.ckpt", weights_only=False)


def test_save_into_a_path_below_a_regular_file_raises_and_names_it(ns: Namespace, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a regular file")
    plugin = ns.adapter.CheckpointIOPlugin(async_save=False)
    with pytest.raises(CheckpointWriteError, match=r"not_a_folder.*Not a directory.*Earlier checkpoints are untouched"):
        plugin.save_checkpoint({"global_step": 1}, blocker / "epoch=0-step=1.ckpt")


@contextlib.contextmanager
def write_access_revoked(folder: Path) -> Iterator[None]:
    """Make `folder` unwritable for this process. Root ignores permission bits, so as root the process drops its
    effective uid to `nobody` (the kernel then refuses writes into root's 0755 folder) and takes it back after."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    os.seteuid(pwd.getpwnam("nobody").pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_unwritable_output_dir_raises_clearly_and_keeps_earlier_checkpoints(ns: Namespace, async_save: bool) -> None:
    base = Path(tempfile.mkdtemp(prefix="ckpt-unwritable-"))
    base.chmod(0o755)  # traversable by the unprivileged user
    output_dir = base / "checkpoints"
    revoked = contextlib.ExitStack()

    class LoseWriteAccess(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 12:
                trainer.checkpoint_callback.manager.wait()  # checkpoint-5 and checkpoint-10 are durable now
                revoked.enter_context(write_access_revoked(output_dir))

    try:
        with pytest.raises(CheckpointWriteError) as raised:
            fit_ours(ns, base, callbacks=[LoseWriteAccess()], save_steps=5, async_save=async_save)
        revoked.close()
        message = str(raised.value)
        assert str(output_dir) in message and "Permission denied" in message
        assert "Make the folder writable or choose another output_dir" in message
        _, callback = ns.ours(base, save_steps=5)
        assert [info.step for info in callback.manager.list()] == [5, 10]
        for info in callback.manager.list():
            verify_files(Path(info.path), info.manifest, "checksum")
    finally:
        revoked.close()
        shutil.rmtree(base, ignore_errors=True)


def test_callback_without_the_plugin_says_how_to_fix_it(ns: Namespace, tmp_path: Path) -> None:
    _, callback = ns.ours(tmp_path)
    trainer = ns.trainer(tmp_path, callbacks=[callback])
    with pytest.raises(ValueError, match=r"plugins=\[CheckpointIOPlugin\(\)\]"):
        trainer.fit(ns.Tiny(), train_loader(), val_loader())


def test_sigterm_saves_at_the_next_step_and_returns_from_fit(ns: Namespace, tmp_path: Path) -> None:
    class Preempt(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 6:
                os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    trainer, callback = fit_ours(ns, tmp_path, callbacks=[Preempt()], save_steps=100, export_at_end=True)
    assert callback.preempted and trainer.global_step == 7
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "checkpoint-7"]  # an unfinished run is not exported
    assert signal.getsignal(signal.SIGTERM) == previous


def test_corrupt_newest_checkpoint_fails_resume_unless_fallback_is_allowed(ns: Namespace, tmp_path: Path) -> None:
    fit_ours(ns, tmp_path, max_epochs=1, save_steps=5)
    newest = tmp_path / "checkpoints" / "checkpoint-10" / "checkpoint.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))

    plugin, callback = ns.ours(tmp_path, save_steps=5)
    trainer = ns.trainer(tmp_path, callbacks=[callback], plugins=[plugin], max_epochs=2)
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-10/checkpoint\.ckpt: checksum mismatch"):
        trainer.fit(ns.Tiny(), train_loader(), val_loader(), ckpt_path="last")

    start = weight_recorder(ns)
    plugin, callback = ns.ours(tmp_path, save_steps=5, fallback_to_verified=True)
    assert callback.ckpt_path == str(tmp_path / "checkpoints" / "checkpoint-5" / "checkpoint.ckpt")
    trainer = ns.trainer(tmp_path, callbacks=[callback, start], plugins=[plugin], max_epochs=2)
    trainer.fit(ns.Tiny(), train_loader(), val_loader(), ckpt_path="last")
    assert start.start_step == 5 and trainer.global_step == 20


def test_fit_without_ckpt_path_starts_fresh_and_last_resumes(ns: Namespace, tmp_path: Path) -> None:
    # ckpt_path=None means what it means with ModelCheckpoint: no resume; ckpt_path="last" takes the newest.
    fit_ours(ns, tmp_path, max_epochs=1, save_steps=5)
    fresh = weight_recorder(ns)
    trainer, _ = fit_ours(ns, tmp_path / "fresh", callbacks=[fresh], max_epochs=1, save_steps=5)
    assert fresh.start_step == 0 and trainer.global_step == 10
    start = weight_recorder(ns)
    seed_everything(0)
    plugin, callback = ns.ours(tmp_path, save_steps=5)
    trainer = ns.trainer(tmp_path, callbacks=[callback, start], plugins=[plugin], max_epochs=2)
    trainer.fit(ns.Tiny(), train_loader(), val_loader(), ckpt_path="last")
    assert start.start_step == 10 and trainer.global_step == 20


def test_output_dir_defaults_to_default_root_dir_and_last_resolves_before_setup(
    ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the working directory is not the Trainer's root
    root = tmp_path / "root"

    def run(ckpt_path: str | None, recorder: Any, max_epochs: int = 1) -> Any:
        seed_everything(0)
        callback = ns.adapter.CheckpointCallback(save_steps=5, export_at_end=False)
        trainer = ns.trainer(root, callbacks=[callback, recorder], plugins=[ns.adapter.CheckpointIOPlugin()],
                             max_epochs=max_epochs)
        trainer.fit(ns.Tiny(), train_loader(), val_loader(), ckpt_path=ckpt_path)
        return callback

    callback = run(None, weight_recorder(ns))
    assert callback.output_dir == root / "checkpoints"
    assert sorted(p.name for p in (root / "checkpoints").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]
    resumed = weight_recorder(ns)
    run("last", resumed, max_epochs=2)  # a fresh callback answers ckpt_path before its setup: from the Trainer's root
    assert resumed.start_step == 10


def test_fit_refuses_a_lightning_older_than_supported(ns: Namespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = ns.name.split(".")[0]
    monkeypatch.setattr(ns.pl, "__version__", "2.4.0")
    if package != ns.pl.__name__:
        monkeypatch.setattr(__import__(package), "__version__", "2.4.0")
    with pytest.raises(RuntimeError, match=rf"needs {package.replace('_', '-')}>=2\.5\.0.*{package} 2\.4\.0 is installed"):
        fit_ours(ns, tmp_path, max_epochs=1)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").glob("checkpoint-*"))
