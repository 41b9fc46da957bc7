"""A plain PyTorch loop with ckpt_callbacks: save every few steps, get interrupted, resume exactly.

Run: python examples/plain_pytorch.py [--output-dir runs/plain]
"""

from __future__ import annotations

import argparse
import random
import shutil

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.state.data_position import DataPosition

EPOCHS = 3


class Interrupted(Exception):
    pass


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, DataLoader]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 8), torch.randn(64, 1))
    loader = DataLoader(data, batch_size=8, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=EPOCHS * len(loader))
    return model, optimizer, scheduler, loader


def train(output_dir: str, *, resume: bool, crash_at: int | None = None) -> torch.nn.Module:
    model, optimizer, scheduler, loader = build()
    position = DataPosition()
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "data": position}
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, save_steps=5, save_total_limit=2))
    step = 0
    if resume:
        step, meta = manager.load_last(state)
        print(f"resumed from step {step} (epoch {meta['epoch']:.2f})")
    try:
        for epoch in range(position.epoch, EPOCHS):
            resuming_this_epoch = resume and epoch == position.epoch
            batches = position.resume(loader) if resuming_this_epoch else position.start_epoch(epoch, loader)
            for inputs, targets in batches:
                loss = torch.nn.functional.mse_loss(model(inputs), targets)
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                position.advance()
                step += 1
                if manager.should_save_step(step, max_steps=EPOCHS * len(loader)):
                    manager.save(step, state, metrics={"loss": loss.item()}, epoch=epoch + position.batches_consumed / len(loader))
                if step == crash_at:
                    raise Interrupted(f"simulated crash at step {step}")
    finally:
        manager.close()  # waits for the background write, then releases the folder
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output-dir", default="runs/plain_pytorch")
    output_dir = parser.parse_args().output_dir
    shutil.rmtree(output_dir, ignore_errors=True)
    reference = train(f"{output_dir}/reference", resume=False)
    try:
        train(f"{output_dir}/run", resume=False, crash_at=13)
    except Interrupted as exc:
        print(exc)
    resumed = train(f"{output_dir}/run", resume=True)
    same = all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values(), strict=True))
    print(f"final weights equal to the uninterrupted run: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
