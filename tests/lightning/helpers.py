"""A tiny LightningModule and Trainer runs, built for either Lightning namespace."""

from __future__ import annotations

import importlib
import random
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")
ADAPTERS = {"lightning.pytorch": "ckpt_callbacks.lightning", "pytorch_lightning": "ckpt_callbacks.pytorch_lightning"}
BATCHES_PER_EPOCH = 10

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*ckpt_path.*")


class SimulatedCrash(RuntimeError):
    pass


@dataclass(frozen=True)
class Namespace:
    """One Lightning namespace: its module, our adapter built on it, and test classes built on it."""

    name: str
    pl: ModuleType
    adapter: ModuleType

    def __repr__(self) -> str:
        return self.name

    @property
    def Tiny(self) -> Any:
        return tiny_module_class(self.name)

    def callback_class(self, name: str) -> Any:
        return getattr(importlib.import_module(f"{self.name}.callbacks"), name)

    def trainer(self, root: Path, *, callbacks: list[Any], plugins: list[Any] | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("max_epochs", 3)
        return self.pl.Trainer(
            default_root_dir=str(root), accelerator="cpu", devices=1, callbacks=callbacks, plugins=plugins or [],
            logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs,
        )

    def ours(self, root: Path, **args: Any) -> tuple[Any, Any]:
        """(plugin, callback) of our adapter writing to `root/checkpoints`."""
        from ckpt_callbacks import CheckpointArguments

        args.setdefault("output_dir", str(root / "checkpoints"))
        args.setdefault("export_at_end", False)
        arguments = CheckpointArguments(**args)
        return self.adapter.CheckpointIOPlugin(arguments), self.adapter.CheckpointCallback(arguments)


def namespace(name: str) -> Namespace:
    return Namespace(name, importlib.import_module(name), importlib.import_module(ADAPTERS[name]))


@cache
def tiny_module_class(name: str) -> Any:
    pl = importlib.import_module(name)

    class Tiny(pl.LightningModule):  # type: ignore[name-defined,misc]
        """Dropout, Adam and a per-step StepLR: every piece of state a resume must get right."""

        def __init__(self, hidden: int = 16, lr: float = 1e-2, val_losses: tuple[float, ...] = ()) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Dropout(0.5), nn.Linear(hidden, 1))
            self.seen: list[list[int]] = []

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y, index = batch
            self.seen.append(index.tolist())
            return nn.functional.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y, _ = batch
            loss = nn.functional.mse_loss(self.net(x), y)
            if self.hparams.val_losses:  # a scripted metric, to know which epoch is the best
                loss = torch.tensor(self.hparams.val_losses[self.current_epoch])
            self.log("val_loss", loss)

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4, gamma=0.5)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    return Tiny


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset(n: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=generator), torch.randn(n, 1, generator=generator), torch.arange(n))


def train_loader(num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset(4 * BATCHES_PER_EPOCH, 123), batch_size=4, shuffle=True, num_workers=num_workers)


def val_loader() -> DataLoader:
    return DataLoader(dataset(8, 7), batch_size=4)


def crash_callback(ns: Namespace, at_step: int) -> Any:
    """Raises after optimizer step `at_step`, before Checkpoint callbacks (Lightning runs those last) see it."""

    class Crash(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == at_step:
                raise SimulatedCrash(f"simulated crash after step {at_step}")

    return Crash()


def training_state(trainer: Any) -> dict[str, Any]:
    """Everything that must match after an exact resume: weights, optimizer, scheduler, step."""
    return {
        "weights": {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()},
        "optimizer": trainer.optimizers[0].state_dict(),
        "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "global_step": trainer.global_step,
    }


def tensors_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def weights_of(module: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def weight_recorder(ns: Namespace, hook: str = "on_train_epoch_end") -> Any:
    """Records the module's weights at `hook`, keyed by global step (it runs before our Checkpoint callback,
    which Lightning always calls last, so it sees the weights that callback saves)."""

    class Recorder(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            self.weights: dict[int, dict[str, torch.Tensor]] = {}
            self.start_step: int | None = None
            self.start_weights: dict[str, torch.Tensor] = {}

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.start_step = trainer.global_step
            self.start_weights = weights_of(pl_module)

    def record(self: Any, trainer: Any, pl_module: Any, *args: Any) -> None:
        self.weights[trainer.global_step] = weights_of(pl_module)

    setattr(Recorder, hook, record)
    return Recorder()


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.iterdir() if p.name.startswith("checkpoint-"))
