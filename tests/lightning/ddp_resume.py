"""Run by test_ddp.py: train on 2 CPU processes with DDP (gloo), optionally crash or resume; rank 0 saves the
final weights. Lightning's "ddp" strategy re-executes this script for rank 1, so it must be a file of its own.

    python -m tests.lightning.ddp_resume NAMESPACE ROOT {reference,crash,resume}
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from tests.lightning.helpers import (
    SimulatedCrash,
    crash_callback,
    namespace,
    seed_everything,
    train_loader,
    val_loader,
)

warnings.filterwarnings("ignore")


def main(namespace_name: str, root: str, mode: str) -> None:
    ns = namespace(namespace_name)
    seed_everything(12345 if mode == "resume" else 0)
    module = ns.Tiny()
    plugin, callback = ns.ours(Path(root), save_steps=3)
    callbacks = [callback] + ([crash_callback(ns, 7)] if mode == "crash" else [])
    trainer = ns.pl.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp", callbacks=callbacks,
                            plugins=[plugin], logger=False, enable_progress_bar=False, enable_model_summary=False,
                            max_epochs=2, num_sanity_val_steps=0)
    try:
        trainer.fit(module, train_loader(), val_loader(), ckpt_path="last" if mode == "resume" else None)
    except SimulatedCrash:
        assert mode == "crash"
    if trainer.global_rank == 0:
        torch.save({"weights": module.state_dict(), "global_step": trainer.global_step,
                    "resumed_from": callback.manager.resumed_from_step}, Path(root) / f"final-{mode}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
