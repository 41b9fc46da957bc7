"""Correctness of asynchronous saving: order, flush, errors, equal bytes, deferred staging, frozen tensors.

Speed is measured by `benchmarks/`, not here.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ckpt_callbacks import CheckpointArguments, CheckpointError, CheckpointManager
from ckpt_callbacks.core.format import manifest as manifest_module
from ckpt_callbacks.core.format import safetensors_io
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.format.manifest import parse_manifest
from ckpt_callbacks.core.format.safetensors_io import write_safetensors
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.save.staging import HostStager, StagingPlan
from ckpt_callbacks.errors import CheckpointWriteError

from ..conftest import (
    TinyNet,
    assert_same_optimizer_state,
    assert_same_tensors,
    make_training_objects,
    train_steps,
)

REPO = Path(__file__).resolve().parents[2]


class GatedEngine(SafetensorsEngine):
    """The safetensors engine, held at a gate the test opens, failing with ENOSPC on request."""

    name = "gated_safetensors"
    gate = threading.Event()
    fail_with_enospc = False
    committed: list[str] = []

    def save(self, state: Any, relpath: str) -> None:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        if self.fail_with_enospc:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.directory / f"{relpath}.safetensors"))
        super().save(state, relpath)

    def commit(self, tag: str) -> None:
        GatedEngine.committed.append(Path(tag).name)


@pytest.fixture(autouse=True)
def open_gate() -> Iterator[None]:
    GatedEngine.gate.set()
    GatedEngine.fail_with_enospc = False
    GatedEngine.committed = []
    yield
    GatedEngine.gate.set()


def gated_manager(tmp_path: Path, **flags: Any) -> CheckpointManager:
    return CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine="gated_safetensors", **flags))


def files_of(folder: Path) -> dict[str, Any]:
    """Every file's bytes; for torch zip files, every member but the id torch draws anew for each save."""
    return {p.relative_to(folder).as_posix(): zip_members(p) if p.suffix == ".pt" else p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def zip_members(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist() if not name.endswith("serialization_id")}


def manifest_of(folder: Path) -> Any:
    return parse_manifest((folder / "manifest.json").read_bytes(), source=str(folder))


def test_saves_commit_in_the_order_they_were_made(tmp_path: Path) -> None:
    manager = gated_manager(tmp_path, max_in_flight=3)
    model = TinyNet()
    GatedEngine.gate.clear()
    for step in (1, 2, 3):
        manager.save(step, {"model": model})
    assert manager.list() == []  # nothing is visible before it is complete
    GatedEngine.gate.set()
    manager.wait()
    assert [name.split("-")[2] for name in GatedEngine.committed] == ["1", "2", "3"]
    infos = manager.list()
    assert [info.step for info in infos] == [1, 2, 3]
    assert [info.save_time for info in infos] == sorted(info.save_time for info in infos)


def test_close_makes_pending_saves_durable(tmp_path: Path) -> None:
    manager = gated_manager(tmp_path)
    GatedEngine.gate.clear()
    manager.save(7, {"model": TinyNet()})
    threading.Timer(0.3, GatedEngine.gate.set).start()
    manager.close()
    assert find_problems(tmp_path / "checkpoint-7", manifest_of(tmp_path / "checkpoint-7"), "checksum") == []


def test_failed_background_write_surfaces_at_the_next_save_with_path_and_cause(tmp_path: Path) -> None:
    manager = gated_manager(tmp_path)
    model = TinyNet()
    manager.save(1, {"model": model})
    manager.wait()
    GatedEngine.fail_with_enospc = True
    manager.save(2, {"model": model})  # returns: the write fails in the background
    with pytest.raises(CheckpointWriteError) as raised:
        manager.save(3, {"model": model})
    message = str(raised.value)
    assert "checkpoint-2" in message and "No space left on device" in message and "model.safetensors" in message
    assert raised.value.path is not None and raised.value.path.endswith("model.safetensors")
    assert [info.step for info in manager.list()] == [1]
    assert find_problems(tmp_path / "checkpoint-1", manifest_of(tmp_path / "checkpoint-1"), "checksum") == []
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".staging")) == []


@pytest.mark.parametrize("finish", ["wait", "close"])
def test_failed_background_write_surfaces_at_wait_and_close(tmp_path: Path, finish: str) -> None:
    manager = gated_manager(tmp_path)
    GatedEngine.fail_with_enospc = True
    manager.save(4, {"model": TinyNet()})
    with pytest.raises(CheckpointWriteError, match="checkpoint-4.*No space left on device"):
        getattr(manager, finish)()
    manager.close()  # reported once: closing afterwards is clean
    assert manager.list() == []


@pytest.mark.parametrize("engine", ["safetensors", "torch"])
def test_sync_and_async_saves_write_identical_bytes(tmp_path: Path, engine: str) -> None:
    model, optimizer, scheduler = make_training_objects()
    train_steps(model, optimizer, scheduler, 2)
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    folders = {}
    for mode in ("sync", "async"):
        torch.manual_seed(5)  # the RNG piece must match too
        with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / mode), engine=engine,
                                                   async_save=mode == "async")) as manager:
            manager.save(3, state)
        folders[mode] = tmp_path / mode / "checkpoint-3"
    assert files_of(folders["sync"]) == files_of(folders["async"])
    if engine == "safetensors":
        assert manifest_of(folders["sync"]).files == manifest_of(folders["async"]).files


def frozen_net() -> tuple[TinyNet, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = TinyNet()
    model.fc1.requires_grad_(False)
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 6)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def wide_net() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Weights above the size deferred staging copies at once, and BatchNorm statistics below it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.BatchNorm1d(300), torch.nn.Linear(300, 300),
                                torch.nn.ReLU(), torch.nn.Linear(300, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def test_deferred_staging_holds_the_state_of_the_call(tmp_path: Path) -> None:
    model, optimizer = wide_net()
    step(model, optimizer)
    expected_model = copy.deepcopy(model.state_dict())
    expected_optimizer = copy.deepcopy(optimizer)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))) as manager:
        manager.save(2, {"model": model, "optimizer": optimizer}, defer_staging=True)
        model(torch.randn(4, 6)).pow(2).mean().backward()  # updates the BatchNorm statistics in place
        manager.wait_for_staging()  # what the adapters call just before the optimizer step
        optimizer.step()
    restored, restored_optimizer = wide_net()
    CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))).load(2, {"model": restored, "optimizer": restored_optimizer})
    assert_same_tensors(restored.state_dict(), expected_model)
    assert_same_optimizer_state(restored_optimizer, expected_optimizer)


def test_deferred_staging_reports_a_tensor_changed_before_its_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = torch.nn.Linear(300, 300)  # 352 KiB of weights: above the size copied at once
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(2, 300)).sum().backward()
    copy_may_start = threading.Event()
    real_run = StagingPlan.run

    def held_run(plan: StagingPlan) -> None:
        copy_may_start.wait(timeout=30)
        real_run(plan)

    monkeypatch.setattr(StagingPlan, "run", held_run)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    manager.save(1, {"model": model, "optimizer": optimizer}, defer_staging=True)
    optimizer.step()  # misuse: the optimizer steps before wait_for_staging()
    copy_may_start.set()
    with pytest.raises(CheckpointError, match="modified in place before its deferred host copy finished.*wait_for_staging"):
        manager.wait_for_staging()
    manager.save(2, {"model": model, "optimizer": optimizer})  # the failure was reported once; saving goes on
    manager.close()
    assert [info.step for info in manager.list()] == [2]


class RunningMean(torch.nn.Module):
    """A linear layer with a 400 KiB buffer that every forward pass updates in place (above the size deferred
    staging copies at once)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(320, 320)
        self.register_buffer("mean_input", torch.zeros(320, 320))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.mean_input.mul_(0.9).add_(x.mean(0), alpha=0.1)
        return self.linear(x)


def test_deferred_staging_copies_the_tensors_named_copy_now_before_returning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(0)
    model = RunningMean()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 320)).pow(2).mean().backward()
        optimizer.step()
    expected_model = copy.deepcopy(model.state_dict())
    expected_optimizer = copy.deepcopy(optimizer)
    copy_may_start = threading.Event()
    real_run = StagingPlan.run

    def held_run(plan: StagingPlan) -> None:  # the deferred copy starts only after the next forward pass
        copy_may_start.wait(timeout=30)
        real_run(plan)

    monkeypatch.setattr(StagingPlan, "run", held_run)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))) as manager:
        manager.save(2, {"model": model, "optimizer": optimizer}, defer_staging=True, copy_now=model.buffers())
        model(torch.randn(4, 320)).pow(2).mean().backward()  # updates the large buffer in place
        copy_may_start.set()
        manager.wait_for_staging()  # no error: the buffer was copied before save() returned
        optimizer.step()
    assert not torch.equal(model.mean_input, expected_model["mean_input"])
    restored = RunningMean()
    restored_optimizer = torch.optim.AdamW(restored.parameters(), lr=1e-2)
    CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))).load(2, {"model": restored, "optimizer": restored_optimizer})
    assert_same_tensors(restored.state_dict(), expected_model)
    assert_same_optimizer_state(restored_optimizer, expected_optimizer)


def test_frozen_tensors_are_not_copied_again() -> None:
    model, optimizer = frozen_net()
    stager = HostStager()
    stager.stage(model.state_dict())
    step(model, optimizer)
    plan = stager.plan(model.state_dict())
    plan.run()
    frozen_bytes = sum(t.numel() * t.element_size() for t in model.fc1.state_dict().values())
    assert plan.skipped_bytes == frozen_bytes
    assert_same_tensors(plan.staged, model.state_dict())
    with torch.no_grad():
        model.fc1.weight.data.add_(1.0)  # bypasses the version counter; the sampled values catch it
    plan = stager.plan(model.state_dict())
    plan.run()
    assert plan.copied_bytes == model.fc1.weight.numel() * 4  # nothing else changed since the last snapshot
    assert_same_tensors(plan.staged, model.state_dict())


def test_frozen_tensor_skipping_writes_the_same_checkpoint_as_a_sync_save(tmp_path: Path) -> None:
    model, optimizer = frozen_net()
    state = {"model": model, "optimizer": optimizer}
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "async"))) as manager:
        for saved_step in (1, 2, 3):
            step(model, optimizer)
            torch.manual_seed(saved_step)
            manager.save(saved_step, state)
    torch.manual_seed(3)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "sync"), async_save=False)) as manager:
        manager.save(3, state)
    assert files_of(tmp_path / "async" / "checkpoint-3") == files_of(tmp_path / "sync" / "checkpoint-3")


def test_sealing_reads_back_only_files_not_hashed_while_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read_back: list[str] = []
    real_checksum = manifest_module.checksum_file

    def counting_checksum(path: Path) -> str:
        read_back.append(Path(path).name)
        return real_checksum(path)

    monkeypatch.setattr(manifest_module, "checksum_file", counting_checksum)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))) as manager:
        manager.save(1, {"model": TinyNet()})
    assert not [name for name in read_back if name.endswith(".safetensors")]
    monkeypatch.undo()
    assert find_problems(tmp_path / "checkpoint-1", manifest_of(tmp_path / "checkpoint-1"), "checksum") == []


EXITING_TRAINER = """
import os, signal, sys, time
import torch
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine

class SlowEngine(SafetensorsEngine):
    name = "slow_for_exit_test"
    def save(self, state, relpath):
        time.sleep(0.5)
        super().save(state, relpath)

manager = CheckpointManager(CheckpointArguments(output_dir=sys.argv[1], engine="slow_for_exit_test"))
manager.save(1, {"model": torch.nn.Linear(3, 3)})
print("save returned", flush=True)
if sys.argv[2] == "exception":
    raise RuntimeError("training crashed")
if sys.argv[2] == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(30)
"""


@pytest.mark.parametrize(("ending", "returncode"), [("normal", 0), ("exception", 1), ("sigterm", -15)])
def test_pending_save_is_flushed_when_the_process_ends(tmp_path: Path, ending: str, returncode: int) -> None:
    result = subprocess.run([sys.executable, "-c", EXITING_TRAINER, str(tmp_path), ending], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == returncode, result.stderr
    assert "save returned" in result.stdout
    folder = tmp_path / "checkpoint-1"
    assert find_problems(folder, manifest_of(folder), "checksum") == []
    assert json.loads((folder / "manifest.json").read_text())["step"] == 1


@pytest.mark.parametrize("threads", [1, 3])
def test_safetensors_writer_resumes_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    tensors = {f"t{i}": torch.randn(i * 7 + 1) for i in range(12)} | {"half": torch.ones(5, dtype=torch.bfloat16)}
    write_safetensors(tmp_path / "reference.safetensors", tensors, fsync=False)
    real_writev, real_pwritev = os.writev, os.pwritev

    def half_of_first(views: list[memoryview]) -> list[memoryview]:
        return [views[0][: max(1, len(views[0]) // 2)]]  # the kernel may write less than asked

    monkeypatch.setattr(os, "writev", lambda fd, views: real_writev(fd, half_of_first(views)))
    monkeypatch.setattr(os, "pwritev", lambda fd, views, offset: real_pwritev(fd, half_of_first(views), offset))
    monkeypatch.setattr(safetensors_io, "WRITE_THREADS", threads)
    write_safetensors(tmp_path / "short.safetensors", tensors, fsync=False)
    assert (tmp_path / "short.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert_same_tensors(load_file(str(tmp_path / "short.safetensors")), tensors)


def test_prepared_staging_buffers_are_the_ones_the_first_save_fills(tmp_path: Path) -> None:
    model, optimizer = wide_net()
    step(model, optimizer)  # the optimizer state exists from here on
    state = {"model": model, "optimizer": optimizer}
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "prepared")))
    manager.prepare_staging(state)
    manager._saver._writer.wait_for_preparation()
    stager = manager._saver._stagers[0]
    buffers_before = {key: buffer.data_ptr() for key, buffer in stager._buffers.items()}
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    state_bytes += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())
    assert stager.staged_bytes == state_bytes
    expected_model = copy.deepcopy(model.state_dict())
    expected_optimizer = copy.deepcopy(optimizer)
    manager.save(1, state)
    step(model, optimizer)  # changes everything right after the save returned
    manager.close()
    assert {key: buffer.data_ptr() for key, buffer in stager._buffers.items()} == buffers_before  # none reallocated
    restored, restored_optimizer = wide_net()
    CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "prepared"))).load(
        1, {"model": restored, "optimizer": restored_optimizer})
    assert_same_tensors(restored.state_dict(), expected_model)
    assert_same_optimizer_state(restored_optimizer, expected_optimizer)


def test_preparing_staging_does_not_hold_up_wait_for_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, optimizer = wide_net()
    step(model, optimizer)
    reserving = threading.Event()
    release = threading.Event()
    real_reserve = HostStager.reserve

    def slow_reserve(stager: HostStager, *args: Any, **kwargs: Any) -> int:
        reserving.set()
        release.wait(timeout=30)
        return real_reserve(stager, *args, **kwargs)

    monkeypatch.setattr(HostStager, "reserve", slow_reserve)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))) as manager:
        manager.prepare_staging({"model": model, "optimizer": optimizer})
        assert reserving.wait(timeout=30)
        manager.wait_for_staging()  # returns although the reservation is still running
        release.set()
        manager.save(1, {"model": model, "optimizer": optimizer})  # waits for it, then saves
    assert [info.step for info in manager.list()] == [1]
