"""ckpt_callbacks with Lightning: save, get preempted, resume exactly with ckpt_path="last", export.

    python examples/lightning/train.py [--output-dir runs/lightning-example]

Everything is local and runs on CPU in seconds: a small classifier trained on a CSV dataset that the
script writes once into the output folder. The script

1. trains with the plugin and callback (a checkpoint every 15 steps, written in the background and
   committed atomically) and receives SIGTERM in the middle of an epoch, as on a preempted cluster
   node: the callback saves at the next step and `fit` returns;
2. resumes in a new Trainer with `fit(ckpt_path="last")`, seeded differently on purpose, and checks
   the final weights equal an uninterrupted run's bit for bit (shuffling, dropout, Adam, StepLR);
3. reads the sharded safetensors export written at train end and scores it on the data.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.lightning import CheckpointCallback, CheckpointIOPlugin

FEATURES = 4
PREEMPT_AT_STEP = 40  # the middle of epoch 2 (16 batches per epoch)


def write_dataset(path: Path, samples: int = 512) -> None:
    """Two noisy interleaved spirals in 4-D, as CSV: the 'local dataset' of this example."""
    generator = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 2, (samples,), generator=generator)
    angle = torch.rand(samples, generator=generator) * 6.0
    radius = angle / 6.0
    sign = labels * 2 - 1
    noise = 0.05 * torch.randn(samples, FEATURES, generator=generator)
    x = torch.stack([sign * radius * angle.cos(), sign * radius * angle.sin(),
                     radius * angle.cos(), radius * angle.sin()], dim=1) + noise
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([f"x{i}" for i in range(FEATURES)] + ["label"])
        for row, label in zip(x.tolist(), labels.tolist(), strict=True):
            writer.writerow([f"{v:.6f}" for v in row] + [label])


class CsvDataset(Dataset):
    def __init__(self, path: Path) -> None:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        self.x = torch.tensor([[float(r[f"x{i}"]) for i in range(FEATURES)] for r in rows])
        self.y = torch.tensor([int(r["label"]) for r in rows])

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class SpiralData(L.LightningDataModule):
    def __init__(self, csv_path: Path) -> None:
        super().__init__()
        self.csv_path = csv_path

    def setup(self, stage: str) -> None:
        dataset = CsvDataset(self.csv_path)
        self.train, self.val = torch.utils.data.random_split(dataset, [448, 64], torch.Generator().manual_seed(0))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=28, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=64)


class Classifier(L.LightningModule):
    def __init__(self, hidden: int = 64, lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Dropout(0.2),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)]


class PreemptAt(L.Callback):
    """Stands in for the cluster: SIGTERM while step `step` is computed."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step - 1:
            os.kill(os.getpid(), signal.SIGTERM)


def train(run_dir: Path, data: Path, *, seed: int, ckpt_path: str | None = None,
          extra_callbacks: tuple[L.Callback, ...] = ()) -> tuple[L.Trainer, Classifier, CheckpointCallback]:
    L.seed_everything(seed, verbose=False)
    args = CheckpointArguments(output_dir=str(run_dir / "checkpoints"), save_steps=15, save_total_limit=2,
                               metric_for_best_model="val_loss", async_save=True, export_at_end=True,
                               max_shard_size="10KB")
    callback = CheckpointCallback(args)
    trainer = L.Trainer(max_epochs=8, default_root_dir=str(run_dir), plugins=[CheckpointIOPlugin(args)],
                        callbacks=[callback, *extra_callbacks], logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    model = Classifier()
    trainer.fit(model, datamodule=SpiralData(data), ckpt_path=ckpt_path)
    return trainer, model, callback


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/lightning-example")
    out = Path(parser.parse_args().output_dir)
    shutil.rmtree(out, ignore_errors=True)  # a fresh run: an existing output folder would be resumed from
    out.mkdir(parents=True)
    data = out / "spirals.csv"
    write_dataset(data)

    print("1. Training; SIGTERM arrives during step", PREEMPT_AT_STEP)
    _, _, callback = train(out / "run", data, seed=0, extra_callbacks=(PreemptAt(PREEMPT_AT_STEP),))
    print(f"   preempted={callback.preempted}; committed:", [f"checkpoint-{i.step}" for i in callback.manager.list()])

    print('2. Resuming in a new Trainer with fit(ckpt_path="last") and another seed')
    trainer, model, callback = train(out / "run", data, seed=1234, ckpt_path="last")
    print(f"   resumed from checkpoint-{callback.manager.resumed_from_step}, finished at step {trainer.global_step}")
    print("   best:", callback.best_model_path, f"(val_loss {float(callback.best_model_score):.4f})")

    _, reference, _ = train(out / "uninterrupted", data, seed=0)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values(),
                                                 strict=True))
    print("   final weights equal the uninterrupted run's:", same)

    export_dir = callback.output_dir / "export"
    exported: dict[str, torch.Tensor] = {}
    for shard in sorted(export_dir.glob("*.safetensors")):
        exported.update(load_file(shard))
    scorer = Classifier()
    scorer.load_state_dict(exported)
    scorer.eval()
    dataset = CsvDataset(data)
    accuracy = (scorer(dataset.x).argmax(-1) == dataset.y).float().mean().item()
    print(f"3. Export: {len(list(export_dir.iterdir()))} files in {export_dir}; accuracy {accuracy:.2%}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
