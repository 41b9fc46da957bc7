"""Run by test_cli_and_ddp.py: two fits on 2 CPU processes with DDP (gloo), the second resuming from the first's
step-5 checkpoint; rank 0 records each fit. Lightning's "ddp" strategy re-executes this module for rank 1, so it
is a file of its own.

    python -m tests.parity.lightning.ddp_scenario NAMESPACE {stock,plugin,ours} ROOT
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

from tests.lightning.helpers import namespace
from tests.parity.lightning.differential import Run, checkpoint_attributes, normalize

warnings.filterwarnings("ignore")


def main(namespace_name: str, flavor: str, root: str) -> None:
    run = Run(namespace(namespace_name), Path(root), flavor)

    def trainer(max_epochs: int) -> object:
        checkpoint = run.checkpointing({"every_n_train_steps": 5, "save_top_k": -1, "save_last": True},
                                       {"save_steps": 5})
        return run.trainer([checkpoint], max_epochs=max_epochs, devices=2, strategy="ddp")

    first = trainer(2)  # 40 samples, 2 ranks, batch 4: 5 batches per epoch on each rank
    run.fit(first, run.module(seed=0))
    resume = (run.dirpath / "checkpoint-5" / "checkpoint.ckpt") if run.ours else (run.dirpath / "epoch=0-step=5.ckpt")
    second = trainer(3)
    run.fit(second, run.module(seed=1), ckpt_path=str(resume))
    if second.global_rank == 0:
        callbacks = [normalize(checkpoint_attributes(cb), run.root) for cb in second.checkpoint_callbacks]
        for fit in run.fits:
            fit.error = None if fit.error is None else RuntimeError(repr(fit.error))  # picklable
        torch.save({"fits": run.fits, "callbacks": callbacks}, Path(root).parent / f"{flavor}-result.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
