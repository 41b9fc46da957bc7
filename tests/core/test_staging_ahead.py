"""Host buffers reserved ahead of a save, without any extra call: after a load once training runs, and for the
next stager when several saves may be in flight; the writer thread's priority."""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.save.staging import HostStager, describe
from ckpt_callbacks.core.save.writer import BackgroundWriter

from ..conftest import assert_same_optimizer_state, assert_same_tensors


def wide_net(seed: int = 0) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.ReLU(), torch.nn.Linear(300, 300),
                                torch.nn.ReLU(), torch.nn.Linear(300, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 6)).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    tensors = [*model.state_dict().values(), *(t for s in optimizer.state.values() for t in s.values()
                                                if isinstance(t, torch.Tensor))]
    return sum(t.numel() * t.element_size() for t in tensors)


def buffers_of(manager: CheckpointManager, index: int = 0) -> dict[Any, int]:
    return {key: buffer.data_ptr() for key, buffer in manager._saver._stagers[index]._buffers.items()}


def saved_run(folder: Path) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, optimizer = wide_net()
    step(model, optimizer)
    with CheckpointManager(CheckpointArguments(output_dir=str(folder), async_save=False)) as manager:
        manager.save(1, {"model": model, "optimizer": optimizer})
    return model, optimizer


def test_a_resumed_run_reserves_its_first_saves_buffers_once_training_runs(tmp_path: Path) -> None:
    saved_run(tmp_path)
    model, optimizer = wide_net(seed=1)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    manager.load(1, {"model": model, "optimizer": optimizer})
    assert manager._saver._stagers[0].staged_bytes == 0  # a script that only loads holds no staging memory
    manager.should_save_step(2)  # the training loop runs
    manager._saver._writer.wait_for_preparation()
    reserved = buffers_of(manager)
    assert manager._saver._stagers[0].staged_bytes == state_bytes(model, optimizer)
    step(model, optimizer)
    expected_model, expected_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer)
    manager.save(2, {"model": model, "optimizer": optimizer})
    step(model, optimizer)  # changes everything right after the save returned
    manager.close()
    assert buffers_of(manager) == reserved  # the first save filled the reserved buffers, none reallocated
    restored, restored_optimizer = wide_net(seed=2)
    CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))).load(
        2, {"model": restored, "optimizer": restored_optimizer})
    assert_same_tensors(restored.state_dict(), expected_model)
    assert_same_optimizer_state(restored_optimizer, expected_optimizer)


def test_buffers_reserved_for_pieces_the_save_leaves_out_are_freed(tmp_path: Path) -> None:
    saved_run(tmp_path)
    model, optimizer = wide_net(seed=1)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), save_only_model=True))
    manager.load(1, {"model": model, "optimizer": optimizer})
    manager.wait_for_staging()  # the adapters' call before each optimizer step starts the reservation too
    manager._saver._writer.wait_for_preparation()
    assert manager._saver._stagers[0].staged_bytes == state_bytes(model, optimizer)
    with manager:
        manager.save(2, {"model": model, "optimizer": optimizer})  # the optimizer is not saved
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert manager._saver._stagers[0].staged_bytes == weights


def test_with_two_saves_in_flight_the_second_stager_is_reserved_after_the_first_save(tmp_path: Path) -> None:
    model, optimizer = wide_net()
    step(model, optimizer)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), max_in_flight=2))
    manager.save(1, {"model": model, "optimizer": optimizer})
    manager._saver._writer.wait_for_preparation()
    reserved = buffers_of(manager, 1)
    assert manager._saver._stagers[1].staged_bytes == state_bytes(model, optimizer)
    step(model, optimizer)
    expected_model, expected_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer)
    manager.save(2, {"model": model, "optimizer": optimizer})
    step(model, optimizer)
    manager.close()
    assert buffers_of(manager, 1) == reserved
    restored, restored_optimizer = wide_net(seed=2)
    CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))).load(
        2, {"model": restored, "optimizer": restored_optimizer})
    assert_same_tensors(restored.state_dict(), expected_model)
    assert_same_optimizer_state(restored_optimizer, expected_optimizer)


def test_a_description_holds_shapes_and_sharing_but_no_memory() -> None:
    weight = torch.randn(50, 40)
    state = {"a": weight, "tied": weight, "other": {"b": torch.zeros(3, dtype=torch.int64)}}
    description = describe(state)
    assert description["a"].device.type == "meta" and description["a"].shape == (50, 40)
    assert description["tied"] is description["a"]
    assert description["other"]["b"].dtype == torch.int64
    stager = HostStager()
    assert stager.reserve(description, prefix=("model",)) == 50 * 40 * 4 + 3 * 8
    staged = stager.stage(state, prefix=("model",))
    assert staged["tied"] is staged["a"] and torch.equal(staged["a"], weight)
    assert stager.release_unused_reservations() == 0  # the snapshot took every reserved buffer


class HeldEngine(SafetensorsEngine):
    name = "held_for_priority_test"
    gate = threading.Event()

    def save(self, state: Any, relpath: str) -> None:
        assert self.gate.wait(timeout=30)
        super().save(state, relpath)


def writer_thread_niceness(tmp_path: Path) -> int:
    HeldEngine.gate.clear()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine="held_for_priority_test"))
    before = set(threading.enumerate())
    try:
        manager.save(1, {"model": torch.nn.Linear(3, 3)})
        writer = next(t for t in set(threading.enumerate()) - before if t.name.startswith("ckpt-writer"))
        assert writer.native_id is not None
        return os.getpriority(os.PRIO_PROCESS, writer.native_id)
    finally:
        HeldEngine.gate.set()
        manager.close()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread priorities are a Linux feature")
def test_the_writer_thread_runs_at_the_priority_of_the_training_process(tmp_path: Path) -> None:
    assert writer_thread_niceness(tmp_path / "default") == os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="per-thread priorities are a Linux feature")
def test_a_lower_writer_priority_is_added_to_the_process_niceness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(BackgroundWriter, "niceness", 3)
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert writer_thread_niceness(tmp_path / "lowered") == min(19, own + 3)


def test_provenance_is_gathered_off_the_training_thread_once_the_loop_runs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ckpt_callbacks.core import manager as manager_module
    from ckpt_callbacks.core.format.manifest import read_manifest_file

    threads: list[str] = []

    def recording_git_commit() -> str:
        threads.append(threading.current_thread().name)
        return "0" * 40

    monkeypatch.setattr(manager_module, "git_commit", recording_git_commit)
    model, optimizer = wide_net()
    step(model, optimizer)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))) as manager:
        manager.should_save_step(1)
        manager.save(1, {"model": model, "optimizer": optimizer})
    assert threads == ["ckpt-provenance"]
    assert read_manifest_file(tmp_path / "checkpoint-1" / "manifest.json").git_commit == "0" * 40
