"""(4b) Resume inside `trainer.train()`: what a resume adds before training goes on, stock vs the HF callback.

The stock Trainer and a Trainer with `CheckpointCallback` each run one step and
save it (checkpoint-1: weights, AdamW state of the Trainer's own optimizer,
scheduler, RNG, trainer state). Then, each in a fresh process, the same Trainer
runs `train(resume_from_checkpoint=checkpoint-1)` and, for reference, `train()`
from scratch; both are timed from the call until the first training step begins
(`on_step_begin`). The resume's cost is the difference: everything the resume
adds (reading and verifying the checkpoint, restoring it) and nothing the two
share (building the data loader, wrapping the model, callbacks).

Ours verifies every checksum (the default) and reads the optimizer state ahead
while the Trainer sets up, which only a measurement inside `train()` can show;
`benchmarks/resume.py` times the load calls alone, with nothing to overlap.
Every checkpoint is read once before each run (warm page cache).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from benchmarks.common import (
    gpt2,
    in_fresh_process,
    medians,
    quiet,
    ratio,
    read_into_page_cache,
    row,
    scratch,
    sync_disk,
)
from benchmarks.hf_setup import make_trainer
from ckpt_callbacks.hf import CheckpointCallback

STOCK = "stock Trainer"
OURS = "HF callback (checksums verified)"
RESUME = "train(resume_from_checkpoint=...) until the first step"
FRESH = "train() from scratch until the first step"
COST = "resume cost (difference)"


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.at: float | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.at is None:
            self.at = time.perf_counter()


def run(size: str, repeats: int) -> dict[str, Any]:
    seconds: dict[tuple[str, str], list[float]] = {(who, how): [] for who in (STOCK, OURS) for how in (RESUME, FRESH)}
    with scratch("resume-in-train") as root:
        _child("save", STOCK, size, root)
        _child("save", OURS, size, root)
        nbytes = sum(p.stat().st_size for p in (root / "stock" / "checkpoint-1").iterdir())
        sync_disk()
        for _ in range(repeats):
            for key in seconds:
                read_into_page_cache(root / "stock")
                read_into_page_cache(root / "ours")
                seconds[key].append(_child(key[1], key[0], size, root))
    rows = [row(f"{who}: {how}", values) for (who, how), values in seconds.items()]
    for who in (STOCK, OURS):
        rows.append(row(f"{who}: {COST}", [a - b for a, b in zip(seconds[who, RESUME], seconds[who, FRESH], strict=True)]))
    m = medians(rows)
    return {
        "scenario": "resume_in_train", "title": "(4b) resume inside trainer.train() (warm page cache)", "size": size,
        "bytes": nbytes, "rows": rows,
        "ratios": [
            ratio("ours / stock, resume cost", m[f"{OURS}: {COST}"], m[f"{STOCK}: {COST}"], target=0.5),
            ratio("ours / stock, train() until the first step", m[f"{OURS}: {RESUME}"], m[f"{STOCK}: {RESUME}"]),
        ],
    }


def _child(how: str, who: str, size: str, root: Path) -> float:
    return float(in_fresh_process("benchmarks.resume_in_train", how, who, size, str(root)))


def _trainer(who: str, size: str, root: Path, **arguments: Any) -> tuple[Any, FirstStep]:
    first_step = FirstStep()
    callbacks: list[TrainerCallback] = [first_step]
    if who == OURS:
        callbacks.insert(0, CheckpointCallback(export_at_end=False))
    folder = root / ("stock" if who == STOCK else "ours")
    return make_trainer(gpt2(size, seed=1), folder, callbacks, **arguments), first_step


def _here(how: str, who: str, size: str, root: Path) -> float:
    """In a fresh process: save checkpoint-1, or time `train()` until its first step (resuming or not)."""
    quiet()
    if how == "save":
        trainer, _ = _trainer(who, size, root, max_steps=1, save_steps=1)
        trainer.train()
        return 0.0
    trainer, first_step = _trainer(who, size, root, max_steps=2)
    checkpoint = str(root / ("stock" if who == STOCK else "ours") / "checkpoint-1")
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint if how == RESUME else None)
    assert first_step.at is not None
    if how == RESUME:
        assert trainer.optimizer.state, "the optimizer state was not restored"
    return first_step.at - start


if __name__ == "__main__":
    print(json.dumps(_here(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))))
