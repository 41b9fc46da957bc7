"""A stock `transformers.Trainer` around a benchmark model, with or without this library's callback."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from benchmarks.common import TrainingState, tokens
from ckpt_callbacks.hf import CheckpointCallback


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count: int, length: int) -> None:
        self.batches = [tokens(1, length, seed=i)[0] for i in range(count)]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.batches[index], "labels": self.batches[index]}


def training_arguments(output_dir: Path, *, max_steps: int = 1, save_steps: int | None = None, **extra: Any) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=1, learning_rate=1e-4,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_strategy="no",
        report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0, **extra,
    )


def make_trainer(model: torch.nn.Module, output_dir: Path, callbacks: Sequence[TrainerCallback] = (), *,
                 samples: int = 8, length: int = 32, **arguments: Any) -> Trainer:
    return Trainer(model=model, args=training_arguments(output_dir, **arguments),
                   train_dataset=TokenDataset(samples, length), callbacks=list(callbacks))


def trainer_for(state: TrainingState, output_dir: Path, callbacks: Sequence[TrainerCallback] = (),
                **arguments: Any) -> Trainer:
    """A Trainer holding `state`'s model, optimizer and scheduler, as it does between steps of `train()`."""
    trainer = make_trainer(state.model, output_dir, callbacks, **arguments)
    trainer.optimizer = state.optimizer
    trainer.lr_scheduler = state.scheduler
    return trainer


def copying_callback(**flags: Any) -> CheckpointCallback:
    """The HF callback copying the state before each save returns, instead of during the next forward and
    backward pass (its default with async_save)."""
    callback = CheckpointCallback(**flags)
    callback.defer_staging = False
    return callback


def save_like_the_trainer(trainer: Trainer, step: int) -> None:
    """What the training loop calls at a save step (our callback replaces it on the instance when attached)."""
    trainer.state.global_step = step
    trainer._save_checkpoint(trainer.model, trial=None)
