"""(4) Resume time: the stock Trainer's `resume_from_checkpoint` loading vs this library's load.

Stock: what `trainer.train(resume_from_checkpoint=...)` runs before training
(`_load_from_checkpoint`, `_load_optimizer_and_scheduler`, `_load_rng_state`)
on a checkpoint the stock Trainer wrote. Ours: `CheckpointManager.load` of the
same state saved by the plain manager (safetensors engine), verifying
checksums (the default) and sizes only. Both restore into the same live model,
optimizer and scheduler, from a warm page cache (the checkpoints were just
written); variants alternate within a repeat.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from benchmarks.common import medians, ratio, row, scratch, sync_disk, timed, training_state
from benchmarks.hf_setup import save_like_the_trainer, trainer_for
from ckpt_callbacks import CheckpointArguments, CheckpointManager

STOCK = "stock resume (model, optimizer, scheduler, RNG)"
OURS = "ours, load with checksum verification (default)"
OURS_SIZE = "ours, load verifying sizes only"


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    seconds: dict[str, list[float]] = {STOCK: [], OURS: [], OURS_SIZE: []}
    with scratch("resume") as root:
        trainer = trainer_for(state, root / "stock")
        save_like_the_trainer(trainer, 1)
        stock_checkpoint = str(root / "stock" / "checkpoint-1")
        with CheckpointManager(CheckpointArguments(output_dir=str(root / "ours"), async_save=False)) as manager:
            manager.save(1, state.objects)
        loaders = {
            OURS: CheckpointManager(CheckpointArguments(output_dir=str(root / "ours"), verify_on_load="checksum")),
            OURS_SIZE: CheckpointManager(CheckpointArguments(output_dir=str(root / "ours"), verify_on_load="size")),
        }
        sync_disk()
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            measured = {
                STOCK: timed(partial(_stock_resume, trainer, stock_checkpoint)),
                OURS: timed(partial(loaders[OURS].load, 1, state.objects)),
                OURS_SIZE: timed(partial(loaders[OURS_SIZE].load, 1, state.objects)),
            }
            if repeat:
                for name, value in measured.items():
                    seconds[name].append(value)
    rows = [row(name, values) for name, values in seconds.items()]
    m = medians(rows)
    return {
        "scenario": "resume", "title": "(4) resume: load a checkpoint into live objects (warm page cache)",
        "size": size, "bytes": state.nbytes, "rows": rows,
        "ratios": [
            ratio("ours (checksums) / stock", m[OURS], m[STOCK], target=0.5),
            ratio("ours (sizes) / stock", m[OURS_SIZE], m[STOCK], target=0.5),
        ],
    }


def _stock_resume(trainer: Any, checkpoint: str) -> None:
    trainer._load_from_checkpoint(checkpoint)
    trainer._load_optimizer_and_scheduler(checkpoint)
    trainer._load_rng_state(checkpoint)
