"""(4) Resume time: the stock Trainer's `resume_from_checkpoint` loading vs this library's load.

A resume is a new process, so every measurement runs in a fresh one: build the
model, an optimizer without state and a scheduler (untimed), then time the load
and, separately, the first optimizer step after it (which pays for any state
the load left unread). Stock: what `trainer.train(resume_from_checkpoint=...)`
runs before training (`_load_from_checkpoint`, `_load_optimizer_and_scheduler`,
`_load_rng_state`) on a checkpoint the stock Trainer wrote. Ours, plain:
`CheckpointManager.load` of the same state written by the plain manager
(safetensors engine), verifying checksums (the default) or sizes only. Ours, HF
callback: the same three stock calls on a checkpoint the callback wrote (stock
layout), after the callback's own step in `train()` (resolve the checkpoint and
verify its checksums, reading the optimizer and scheduler files ahead meanwhile).
In a real `train()` the Trainer's setup between that step and the optimizer load
also overlaps the read; here nothing does, so the figure is conservative.

Warm: every checkpoint is read once before the runs, so all are in the page
cache (ours are written with O_DIRECT and would otherwise not be). Cold: the
files are dropped from the page cache (`posix_fadvise(DONTNEED)`) before each
run, as for a resume in a new job.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    TrainingState,
    drop_from_page_cache,
    gpt2,
    in_fresh_process,
    medians,
    quiet,
    ratio,
    read_into_page_cache,
    row,
    scratch,
    sync_disk,
    training_state,
)
from benchmarks.hf_setup import save_like_the_trainer, trainer_for
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.hf import CheckpointCallback

STOCK = "stock"
OURS = "ours, checksums verified (default)"
OURS_SIZE = "ours, sizes verified"
OURS_HF = "ours, HF callback (stock layout, checksums verified)"
STOCK_COLD = "stock, cold page cache"
OURS_COLD = "ours, checksums verified, cold page cache"
OURS_HF_COLD = "ours, HF callback, cold page cache"
NAMES = (STOCK, OURS, OURS_SIZE, OURS_HF, STOCK_COLD, OURS_COLD, OURS_HF_COLD)
FOLDERS = {STOCK: "stock", STOCK_COLD: "stock", OURS_HF: "hf", OURS_HF_COLD: "hf"}  # the others: "ours"
COLD = (STOCK_COLD, OURS_COLD, OURS_HF_COLD)


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    load: dict[str, list[float]] = {name: [] for name in NAMES}
    step: dict[str, list[float]] = {name: [] for name in NAMES}
    with scratch("resume") as root:
        save_like_the_trainer(trainer_for(state, root / "stock"), 1)
        with CheckpointManager(CheckpointArguments(output_dir=str(root / "ours"), async_save=False)) as manager:
            manager.save(1, state.objects)
        callback = CheckpointCallback(async_save=False, export_at_end=False)
        save_like_the_trainer(trainer_for(state, root / "hf", callbacks=[callback]), 1)
        assert callback.manager is not None
        callback.manager.close()
        nbytes = state.nbytes
        del state
        sync_disk()
        for _ in range(repeats):
            for name in NAMES:
                if name in COLD:
                    drop_from_page_cache(root / FOLDERS.get(name, "ours"))
                else:
                    for folder in ("stock", "ours", "hf"):
                        read_into_page_cache(root / folder)
                seconds = in_fresh_process("benchmarks.resume", name, size, str(root))
                load[name].append(seconds["load"])
                step[name].append(seconds["step"])
    rows = [row(f"{name}: load", values) for name, values in load.items()]
    rows += [row(f"{name}: first optimizer step after it", values) for name, values in step.items()]
    rows += [row(f"{name}: load + first step", [a + b for a, b in zip(load[name], step[name], strict=True)])
             for name in load]
    m = medians(rows)
    return {
        "scenario": "resume", "title": "(4) resume in a fresh process (warm page cache)", "size": size,
        "bytes": nbytes, "rows": rows,
        "ratios": [
            ratio("ours / stock, load", m[f"{OURS}: load"], m[f"{STOCK}: load"], target=0.5),
            ratio("ours / stock, load + first step", m[f"{OURS}: load + first step"], m[f"{STOCK}: load + first step"],
                  target=0.5),
            ratio("ours (sizes) / stock, load + first step", m[f"{OURS_SIZE}: load + first step"],
                  m[f"{STOCK}: load + first step"], target=0.5),
            ratio("ours (HF callback) / stock, load", m[f"{OURS_HF}: load"], m[f"{STOCK}: load"], target=0.5),
            ratio("ours (HF callback) / stock, load + first step", m[f"{OURS_HF}: load + first step"],
                  m[f"{STOCK}: load + first step"]),
            ratio("cold: ours / stock, load + first step", m[f"{OURS_COLD}: load + first step"],
                  m[f"{STOCK_COLD}: load + first step"]),
            ratio("cold: ours (HF callback) / stock, load + first step", m[f"{OURS_HF_COLD}: load + first step"],
                  m[f"{STOCK_COLD}: load + first step"]),
        ],
    }


def _resume_here(name: str, size: str, root: Path) -> dict[str, float]:
    """In a fresh process: build the objects, time the load and the first optimizer step."""
    quiet()
    model = gpt2(size, seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for parameter in model.parameters():
        parameter.grad = torch.zeros_like(parameter)
    if name in (STOCK, STOCK_COLD):
        trainer = trainer_for(TrainingState(size, model, optimizer, scheduler), root / "stock-resume")
        checkpoint = str(root / "stock" / "checkpoint-1")

        def load() -> None:
            trainer._load_from_checkpoint(checkpoint)
            trainer._load_optimizer_and_scheduler(checkpoint)
            trainer._load_rng_state(checkpoint)
    elif name in (OURS_HF, OURS_HF_COLD):
        callback = CheckpointCallback(export_at_end=False)
        trainer = trainer_for(TrainingState(size, model, optimizer, scheduler), root / "hf", callbacks=[callback])
        requested = str(root / "hf" / "checkpoint-1")

        def load() -> None:
            checkpoint = callback._resume_checkpoint(requested)  # what the callback's `train` wrapper runs first
            trainer._load_from_checkpoint(checkpoint)
            trainer._load_optimizer_and_scheduler(checkpoint)
            trainer._load_rng_state(checkpoint)
    else:
        verify = "size" if name == OURS_SIZE else "checksum"
        manager = CheckpointManager(CheckpointArguments(output_dir=str(root / "ours"), verify_on_load=verify))

        def load() -> None:
            manager.load(1, {"model": model, "optimizer": optimizer, "scheduler": scheduler})
    start = time.perf_counter()
    load()
    loaded = time.perf_counter()
    optimizer.step()
    stepped = time.perf_counter()
    assert optimizer.state, "the optimizer state was not restored"
    return {"load": loaded - start, "step": stepped - loaded}


if __name__ == "__main__":
    print(json.dumps(_resume_here(sys.argv[1], sys.argv[2], Path(sys.argv[3]))))
