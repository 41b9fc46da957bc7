"""(7) Lightning: `TorchCheckpointIO` and `AsyncCheckpointIO` vs this library's `CheckpointIOPlugin`.

Stall: `save_checkpoint(checkpoint, path)` of the dict Lightning builds (weights,
optimizer and scheduler state), called directly; the write is then awaited
outside the timed region (`teardown()`). Overhead: a `Trainer.fit` of N = 3K
steps saving every K steps (stock `ModelCheckpoint` with each stock
`CheckpointIO`, or our `CheckpointCallback` + `CheckpointIOPlugin`) vs the same
fit saving nothing, timed from the first batch to the end of step N, before
the save at step N (as in scenario 2), training on one thread (as there).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from benchmarks.common import (
    TrainingState,
    clear,
    gpt2,
    medians,
    ratio,
    row,
    scratch,
    sync_disk,
    timed,
    tokens,
    training_state,
)
from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.lightning import CheckpointCallback, CheckpointIOPlugin

SEQUENCE = 64
EVERY = {"tiny": 8, "45M": 8, "124M": 8}

TORCH = "TorchCheckpointIO"
ASYNC = "AsyncCheckpointIO(TorchCheckpointIO)"
OURS_SYNC = "ours, CheckpointIOPlugin, sync (durable)"
OURS = "ours, CheckpointIOPlugin, async"
NONE = "no checkpoints"


def run(size: str, repeats: int) -> dict[str, Any]:
    stall, nbytes = _stall(size, repeats)
    overhead = _overhead(size, max(1, repeats // 2))
    rows = [row(f"stall: {name}", values) for name, values in stall.items()]
    rows += [row(f"fit window: {name}", values) for name, values in overhead.items()]
    m = medians(rows)
    extra = {name: m[f"fit window: {name}"] - m[f"fit window: {NONE}"] for name in overhead if name != NONE}
    rows += [row(f"overhead: {name}", [seconds]) for name, seconds in extra.items()]
    return {
        "scenario": "lightning", "title": "(7) Lightning CheckpointIO: stall per save and fit overhead", "size": size,
        "bytes": nbytes, "rows": rows,
        "ratios": [
            ratio("stall: ours async / TorchCheckpointIO", m[f"stall: {OURS}"], m[f"stall: {TORCH}"], target=1 / 20),
            ratio("stall: ours async / AsyncCheckpointIO", m[f"stall: {OURS}"], m[f"stall: {ASYNC}"]),
            ratio("fit overhead: ours / TorchCheckpointIO", extra[OURS], extra[TORCH], target=0.1),
            ratio("fit overhead: ours / AsyncCheckpointIO", extra[OURS], extra[ASYNC]),
        ],
    }


def lightning_checkpoint(state: TrainingState, step: int) -> dict[str, Any]:
    """The dict `trainer.save_checkpoint` hands to the CheckpointIO (what dump_checkpoint builds)."""
    return {"epoch": 0, "global_step": step, "pytorch-lightning_version": L.__version__,
            "state_dict": state.model.state_dict(), "loops": {}, "callbacks": {}, "hparams_name": None,
            "optimizer_states": [state.optimizer.state_dict()], "lr_schedulers": [state.scheduler.state_dict()]}


def _stall(size: str, repeats: int) -> tuple[dict[str, list[float]], int]:
    state = training_state(size)
    plugins = {TORCH: TorchCheckpointIO(), ASYNC: AsyncCheckpointIO(TorchCheckpointIO()),
               OURS_SYNC: CheckpointIOPlugin(CheckpointArguments(async_save=False)), OURS: CheckpointIOPlugin()}
    seconds: dict[str, list[float]] = {name: [] for name in plugins}
    with scratch("lightning-stall") as root:
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            step = repeat + 1
            for name, plugin in plugins.items():
                path = _path(root / name.split(",")[0].replace(" ", "_"), name, step)
                state.touch()
                sync_disk()
                value = timed(partial(plugin.save_checkpoint, lightning_checkpoint(state, step), path))
                plugin.teardown()  # the write finishes outside the timed region
                clear(root)
                if repeat:
                    seconds[name].append(value)
    return seconds, state.nbytes


def _path(folder: Path, name: str, step: int) -> str:
    # Ours: the committed layout its CheckpointCallback asks for; stock: the file ModelCheckpoint would write.
    if name.startswith("ours"):
        return str(folder / f"checkpoint-{step}" / "checkpoint.ckpt")
    return str(folder / f"step={step}.ckpt")


class GPT2Module(L.LightningModule):
    def __init__(self, size: str) -> None:
        super().__init__()
        self.model = gpt2(size)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Window(Callback):
    def __init__(self, last: int) -> None:
        self.last = last
        self.start: float | None = None
        self.seconds = float("nan")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.last and self.start is not None:
            self.seconds = time.perf_counter() - self.start


def _overhead(size: str, repeats: int) -> dict[str, list[float]]:
    torch.set_num_threads(1)
    every = EVERY[size] if repeats > 1 else 4
    steps = 3 * every
    seconds: dict[str, list[float]] = {name: [] for name in (NONE, TORCH, ASYNC, OURS)}
    with scratch("lightning-fit") as root:
        for _ in range(repeats):
            for name in seconds:
                seconds[name].append(_fit(size, name, root, every, steps))
                clear(root)
    return seconds


def _fit(size: str, name: str, root: Path, every: int, steps: int) -> float:
    window = Window(steps)
    callbacks: list[Callback] = [window]
    plugins: list[Any] = []
    if name in (TORCH, ASYNC):
        callbacks.append(ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1))
        if name == ASYNC:
            plugins.append(AsyncCheckpointIO())
    elif name == OURS:
        callbacks.append(CheckpointCallback(CheckpointArguments(output_dir=str(root), save_steps=every, export_at_end=False)))
        plugins.append(CheckpointIOPlugin())
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=name != NONE, callbacks=callbacks,
                        plugins=plugins, default_root_dir=str(root), num_sanity_val_steps=0)
    data = torch.utils.data.DataLoader([tokens(1, SEQUENCE, seed=i)[0] for i in range(steps)], batch_size=1)
    sync_disk()
    trainer.fit(GPT2Module(size), train_dataloaders=data)
    return window.seconds
