"""(10) Under load: how long a save takes to become durable with every core busy, and what a crash loses.

Real training keeps every core busy (dataloader workers, other jobs); here two processes that each spin a core
run beside training ("loaded") or not ("idle"). Training runs on one thread, as in scenario (2). The writer
thread runs at niceness 0 (the default now) or 10 (before).

- The HF Trainer with our callback (async, defaults) and a plain loop with `CheckpointManager` (async, deferred
  staging), STEPS steps saving every EVERY: per save, the time from the save call until the checkpoint is
  durable (`SaveStats.total_seconds`), its largest value over the run against the interval between two saves,
  and the run's wall time against the same run without saves (the overhead), beside the seconds the library
  reported training waited (`SaveStats.blocking_seconds`, summed): the two agree when every wait is counted.
  The HF runs use a tiny GPT-2 whose steps take milliseconds, the plain loop the size's GPT-2.
- A crash: a Trainer process (tiny GPT-2, loaded machine) killed with SIGKILL 1, 2 or 3 steps after a save
  returned; counted: how often that save was committed (listed, every checksum verified) when the process died.
  This is the recovery point: a crash loses the work since the newest durable checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import CpuHogs, gpt2, medians, ratio, row, scratch, sync_disk, tokens
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.save.writer import BackgroundWriter

HOGS = 2
STEPS = {"tiny": 24, "45M": 8}
EVERY = {"tiny": 6, "45M": 4}
KILLS = 6  # per niceness, with 1, 2, 3 steps between the save and the kill in turn
NICENESS = (0, 10)
REPO = Path(__file__).resolve().parents[1]


def run(size: str, repeats: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    durable: dict[str, list[float]] = {}
    worst: dict[str, list[float]] = {}
    interval: dict[str, list[float]] = {}
    wall: dict[str, list[float]] = {}
    reported: dict[str, list[float]] = {}
    frameworks = ("HF Trainer", "plain loop") if size == "tiny" else ("plain loop",)
    with scratch(f"loaded-{size}") as root:
        for _ in range(repeats):
            for load in ("idle", "loaded"):
                with CpuHogs(HOGS if load == "loaded" else 0):
                    for framework in frameworks:
                        for niceness in (None, *NICENESS):  # None: no saves
                            name = f"{framework}, {load}, " + ("no saves" if niceness is None else f"writer at niceness {niceness}")
                            seconds, saves = _train(framework, size, root / "run", niceness)
                            wall.setdefault(name, []).append(seconds)
                            if saves:
                                reported.setdefault(name, []).append(sum(s[2] for s in saves))
                                durable.setdefault(name, []).extend(s[0] for s in saves)
                                worst.setdefault(name, []).append(max(s[0] for s in saves))
                                interval.setdefault(name, []).append(_interval(saves))
        crashes = _crashes(root / "crash") if size == "tiny" else {}
    rows = [row(f"{name}: call to durable, every save", values) for name, values in durable.items()]
    rows += [row(f"{name}: call to durable, slowest save of the run", values) for name, values in worst.items()]
    rows += [row(f"{name}: interval between saves", values) for name, values in interval.items()]
    rows += [row(f"{name}: wall time", values) for name, values in wall.items()]
    for name, values in wall.items():
        if "no saves" not in name:
            baseline = wall[name.rsplit(", ", 1)[0] + ", no saves"]
            rows.append(row(f"{name}: overhead vs no saves", [a - b for a, b in zip(values, baseline, strict=True)]))
            rows.append(row(f"{name}: blocking the library reported (sum over the run)", reported[name]))
    for niceness, committed in crashes.items():
        rows.append(row(f"crash 1-3 steps after a save (HF Trainer, loaded, niceness {niceness}): save committed",
                        [float(c) for c in committed], unit="of 1"))
    m = medians(rows)
    ratios = []
    for framework in frameworks:
        for niceness in NICENESS:
            loaded, idle = f"{framework}, loaded, writer at niceness {niceness}", f"{framework}, idle, writer at niceness {niceness}"
            ratios.append(ratio(f"{framework}, niceness {niceness}: call to durable, loaded / idle",
                                m[f"{loaded}: call to durable, every save"], m[f"{idle}: call to durable, every save"],
                                target=1.5 if niceness == 0 else None))
            ratios.append(ratio(f"{framework}, niceness {niceness}, loaded: slowest save to durable / save interval",
                                max(worst[loaded]), min(interval[loaded]), target=1.0 if niceness == 0 else None))
    for framework in frameworks:
        for load in ("idle", "loaded"):
            name = f"{framework}, {load}, writer at niceness 0"
            ratios.append(ratio(f"{framework}, {load}: blocking reported / overhead measured", m[
                f"{name}: blocking the library reported (sum over the run)"], m[f"{name}: overhead vs no saves"]))
    for niceness, committed in crashes.items():
        ratios.append(ratio(f"crash 1-3 steps after a save, niceness {niceness}: share of saves lost",
                            committed.count(False), len(committed), target=0.0 if niceness == 0 else None))
    return {"scenario": "loaded", "title": f"(10) under load: {HOGS} CPU-bound processes beside training", "size": size,
            "rows": rows, "ratios": ratios}


def _interval(saves: list[tuple[float, float, float]]) -> float:
    """The shortest time between two consecutive save calls of a run."""
    calls = sorted(at for _, at, _ in saves)
    return min(b - a for a, b in zip(calls, calls[1:], strict=False)) if len(calls) > 1 else float("nan")


Saves = list[tuple[float, float, float]]  # per save: seconds from the call to durable, when it was called, blocking


def _train(framework: str, size: str, folder: Path, niceness: int | None) -> tuple[float, Saves]:
    """Wall seconds of the run and its saves."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    sync_disk()
    BackgroundWriter.niceness = niceness or 0
    try:
        if framework == "HF Trainer":
            return _hf_run(folder, niceness is not None)
        return _loop_run(size, folder, niceness is not None)
    finally:
        BackgroundWriter.niceness = 0


def _loop_run(size: str, folder: Path, saving: bool) -> tuple[float, Saves]:
    model = gpt2(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    objects = {"model": model, "optimizer": optimizer}
    manager = CheckpointManager(CheckpointArguments(output_dir=str(folder), save_total_limit=2)) if saving else None
    saves = []
    started = time.perf_counter()
    for step in range(1, STEPS[size] + 1):
        batch = tokens(1, 32, seed=step)
        model(input_ids=batch, labels=batch).loss.backward()
        if manager is not None:
            manager.wait_for_staging()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if manager is not None and step % EVERY[size] == 0:
            at = time.perf_counter()
            manager.save(step, objects, defer_staging=True)
            saves.append((manager.last_save, at))
    if manager is not None:
        manager.close()  # the run ends with its last save durable, as train() does
    seconds = time.perf_counter() - started
    return seconds, [(stats.total_seconds or float("nan"), at, stats.blocking_seconds) for stats, at in saves
                     if stats is not None]


def _hf_run(folder: Path, saving: bool) -> tuple[float, Saves]:
    from transformers import PrinterCallback

    from benchmarks.hf_setup import make_trainer
    from ckpt_callbacks.core.save.saver import Saver
    from ckpt_callbacks.hf import CheckpointCallback

    calls: list[tuple[Any, float]] = []
    submit = Saver.submit

    def recording_submit(saver: Saver, *args: Any, **kwargs: Any) -> Any:
        at = time.perf_counter()
        stats = submit(saver, *args, **kwargs)
        calls.append((stats, at))
        return stats

    Saver.submit = recording_submit  # type: ignore[method-assign]
    try:
        callbacks = [CheckpointCallback(export_at_end=False)] if saving else []
        trainer = make_trainer(gpt2("tiny"), folder, callbacks, samples=STEPS["tiny"], length=32, max_steps=STEPS["tiny"],
                               save_steps=EVERY["tiny"] if saving else None)
        trainer.remove_callback(PrinterCallback)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    finally:
        Saver.submit = submit  # type: ignore[method-assign]
    return seconds, [(stats.total_seconds or float("nan"), at, stats.blocking_seconds) for stats, at in calls]


CRASHING_TRAINER = """
import sys, torch
torch.set_num_threads(1)
from transformers import TrainerCallback
from benchmarks.common import gpt2, quiet
from benchmarks.hf_setup import make_trainer
from ckpt_callbacks.core.save.writer import BackgroundWriter
from ckpt_callbacks.hf import CheckpointCallback
quiet()
BackgroundWriter.niceness = int(sys.argv[2])

class Steps(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        print(f"step {state.global_step}", flush=True)

trainer = make_trainer(gpt2("tiny"), sys.argv[1], [CheckpointCallback(export_at_end=False), Steps()], samples=400,
                       length=32, max_steps=400, save_steps=int(sys.argv[3]))
trainer.train()
"""


def _crashes(root: Path) -> dict[int, list[bool]]:
    """Per niceness: for each killed run, whether the save just before the kill was committed."""
    from ckpt_callbacks.core.format.manifest import read_manifest_file
    from ckpt_callbacks.core.read.verify import find_problems

    every = EVERY["tiny"]
    committed: dict[int, list[bool]] = {niceness: [] for niceness in NICENESS}
    with CpuHogs(HOGS):
        for attempt in range(KILLS):
            for niceness in NICENESS:
                folder = root / f"n{niceness}-{attempt}"
                after = 1 + attempt % 3
                saved_step = _run_until_killed(folder, niceness, every, after)
                checkpoint = folder / f"checkpoint-{saved_step}"
                ok = (checkpoint / "manifest.json").is_file() and not find_problems(
                    checkpoint, read_manifest_file(checkpoint / "manifest.json"), "checksum")
                committed[niceness].append(ok)
    return committed


def _run_until_killed(folder: Path, niceness: int, every: int, after: int) -> int:
    """Start the trainer, SIGKILL it `after` steps after its second save; returns that save's step."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TRANSFORMERS_VERBOSITY="error")
    process = subprocess.Popen([sys.executable, "-c", CRASHING_TRAINER, str(folder), str(niceness), str(every)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    saved_step = 2 * every
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= saved_step + after:
                break
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    return saved_step
