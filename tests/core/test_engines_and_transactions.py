"""Engines (built-in and a user's own) and the transactional API."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import (
    CheckpointArguments,
    CheckpointEngine,
    CheckpointManager,
    CheckpointNotFoundError,
    InvalidOperationError,
)
from ckpt_callbacks.core.format.engines.torch_engine import load_weights_only
from ckpt_callbacks.errors import CheckpointCorruptError

from ..conftest import assert_same_optimizer_state, assert_same_tensors, make_training_objects, train_steps
from .npy_engine import NpyEngine

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("engine", ["safetensors", "torch", "hf", "dcp", "npy"])
@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_of_model_optimizer_scheduler_and_python_state(tmp_path: Path, engine: str, async_save: bool) -> None:
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 3)
    extra = {"epoch": 2, "name": "run", "ratio": 0.5, "flags": [True, None], "pair": (1, 2)}
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine=engine, async_save=async_save))
    manager.save(3, {"model": model, "optimizer": optimizer, "scheduler": scheduler, "extra": extra})
    expected_draw = torch.rand(4)
    train_steps(model, optimizer, scheduler, 2)  # mutate in place right after save(): the checkpoint must not see it
    manager.wait()
    fresh_model, fresh_optimizer, fresh_scheduler = make_training_objects(seed=1)
    meta = manager.load_last({"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler, "extra": None})[1]
    reference_model, reference_optimizer, reference_scheduler = make_training_objects()
    train_steps(reference_model, reference_optimizer, reference_scheduler, 3)
    assert_same_tensors(reference_model.state_dict(), fresh_model.state_dict())
    assert fresh_scheduler.state_dict() == reference_scheduler.state_dict()
    if engine != "npy":  # the toy engine stores plain values as JSON, so tuples come back as lists
        assert_same_optimizer_state(reference_optimizer, fresh_optimizer)
        assert meta["state"]["extra"] == extra
    assert torch.equal(torch.rand(4), expected_draw)  # RNG restored to the save point


def test_safetensors_engine_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine="safetensors"))
    manager.save(2, {"model": model, "optimizer": optimizer, "scheduler": scheduler})
    manager.wait()

    class NoUnpickling(pickle.Unpickler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "Unpickler", NoUnpickling)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pickle.load")))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: (_ for _ in ()).throw(AssertionError("pickle.loads")))
    fresh_model, fresh_optimizer, fresh_scheduler = make_training_objects(seed=5)
    manager.load_last({"model": fresh_model, "optimizer": fresh_optimizer, "scheduler": fresh_scheduler})
    assert_same_tensors(model.state_dict(), fresh_model.state_dict())
    assert_same_optimizer_state(optimizer, fresh_optimizer)


def test_torch_engine_files_load_with_plain_torch_load(tmp_path: Path) -> None:
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine="torch", async_save=False))
    manager.save(2, {"model": model, "optimizer": optimizer, "scheduler": scheduler})
    folder = tmp_path / "checkpoint-2"
    assert_same_tensors(torch.load(folder / "model.pt", weights_only=True), model.state_dict())
    assert torch.load(folder / "scheduler.pt", weights_only=True) == scheduler.state_dict()
    rng = torch.load(folder / "rng.pt", weights_only=True)
    assert set(rng) >= {"python", "numpy", "cpu"}


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_files_load_into_memory_of_their_own_with_sharing_and_types_kept(tmp_path: Path, zip_format: bool) -> None:
    base = torch.arange(12, dtype=torch.float32)
    saved = {
        "whole": base, "view": base[3:7], "step": torch.tensor(5.0),
        "parameter": torch.nn.Parameter(torch.ones(4)),
        "ordered": OrderedDict(weight=torch.full((2, 3), 2.0).t()), "pair": (1, [torch.zeros(2, dtype=torch.int64)]),
    }
    path = tmp_path / "state.pt"
    torch.save(saved, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_weights_only(path, "cpu")
    # The file may be read through a map, but no tensor may stay a copy-on-write view of it.
    assert str(path) not in Path("/proc/self/maps").read_text()
    assert torch.equal(loaded["whole"], base) and torch.equal(loaded["view"], base[3:7])
    assert torch.equal(loaded["step"], torch.tensor(5.0))
    assert isinstance(loaded["parameter"], torch.nn.Parameter) and loaded["parameter"].requires_grad
    assert type(loaded["ordered"]) is OrderedDict and loaded["ordered"]["weight"].stride() == (1, 3)
    assert torch.equal(loaded["ordered"]["weight"], torch.full((3, 2), 2.0))
    assert loaded["pair"][0] == 1 and torch.equal(loaded["pair"][1][0], torch.zeros(2, dtype=torch.int64))
    loaded["whole"][4] = 100.0  # views of one storage in the file still share memory
    assert loaded["view"][1].item() == 100.0
    # each piece owns memory no other loaded piece shares
    assert loaded["step"].untyped_storage().data_ptr() != loaded["whole"].untyped_storage().data_ptr()


def test_torch_file_loads_fail_clearly_on_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "optimizer.pt"
    torch.save({"state": {0: {"exp_avg": torch.ones(1000)}}}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointCorruptError, match="optimizer.pt: not a readable torch file"):
        load_weights_only(path, "cpu")


def test_custom_engine_gets_verification_and_retention_for_free(tmp_path: Path) -> None:
    from ckpt_callbacks import CheckpointCorruptError

    model, optimizer, scheduler = make_training_objects()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine="npy", save_total_limit=2))
    for step in range(1, 5):
        train_steps(model, optimizer, scheduler, 1)
        manager.save(step, {"model": model})
    manager.wait()
    assert [info.step for info in manager.list()] == [3, 4]
    npy_file = next((tmp_path / "checkpoint-4" / "model").glob("*.npy"))
    data = bytearray(npy_file.read_bytes())
    data[-1] ^= 0xFF
    npy_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorruptError, match=npy_file.name):
        manager.load(4, {"model": model})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_a_custom_engine_save_leaves_nothing_visible(tmp_path: Path, mode: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.core.kill_during_save", str(tmp_path), mode],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "saved-1"
    # checkpoint 2 is being written: its engine sleeps 0.2 s per tensor, 12 tensors
    import time

    time.sleep(0.7)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    names = sorted(os.listdir(tmp_path))
    assert "checkpoint-2" not in names
    assert any(name.startswith(".staging-checkpoint-2") for name in names)  # the interrupted write, hidden
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine="npy"))
    assert [info.step for info in manager.list()] == [1]
    manager.load_last({"model": torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])})


def test_engine_registry_rejects_duplicates_and_unknown_names() -> None:
    with pytest.raises(ValueError, match="already registered"):

        class AnotherNpy(CheckpointEngine):
            name = "npy"

            def save(self, state: object, relpath: str) -> None: ...

            def load(self, relpath: str, map_location: object = None) -> object: ...

    with pytest.raises(ValueError, match="not a registered CheckpointEngine"):
        CheckpointArguments(engine="does-not-exist")
    assert NpyEngine.name in __import__("ckpt_callbacks").registered_engines()


def test_transaction_commits_only_on_clean_exit(tmp_path: Path) -> None:
    model, optimizer, _ = make_training_objects()
    ema = torch.nn.Linear(2, 2)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), metric_for_best_model="loss"))
    with manager.begin(7, epoch=1.0) as tx:
        tx.save_state({"model": model, "optimizer": optimizer})
        tx.save_state({"ema": ema}, name="ema")
        tx.save_score(0.25)
        assert manager.list() == []  # nothing visible before the block ends
    manager.wait()
    info = manager.latest()
    assert info is not None and info.step == 7 and info.epoch == 1.0 and info.metrics == {"eval_loss": 0.25}
    fresh_ema = torch.nn.Linear(2, 2)
    manager.load(info, {"ema": fresh_ema}, name="ema")
    assert_same_tensors(ema.state_dict(), fresh_ema.state_dict())
    step, meta = manager.load_last({"model": make_training_objects(seed=3)[0]})
    assert step == 7 and meta["metrics"] == {"eval_loss": 0.25}


def test_exception_inside_the_block_leaves_nothing_behind(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    with pytest.raises(RuntimeError, match="boom"):
        with manager.begin(3) as tx:
            tx.save_state({"model": torch.nn.Linear(2, 2)})
            raise RuntimeError("boom")
    manager.wait()
    assert [name for name in os.listdir(tmp_path) if name != ".ckpt_callbacks.lock"] == []
    with pytest.raises(CheckpointNotFoundError):
        manager.load_last({})
    with manager.begin(4) as tx:  # the manager is usable again
        tx.save_state({"model": torch.nn.Linear(2, 2)})
    manager.wait()
    assert [info.step for info in manager.list()] == [4]


def test_misuse_raises_invalid_operation(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    tx = manager.begin(1)
    with pytest.raises(InvalidOperationError, match="still open"):
        manager.begin(2)
    tx.save_state({"x": torch.ones(1)})
    tx.commit()
    with pytest.raises(InvalidOperationError, match="after the checkpoint of step 1 was committed"):
        tx.save_state({"x": torch.zeros(1)})
    with pytest.raises(InvalidOperationError):
        tx.commit()
    manager.wait()
