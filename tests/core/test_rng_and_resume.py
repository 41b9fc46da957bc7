"""RNG round trips and exact resume of a plain PyTorch loop (dropout + shuffled DataLoader)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.state.data_position import DataPosition
from ckpt_callbacks.core.state.rng import capture_rng_state, restore_rng_state

from ..conftest import TinyNet, assert_same_optimizer_state, assert_same_tensors, seed_everything


def draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def test_rng_round_trip_restores_python_numpy_and_torch() -> None:
    seed_everything(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    expected = draws()
    seed_everything(99)
    restore_rng_state(state)
    assert draws() == expected


@pytest.mark.parametrize("engine", ["safetensors", "torch", "hf"])
def test_rng_round_trip_through_every_engine(tmp_path: Path, engine: str) -> None:
    seed_everything(3)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine=engine, async_save=False))
    manager.save(1, {})
    expected = draws()
    seed_everything(42)
    manager.load(manager.latest(), {})
    assert draws() == expected


def run_training(output_dir: Path, *, stop_after: int | None, resume: bool, async_save: bool, epochs: int = 3) -> TinyNet:
    """A plain loop: shuffled DataLoader, dropout, AdamW, StepLR; saves every 4 steps."""
    seed_everything(0)
    dataset = TensorDataset(torch.randn(40, 6), torch.randn(40, 3))
    loader = DataLoader(dataset, batch_size=4, shuffle=True)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.5)
    position = DataPosition()
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": position}
    manager = CheckpointManager(CheckpointArguments(output_dir=str(output_dir), save_steps=4, async_save=async_save))
    step = 0
    if resume:
        step, _ = manager.load_last(objects)
    for epoch in range(position.epoch, epochs):
        batches = position.resume(loader) if resume and epoch == position.epoch else position.start_epoch(epoch, loader)
        for x, y in batches:
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            position.advance()
            step += 1
            if manager.should_save_step(step):
                manager.save(step, objects, epoch=epoch + position.batches_consumed / len(loader))
            if stop_after is not None and step == stop_after:
                manager.close()
                return model
        resume = False
    manager.close()
    return model


@pytest.mark.parametrize("async_save", [False, True])
@pytest.mark.parametrize("stop_after", [8, 20], ids=["mid-epoch", "epoch-boundary"])
def test_plain_loop_resume_reproduces_the_uninterrupted_run(tmp_path: Path, async_save: bool, stop_after: int) -> None:
    reference = run_training(tmp_path / "reference", stop_after=None, resume=False, async_save=async_save)
    interrupted_dir = tmp_path / "interrupted"
    run_training(interrupted_dir, stop_after=stop_after + 1, resume=False, async_save=async_save)  # dies one step after a save
    resumed = run_training(interrupted_dir, stop_after=None, resume=True, async_save=async_save)
    assert_same_tensors(reference.state_dict(), resumed.state_dict())


def test_resumed_optimizer_state_is_bitwise_equal(tmp_path: Path) -> None:
    seed_everything(0)
    model = TinyNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        model(torch.randn(2, 6)).sum().backward()
        optimizer.step()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    manager.save(3, {"model": model, "optimizer": optimizer})
    manager.wait()
    fresh_model = TinyNet()
    fresh_optimizer = torch.optim.AdamW(fresh_model.parameters(), lr=1e-2)
    manager.load_last({"model": fresh_model, "optimizer": fresh_optimizer})
    assert_same_optimizer_state(optimizer, fresh_optimizer)
