"""Run by test_ddp.py under torchrun: a 2-process DDP Trainer run (CPU, gloo) with the callback, optionally
interrupted (an exception on every rank, or a preemption signal to rank 1 only) or resumed. Every rank saves
what it ends with (weights, optimizer state, its RNG state) to ROOT/final-{MODE}-rank{RANK}.pt; a resume that
fails with a CheckpointError writes the message to ROOT/error-rank{RANK}.txt instead.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.hf.ddp_train ROOT MODE {sync,async} [stock]

MODE is reference, crash, preempt or resume. `stock`: the stock saver writes every rank's files into the core's
staging folder (`CheckpointCallback.stock_saver = True`, the FSDP/DeepSpeed path) instead of the `hf` engine.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from ckpt_callbacks import CheckpointError
from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import TRAIN, CrashAtStep, Interrupted, tiny_gpt2, training_args

warnings.filterwarnings("ignore")
INTERRUPT_AT = 7  # after the checkpoint of step 6, two steps into epoch 2 (5 optimizer steps per epoch)


class SeedPerRank(TrainerCallback):
    """Gives every rank its own random streams (dropout masks differ per rank), so that a rank restored
    from another rank's RNG file would diverge. A resume overwrites these seeds with the saved states."""

    def __init__(self, base: int) -> None:
        self.base = base

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        seed = self.base + 1000 * args.process_index
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)


class SignalRankOne(TrainerCallback):
    """SIGUSR1 to rank 1 alone during step `step`, as a scheduler preempting one node would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step and args.process_index == 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def rng_states() -> dict[str, Any]:
    """This process's generators, as comparable tensors."""
    return {"cpu": torch.random.get_rng_state(), "python": torch.tensor(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}


def main(root: str, mode: str, async_mode: str, writer: str = "engine") -> None:
    torch.set_num_threads(1)
    args = training_args(Path(root), gradient_accumulation_steps=1, num_train_epochs=2, save_steps=3, save_total_limit=2,
                         ddp_backend="gloo", logging_steps=100)
    seed = 12345 if mode == "resume" else 0
    checkpointing = CheckpointCallback(async_save=async_mode == "async")
    checkpointing.stock_saver = True if writer == "stock" else None
    interruption: list[TrainerCallback] = {"crash": [CrashAtStep(INTERRUPT_AT)], "preempt": [SignalRankOne(INTERRUPT_AT)]}.get(mode, [])
    trainer = Trainer(model=tiny_gpt2(seed), args=args, train_dataset=TRAIN, data_collator=default_data_collator,
                      callbacks=[SeedPerRank(seed), *interruption, checkpointing])
    try:
        trainer.train(resume_from_checkpoint=True if mode == "resume" else None)
    except Interrupted:
        assert mode == "crash"
    except CheckpointError as exc:
        Path(root, f"error-rank{args.process_index}.txt").write_text(f"{type(exc).__name__}: {exc}")
        return
    final = {"global_step": trainer.state.global_step, "rng": rng_states(), "preempted": checkpointing.preempted,
             "weights": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
             "optimizer": trainer.optimizer.state_dict()}
    torch.save(final, Path(root) / f"final-{mode}-rank{args.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:5])
