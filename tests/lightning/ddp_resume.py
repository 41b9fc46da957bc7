"""Run by test_ddp.py: train on 2 CPU processes with DDP (gloo), optionally crash or resume; every rank saves its
final weights and RNG state. Lightning's "ddp" strategy re-executes this script for rank 1, so it must be a file
of its own.

    python -m tests.lightning.ddp_resume NAMESPACE ROOT {reference,crash,resume}
"""

from __future__ import annotations

import random
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tests.lightning.helpers import (
    Namespace,
    SimulatedCrash,
    crash_callback,
    namespace,
    seed_everything,
    train_loader,
    val_loader,
)

warnings.filterwarnings("ignore")


def seed_per_rank(ns: Namespace, base: int) -> Any:
    """Gives every rank its own random streams (dropout masks differ per rank), so that a rank restored from
    another rank's RNG state would diverge. `setup` runs before a checkpoint is restored, which overrides it."""

    class SeedPerRank(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            seed_everything(base + 1000 * trainer.global_rank)

    return SeedPerRank()


def rng_states() -> dict[str, torch.Tensor]:
    """This process's generators, as comparable tensors."""
    return {"cpu": torch.random.get_rng_state(), "python": torch.tensor(random.getstate()[1]),
            "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}


def main(namespace_name: str, root: str, mode: str) -> None:
    ns = namespace(namespace_name)
    seed = 12345 if mode == "resume" else 0
    seed_everything(seed)
    module = ns.Tiny()
    plugin, callback = ns.ours(Path(root), save_steps=3)
    callbacks = [seed_per_rank(ns, seed), callback] + ([crash_callback(ns, 7)] if mode == "crash" else [])
    trainer = ns.pl.Trainer(default_root_dir=root, accelerator="cpu", devices=2, strategy="ddp", callbacks=callbacks,
                            plugins=[plugin], logger=False, enable_progress_bar=False, enable_model_summary=False,
                            max_epochs=2, num_sanity_val_steps=0)
    try:
        trainer.fit(module, train_loader(), val_loader(), ckpt_path="last" if mode == "resume" else None)
    except SimulatedCrash:
        assert mode == "crash"
    torch.save({"weights": module.state_dict(), "global_step": trainer.global_step, "rng": rng_states(),
                "resumed_from": callback.manager.resumed_from_step}, Path(root) / f"final-{mode}-rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:4])
