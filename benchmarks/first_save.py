"""(9) The first async save of a run: how long it blocks by default, in each entry point, before and after the
library reserves staging buffers ahead by itself.

Fresh memory costs its page faults when first written (several times the copy into buffers already in use), and
the first save of a run is the first to copy the state anywhere. Every repeat runs in a fresh process (as a new
run does), the variants one after the other in a rotated order, freed memory handed back to the system between
them, each save durable before the next variant starts. Before each save every tensor is modified in place.

- floors: copying every tensor into fresh memory (`empty_like` + `copy_`), and into buffers already touched;
- ours, plain manager, fresh run: the first `save()` of a manager that has seen nothing before but two of the
  loop's `should_save_step()` calls (nothing can be reserved ahead: the state is first seen at that call);
- ours, plain manager, resumed run: `load()`, the loop's first `should_save_step()`, then the first save, with the
  reservation ahead (the default) and without it (`Saver.reserve_ahead = False`: the behaviour before). The
  reservation runs in the background; it is waited for before the save, as any loop with a few steps between
  its resume and its first save gives it time to finish (its duration is reported);
- ours, plain manager, `max_in_flight=2`: the second save, the second stager's first (reserved ahead after the
  first save by default);
- ours, HF callback: the first save of `trainer.train()` (save at step 2 of 3; the callback reserves after the
  first optimizer step, and its deferred copy overlaps the next forward/backward);
- DCP `async_save` (thread checkpointer, a new `DefaultStager` staging in the background): its first save,
  until the state may change again.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    TrainingState,
    gb,
    in_fresh_process,
    medians,
    quiet,
    ratio,
    return_free_memory,
    row,
    scratch,
    single_process_group,
    sync_disk,
    timed,
    training_state,
)
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.save.saver import Saver, SaveStats

FLOOR_FRESH = "floor: copy into fresh memory"
FLOOR_REUSED = "floor: copy into buffers in use"
FRESH = "ours, plain manager, fresh run: first save"
RESUMED = "ours, plain manager, resumed run: first save (reserved ahead, default)"
RESUMED_BEFORE = "ours, plain manager, resumed run: first save (reserve_ahead=False, as before)"
RESERVATION = "ours, plain manager, resumed run: background reservation took (not a stall)"
SECOND = "ours, plain manager, max_in_flight=2: second save (reserved ahead, default)"
SECOND_BEFORE = "ours, plain manager, max_in_flight=2: second save (reserve_ahead=False, as before)"
STEADY = "ours, plain manager: a later save (buffers in use)"
HF = "ours, HF callback: first save of train() (save + wait before the next optimizer step)"
DCP = "DCP async_save, thread, new DefaultStager: first save until the state may change"
VARIANTS = ("floors", "fresh", "resumed", "resumed_before", "second", "second_before", "hf", "dcp")


def run(size: str, repeats: int) -> dict[str, Any]:
    runs: dict[str, list[float]] = {}
    nbytes = 0
    for repeat in range(repeats):
        order = VARIANTS[repeat % len(VARIANTS):] + VARIANTS[:repeat % len(VARIANTS)]
        measured = in_fresh_process("benchmarks.first_save", size, ",".join(order))
        nbytes = measured.pop("bytes")
        for name, seconds in measured.items():
            runs.setdefault(name, []).append(seconds)
    rows = [row(name, values) for name, values in runs.items()]
    m = medians(rows)
    return {
        "scenario": "first_save", "title": "(9) the first async save", "size": size, "bytes": nbytes, "rows": rows,
        "ratios": [
            ratio("resumed first save: reserved ahead / before", m[RESUMED], m[RESUMED_BEFORE]),
            ratio("resumed first save (default) / a later save", m[RESUMED], m[STEADY], target=1.5),
            ratio("max_in_flight=2 second save: reserved ahead / before", m[SECOND], m[SECOND_BEFORE]),
            ratio("max_in_flight=2 second save (default) / a later save", m[SECOND], m[STEADY], target=1.5),
            ratio("fresh-run first save / copy into fresh memory (floor)", m[FRESH], m[FLOOR_FRESH], target=1.2),
            ratio("fresh-run first save / DCP's first save", m[FRESH], m[DCP], target=1.0),
            ratio("HF callback first save / a later plain save", m[HF], m[STEADY]),
        ],
        "per_gb": {name: m[name] / gb(nbytes) for name in (FRESH, RESUMED, SECOND, STEADY, DCP, FLOOR_FRESH)},
    }


# ---------------------------------------------------------------------------------------------- one fresh process


def _measure_all(size: str, order: list[str]) -> dict[str, float]:
    quiet()
    state = training_state(size)
    measured: dict[str, float] = {"bytes": state.nbytes}
    with scratch(f"first-save-{size}") as root:
        source = root / "source"
        with CheckpointManager(CheckpointArguments(output_dir=str(source), async_save=False)) as manager:
            manager.save(1, state.objects)  # what the resumed variants load
        # Whatever a process pays at its first large copy (thread pools, allocator) is paid here, not by the
        # variant that happens to run first; the memory is handed back before the variants run.
        warm_up = [torch.empty_like(t).copy_(t) for t in state.tensors()]
        del warm_up
        for variant in order:
            return_free_memory()
            sync_disk()
            measured.update(VARIANT_RUNS[variant](state, root / variant, source))
    return measured


def _floors(state: TrainingState, folder: Path, source: Path) -> dict[str, float]:
    tensors = state.tensors()
    fresh: list[torch.Tensor] = []
    state.touch()
    seconds = timed(lambda: fresh.extend(torch.empty_like(t).copy_(t) for t in tensors))
    state.touch()
    reused = timed(lambda: [buffer.copy_(t) for buffer, t in zip(fresh, tensors, strict=True)])
    return {FLOOR_FRESH: seconds, FLOOR_REUSED: reused}


def _fresh(state: TrainingState, folder: Path, source: Path) -> dict[str, float]:
    with CheckpointManager(CheckpointArguments(output_dir=str(folder))) as manager:
        for step in (1, 2):  # a loop's steps before its first save
            manager.should_save_step(step)
            state.touch()
        first = _timed_save(manager, 3, state)
        steady = _timed_save(manager, 4, state)
    return {FRESH: first, STEADY: steady}


def _resumed(state: TrainingState, folder: Path, source: Path, *, ahead: bool = True) -> dict[str, float]:
    Saver.reserve_ahead = ahead
    try:
        manager = CheckpointManager(CheckpointArguments(output_dir=str(source)))
        manager.load(1, state.objects)
        started = time.perf_counter()
        manager.should_save_step(2)  # the loop's first step boundary after the resume
        manager._saver._writer.wait_for_preparation()  # as a loop with a few steps before its first save allows
        reservation = time.perf_counter() - started
        seconds = _timed_save(manager, 2, state)
        manager.close()
        manager.delete(2)
    finally:
        Saver.reserve_ahead = True
    return {RESUMED: seconds, RESERVATION: reservation} if ahead else {RESUMED_BEFORE: seconds}


def _second(state: TrainingState, folder: Path, source: Path, *, ahead: bool = True) -> dict[str, float]:
    Saver.reserve_ahead = ahead
    try:
        with CheckpointManager(CheckpointArguments(output_dir=str(folder), max_in_flight=2)) as manager:
            _timed_save(manager, 1, state)
            manager._saver._writer.wait_for_preparation()  # the reservation runs while training goes on
            seconds = _timed_save(manager, 2, state)
    finally:
        Saver.reserve_ahead = True
    return {SECOND if ahead else SECOND_BEFORE: seconds}


def _timed_save(manager: CheckpointManager, step: int, state: TrainingState) -> float:
    state.touch()
    sync_disk()
    seconds = timed(lambda: manager.save(step, state.objects))
    manager.wait()  # durable before anything else is timed
    return seconds


def _hf(state: TrainingState, folder: Path, source: Path) -> dict[str, float]:
    from benchmarks.hf_setup import make_trainer
    from ckpt_callbacks.hf import CheckpointCallback

    recorded: list[SaveStats] = []
    submit = Saver.submit

    def recording_submit(saver: Saver, *args: Any, **kwargs: Any) -> SaveStats:
        stats = submit(saver, *args, **kwargs)
        recorded.append(stats)
        return stats

    Saver.submit = recording_submit  # type: ignore[method-assign]
    try:
        trainer = make_trainer(state.model, folder, [CheckpointCallback(export_at_end=False)], max_steps=3,
                               save_steps=2)
        trainer.train()
    finally:
        Saver.submit = submit  # type: ignore[method-assign]
    return {HF: recorded[0].blocking_seconds}


def _dcp(state: TrainingState, folder: Path, source: Path) -> dict[str, float]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict

    single_process_group()
    cuda = torch.cuda.is_available()
    stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                          use_non_blocking_copy=cuda))
    state.touch()
    sync_disk()
    started = time.perf_counter()
    model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
    response = dcp.async_save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(folder),
                              async_stager=stager)
    response.staging_completion.result()  # type: ignore[union-attr]
    seconds = time.perf_counter() - started
    response.upload_completion.result()  # type: ignore[union-attr]
    stager.close()
    return {DCP: seconds}


VARIANT_RUNS: dict[str, Callable[[TrainingState, Path, Path], dict[str, float]]] = {
    "floors": _floors, "fresh": _fresh, "resumed": _resumed,
    "resumed_before": lambda state, folder, source: _resumed(state, folder, source, ahead=False),
    "second": _second, "second_before": lambda state, folder, source: _second(state, folder, source, ahead=False),
    "hf": _hf, "dcp": _dcp,
}


if __name__ == "__main__":
    print(json.dumps(_measure_all(sys.argv[1], sys.argv[2].split(","))))
