"""Interrupt a Trainer run and resume it with the stock `trainer.train(resume_from_checkpoint=True)`:
the result equals the uninterrupted run bit for bit."""

from __future__ import annotations

import copy
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ckpt_callbacks.core.save.staging import HostStager, StagingPlan
from ckpt_callbacks.hf import CheckpointCallback
from tests.conftest import assert_same_tensors
from tests.hf.conftest import (
    MAX_STEPS,
    VOCAB,
    CrashAtStep,
    Interrupted,
    assert_same_state_dicts,
    checkpoint_steps,
    losses,
    make_trainer,
    weights,
)


@dataclass
class RunResult:
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    losses: list[tuple[int, float]]


def finished(trainer: Trainer) -> RunResult:
    return RunResult(weights(trainer.model), copy.deepcopy(trainer.optimizer.state_dict()), losses(trainer))


def assert_same_run(actual: RunResult, expected: RunResult) -> None:
    assert_same_tensors(actual.weights, expected.weights)
    assert_same_state_dicts(actual.optimizer, expected.optimizer)
    assert actual.losses == expected.losses
    assert [step for step, _ in actual.losses] == list(range(1, MAX_STEPS + 1))


def interrupt_then_resume(output_dir: Path, crash_at: int, model_factory: Any = None, **flags: Any) -> Trainer:
    """Run until `crash_at` raises, then resume in a fresh Trainer (other init seed) from the newest checkpoint."""
    def new_model(seed: int) -> Any:
        return model_factory(seed) if model_factory is not None else None

    crashing = make_trainer(output_dir, [CheckpointCallback(**flags), CrashAtStep(crash_at)], model=new_model(0))
    with pytest.raises(Interrupted):
        crashing.train()
    resumed = make_trainer(output_dir, [CheckpointCallback(**flags)], model=new_model(123), model_seed=123)
    resumed.train(resume_from_checkpoint=True)
    return resumed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    trainer = make_trainer(tmp_path_factory.mktemp("uninterrupted"), [CheckpointCallback(export_at_end=False)])
    trainer.train()
    return finished(trainer)


@pytest.mark.parametrize("async_save", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize(
    ("save_steps", "crash_at", "resumed_from"),
    [(5, 7, 5), (3, 8, 6)],
    ids=["epoch_boundary", "mid_epoch"],
)
def test_resume_after_interruption_is_bitwise_exact(
    tmp_path: Path, uninterrupted: RunResult, async_save: bool, save_steps: int, crash_at: int, resumed_from: int,
) -> None:
    # Checkpoints at multiples of save_steps; the run dies at crash_at, after the checkpoint of resumed_from
    # (an epoch is 5 steps: step 5 ends epoch 1, step 6 is one step into epoch 2).
    flags = dict(save_steps=save_steps, async_save=async_save, export_at_end=False)
    crashing = make_trainer(tmp_path, [CheckpointCallback(**flags), CrashAtStep(crash_at)])
    with pytest.raises(Interrupted):
        crashing.train()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / f"checkpoint-{resumed_from}")

    resumed = make_trainer(tmp_path, [CheckpointCallback(**flags)], model_seed=123)
    resumed.train(resume_from_checkpoint=True)

    assert_same_run(finished(resumed), uninterrupted)


class SignalAtStep(TrainerCallback):
    """Sends SIGUSR1 to this process during optimizer step `step`, as a preempting scheduler would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_saves_at_next_step_boundary_stops_and_resumes_exactly(tmp_path: Path, uninterrupted: RunResult) -> None:
    preempted = make_trainer(tmp_path, [SignalAtStep(6), CheckpointCallback(save_steps=100)])
    preempted.train()  # returns normally: the callback stopped training cleanly

    assert preempted.state.global_step == 6
    assert checkpoint_steps(tmp_path) == [6]
    assert not (tmp_path / "export").exists()  # no export for a preempted run
    resumed = make_trainer(tmp_path, [CheckpointCallback(save_steps=100, export_at_end=False)], model_seed=123)
    resumed.train(resume_from_checkpoint=True)
    assert_same_run(finished(resumed), uninterrupted)


class TiedLM(torch.nn.Module):
    """A plain nn.Module (not a PreTrainedModel) whose output layer shares the embedding's weight."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 16)
        self.drop = torch.nn.Dropout(0.1)
        self.head = torch.nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.head(self.drop(self.embed(input_ids)))
        return {"loss": F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1)), "logits": logits}


def test_stock_trainer_cannot_save_a_plain_module_with_tied_weights(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, model=TiedLM(0), max_steps=2, save_steps=2)
    with pytest.raises(RuntimeError, match="share memory"):
        trainer.train()


def test_plain_module_with_tied_weights_saves_and_resumes_exactly(tmp_path: Path) -> None:
    reference = make_trainer(tmp_path / "reference", [CheckpointCallback(export_at_end=False)], model=TiedLM(0))
    reference.train()
    expected = finished(reference)

    resumed = interrupt_then_resume(tmp_path / "run", crash_at=7, model_factory=TiedLM, export_at_end=False)

    assert_same_run(finished(resumed), expected)
    assert resumed.model.head.weight is resumed.model.embed.weight  # still tied after loading


FORWARD_RAN = threading.Event()


class RunningStatsLM(torch.nn.Module):
    """A plain module with a 400 KiB buffer that every forward pass updates in place, as BatchNorm statistics
    are: with deferred staging (the async default) the callback must copy it before the save returns."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(VOCAB, 320)
        self.head = torch.nn.Linear(320, VOCAB)
        self.register_buffer("feature_mean", torch.zeros(320, 320))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.embed(input_ids)
        with torch.no_grad():
            self.feature_mean.mul_(0.9).add_(features.mean((0, 1)), alpha=0.1)
        FORWARD_RAN.set()
        logits = self.head(features + self.feature_mean[0])
        return {"loss": F.cross_entropy(logits.view(-1, VOCAB), labels.view(-1)), "logits": logits}


def test_async_save_keeps_buffers_the_next_forward_updates_and_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_plan, real_run = HostStager.plan, StagingPlan.run
    deferred: list[StagingPlan] = []

    def plan(stager: HostStager, *args: Any, **kwargs: Any) -> StagingPlan:
        planned = real_plan(stager, *args, **kwargs)
        if kwargs.get("defer"):
            FORWARD_RAN.clear()  # in the save call, on the training thread
            deferred.append(planned)
        return planned

    def copy_after_the_next_forward(planned: StagingPlan) -> None:
        if any(p is planned for p in deferred):  # a deferred copy starts only once the next forward pass updated the buffer
            assert FORWARD_RAN.wait(timeout=30)
        real_run(planned)

    monkeypatch.setattr(HostStager, "plan", plan)
    monkeypatch.setattr(StagingPlan, "run", copy_after_the_next_forward)
    reference = make_trainer(tmp_path / "reference", [CheckpointCallback(export_at_end=False)], model=RunningStatsLM(0))
    reference.train()
    expected = finished(reference)

    resumed = interrupt_then_resume(tmp_path / "run", crash_at=7, model_factory=RunningStatsLM, export_at_end=False)

    assert_same_run(finished(resumed), expected)
    assert deferred  # the saves were deferred
