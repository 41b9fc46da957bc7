"""A resume through the callback reads the optimizer and scheduler files ahead, on a background thread,
and the stock Trainer restores exactly what is in the checkpoint it resumes from: never another's, never a
damaged file's, and never instead of a subclass's own loader."""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Trainer, TrainerCallback

from ckpt_callbacks import CheckpointCorruptError
from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import assert_same_state_dicts, make_trainer, training_args
from tests.hf.test_layout import flip_one_byte


class OptimizerAtFirstStep(TrainerCallback):
    """The optimizer and scheduler states as the resumed run starts its first step."""

    def __init__(self) -> None:
        self.optimizer: dict[str, Any] | None = None
        self.scheduler: dict[str, Any] | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, lr_scheduler: Any = None,
                      **kwargs: Any) -> None:
        if self.optimizer is None:
            self.optimizer = copy.deepcopy(optimizer.state_dict())  # the run goes on updating it in place
            self.scheduler = copy.deepcopy(lr_scheduler.state_dict())


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """(file name, thread name, mapped) of every torch.load from a path."""
    calls: list[tuple[str, str, bool]] = []
    load = torch.load

    def recording_load(f: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(f, (str, Path)):
            calls.append((Path(f).name, threading.current_thread().name, bool(kwargs.get("mmap"))))
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return calls


def saved_states(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    return (torch.load(checkpoint / "optimizer.pt", weights_only=True),
            torch.load(checkpoint / "scheduler.pt", weights_only=True))


def resume(output_dir: Path, **flags: Any) -> OptimizerAtFirstStep:
    seen = OptimizerAtFirstStep()
    callback = CheckpointCallback(export_at_end=False, **flags)
    make_trainer(output_dir, [callback, seen], model_seed=7, max_steps=10).train(resume_from_checkpoint=True)
    return seen


def test_resume_restores_the_optimizer_read_ahead_exactly(tmp_path: Path, torch_loads: list) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    torch_loads.clear()
    seen = resume(tmp_path)
    reads = [call for call in torch_loads if call[0] in ("optimizer.pt", "scheduler.pt")]

    optimizer, scheduler = saved_states(tmp_path / "checkpoint-8")
    assert seen.optimizer is not None and seen.optimizer["state"]
    assert_same_state_dicts(seen.optimizer, optimizer)
    assert seen.scheduler == scheduler
    # Read once each, mapped, on the read-ahead thread: the stock loader's own reads never ran.
    assert sorted(reads) == [("optimizer.pt", "ckpt-read-ahead_0", True), ("scheduler.pt", "ckpt-read-ahead_0", True)]


@pytest.mark.parametrize("damaged", ["optimizer.pt", "model.safetensors"])
def test_a_fallback_resume_restores_the_fallback_checkpoints_optimizer(tmp_path: Path, damaged: str) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    flip_one_byte(tmp_path / "checkpoint-8" / damaged)  # read ahead before its verification fails

    seen = resume(tmp_path, fallback_to_verified=True)

    optimizer, scheduler = saved_states(tmp_path / "checkpoint-4")
    assert_same_state_dicts(seen.optimizer, optimizer)
    assert seen.scheduler == scheduler


def test_a_damaged_optimizer_file_stops_the_resume_before_anything_is_restored(tmp_path: Path) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    flip_one_byte(tmp_path / "checkpoint-8" / "optimizer.pt")
    trainer = make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], model_seed=7, max_steps=10)
    before = {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}

    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-8/optimizer\.pt: checksum mismatch"):
        trainer.train(resume_from_checkpoint=True)
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-read-ahead")]


class OwnOptimizerLoader(Trainer):
    loaded_from: list[str] = []

    def _load_optimizer_and_scheduler(self, checkpoint: Any) -> None:
        if checkpoint is not None:
            self.loaded_from.append(Path(checkpoint).name)
        super()._load_optimizer_and_scheduler(checkpoint)


def test_a_subclass_with_its_own_optimizer_loader_keeps_it(tmp_path: Path, torch_loads: list) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    torch_loads.clear()
    seen = OptimizerAtFirstStep()
    base = make_trainer(tmp_path, max_steps=10)
    trainer = OwnOptimizerLoader(model=base.model, args=training_args(tmp_path, max_steps=10),
                                 train_dataset=base.train_dataset, data_collator=base.data_collator,
                                 callbacks=[CheckpointCallback(export_at_end=False), seen])
    trainer.train(resume_from_checkpoint=True)

    assert OwnOptimizerLoader.loaded_from == ["checkpoint-8"]
    assert [call for call in torch_loads if call[0] == "optimizer.pt"] == [("optimizer.pt", "MainThread", False)]
    assert_same_state_dicts(seen.optimizer, saved_states(tmp_path / "checkpoint-8")[0])
