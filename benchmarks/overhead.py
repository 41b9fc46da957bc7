"""(2) Wall-time overhead of saving every K steps vs saving nothing, stock vs this library.

Each run trains a fresh GPT-2 for N = 3K steps and times the window from the
first step's start to the end of step N, before the final save the `steps`
strategy adds (so every run ends the same way and no run is charged for
waiting on its last write). The window holds the saves of steps K and 2K and,
for asynchronous saves, their background writes: K steps are long enough for
the disk to keep up (the durable write time is reported beside). Overhead =
window with saves - window without, per repeat (the variants of one repeat
run back to back), median over repeats.

Training runs on one thread (`torch.set_num_threads(1)`). On the shared
2-core reference machine, two-thread training ran 2-3x slower whenever
anything else ran (its OpenMP barriers spin), which swamped every difference
measured here; one thread is repeatable, and it leaves a core for background
work, as the host CPU of GPU training has.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from transformers import PrinterCallback, TrainerCallback

from benchmarks.common import clear, gpt2, medians, ratio, row, scratch, sync_disk, tokens
from benchmarks.hf_setup import make_trainer
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.hf import CheckpointCallback

SEQUENCE = 64
EVERY = {"tiny": 8, "45M": 8, "124M": 8}

HF_NONE = "HF Trainer, no saves"
HF_STOCK = "HF Trainer, stock saves"
HF_OURS = "HF Trainer + our callback (async, default)"
LOOP_NONE = "plain loop, no saves"
LOOP_DEFERRED = "plain loop + manager (async, deferred staging)"


class Window:
    """Wall and process CPU seconds (all threads) between `start()` and `stop()`."""

    def __init__(self) -> None:
        self.wall = self.cpu = float("nan")
        self._started: tuple[float, float] | None = None

    def start(self) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def stop(self) -> None:
        assert self._started is not None
        self.wall = time.perf_counter() - self._started[0]
        self.cpu = time.process_time() - self._started[1]


class StepClock(TrainerCallback):
    """Times the first step's start to the end of step `last`."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.window = Window()
        self._started = False

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not self._started:
            self._started = True
            self.window.start()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.last:
            self.window.stop()


def run(size: str, repeats: int, every: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    every = every or (EVERY[size] if repeats > 1 else 4)
    steps = 3 * every
    names = (HF_NONE, HF_STOCK, HF_OURS, LOOP_NONE, LOOP_DEFERRED)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    durable: list[float] = []
    with scratch("overhead") as root:
        for _ in range(repeats):
            for name in names:
                if name.startswith("HF"):
                    window = _hf_run(size, root / "run", name, every, steps)
                else:
                    window, write = _loop_run(size, root / "run", name, every, steps)
                    if write is not None:
                        durable.append(write)
                wall[name].append(window.wall)
                cpu[name].append(window.cpu)
                clear(root)
    baseline = {name: HF_NONE if name.startswith("HF") else LOOP_NONE for name in names}
    saving = [name for name in names if name not in (HF_NONE, LOOP_NONE)]

    def paired(times: dict[str, list[float]], name: str) -> list[float]:
        return [a - b for a, b in zip(times[name], times[baseline[name]], strict=True)]

    rows = [row(name, values) for name, values in wall.items()]
    rows += [row(f"overhead: {name}", paired(wall, name), note="window - window without saves, same repeat")
             for name in saving]
    rows += [row(f"CPU overhead: {name}", paired(cpu, name),
                 note="process CPU seconds (all threads), same repeat") for name in saving]
    rows.append(row("durable write of one async save (plain loop)", durable))
    m = medians(rows)
    return {
        "scenario": "overhead", "title": f"(2) training wall time, {steps} steps, a save every {every}",
        "size": size, "rows": rows, "every": every, "steps": steps,
        "ratios": [
            ratio("overhead: our callback / stock", m[f"overhead: {HF_OURS}"], m[f"overhead: {HF_STOCK}"], target=0.1),
            ratio("overhead: plain loop, deferred / stock HF", m[f"overhead: {LOOP_DEFERRED}"],
                  m[f"overhead: {HF_STOCK}"], target=0.1),
            ratio("CPU overhead: our callback / stock", m[f"CPU overhead: {HF_OURS}"], m[f"CPU overhead: {HF_STOCK}"]),
        ],
    }


def _hf_run(size: str, output_dir: Any, name: str, every: int, steps: int) -> Window:
    clock = StepClock(steps)
    callbacks: list[TrainerCallback] = [clock]
    if name == HF_OURS:
        callbacks.append(CheckpointCallback(export_at_end=False))
    trainer = make_trainer(gpt2(size), output_dir, callbacks, samples=steps, length=SEQUENCE, max_steps=steps,
                           save_steps=None if name == HF_NONE else every)
    trainer.remove_callback(PrinterCallback)
    sync_disk()
    trainer.train()
    return clock.window


def _loop_run(size: str, output_dir: Any, name: str, every: int, steps: int) -> tuple[Window, float | None]:
    model = gpt2(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    objects = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    manager = None if name == LOOP_NONE else CheckpointManager(
        CheckpointArguments(output_dir=str(output_dir)))
    sync_disk()
    window = Window()
    window.start()
    for step in range(1, steps + 1):
        batch = tokens(1, SEQUENCE, seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        if manager is not None:
            manager.wait_for_staging()  # where an adapter waits: just before the optimizer step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if manager is not None and step == 1:
            manager.prepare_staging(objects)  # the optimizer state exists now: allocate the staging buffers
        if manager is not None and step % every == 0 and step < steps:
            manager.save(step, objects, defer_staging=True)
    window.stop()
    if manager is None:
        return window, None
    manager.close()
    assert manager.last_save is not None
    return window, manager.last_save.total_seconds
