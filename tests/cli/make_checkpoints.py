"""Write the checkpoints the CLI tests read, with real trainers, in one process (imports cost more than runs).

    python tests/cli/make_checkpoints.py OUT

OUT/hf-stock           stock transformers.Trainer run (tiny GPT-2, CPU, no callback): checkpoint-2, checkpoint-4
OUT/hf-callback        the same run with ckpt_callbacks' CheckpointCallback: checkpoint-N folders with manifests
OUT/lightning-stock    stock lightning.Trainer + ModelCheckpoint: epoch=0-step=2.ckpt, epoch=0-step=4.ckpt
OUT/lightning-plugin   lightning.Trainer with CheckpointIOPlugin + CheckpointCallback: checkpoint-N/checkpoint.ckpt
OUT/lightning-files    the same run's stock ModelCheckpoint through the plugin: .ckpt files with sidecar manifests
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def gpt2_trainer(output_dir: Path, callbacks: list) -> object:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8))]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=4, save_steps=2, eval_strategy="steps", eval_steps=2,
        per_device_train_batch_size=4, per_device_eval_batch_size=8, report_to=[], use_cpu=True,
        logging_steps=100, disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=callbacks)


def make_hf(out: Path) -> None:
    from ckpt_callbacks.hf import CheckpointCallback

    gpt2_trainer(out / "hf-stock", []).train()  # type: ignore[attr-defined]
    gpt2_trainer(out / "hf-callback", [CheckpointCallback(async_save=False, export_at_end=False)]).train()  # type: ignore[attr-defined]


def make_lightning(out: Path) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from ckpt_callbacks import CheckpointArguments
    from ckpt_callbacks.lightning import CheckpointCallback, CheckpointIOPlugin

    class Regressor(L.LightningModule):
        def __init__(self, hidden: int = 8) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))

        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            return torch.nn.functional.mse_loss(self.model(inputs), targets)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    def fit(callbacks: list, plugins: list, root: Path) -> None:
        torch.manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
        trainer = L.Trainer(max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=str(root), callbacks=callbacks, plugins=plugins)
        trainer.fit(Regressor(), torch.utils.data.DataLoader(data, batch_size=4))

    stock = ModelCheckpoint(dirpath=str(out / "lightning-stock"), every_n_train_steps=2, save_top_k=-1)
    fit([stock], [], out / "lightning-stock-root")
    ours = CheckpointCallback(CheckpointArguments(output_dir=str(out / "lightning-plugin"), save_steps=2,
                                                  async_save=False, export_at_end=False))
    stock_through_plugin = ModelCheckpoint(dirpath=str(out / "lightning-files"), every_n_train_steps=2, save_top_k=-1)
    fit([ours, stock_through_plugin], [CheckpointIOPlugin(async_save=False)], out / "lightning-plugin-root")


if __name__ == "__main__":
    target = Path(sys.argv[1])
    make_hf(target)
    make_lightning(target)
