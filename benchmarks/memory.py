"""(5) Extra resident memory during asynchronous saves, and its growth over consecutive saves.

Resident memory (RSS) is sampled every 2 ms during each save until it is
durable. "Extra" is measured from the RSS before the first save of each
variant; the stock Trainer's save (synchronous, for reference) runs first, and
freed memory is returned to the system (`malloc_trim`) before the next
variant starts. Between saves every tensor is modified in place, as an
optimizer step would, so each save copies everything.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from benchmarks.common import (
    PeakRSS,
    clear,
    gb,
    ratio,
    return_free_memory,
    row,
    rss_bytes,
    scratch,
    training_state,
)
from benchmarks.hf_setup import save_like_the_trainer, trainer_for
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.hf import CheckpointCallback

STOCK = "stock Trainer save (sync)"
PLAIN = "ours, plain manager, async"
HF = "ours, HF callback, async"


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    peaks: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}
    with scratch("memory") as root:
        stock = trainer_for(state, root / "stock")
        peaks[STOCK], after[STOCK] = _saves(state, lambda step: save_like_the_trainer(stock, step), lambda: None,
                                            min(repeats, 3), root / "stock")
        with CheckpointManager(CheckpointArguments(output_dir=str(root / "plain"))) as plain:
            peaks[PLAIN], after[PLAIN] = _saves(state, partial(_plain_save, plain, state), plain.wait,
                                                repeats, root / "plain")
        callback = CheckpointCallback(export_at_end=False)
        trainer = trainer_for(state, root / "hf", callbacks=[callback])

        def settle() -> None:
            assert callback.manager is not None
            callback.manager.wait()

        peaks[HF], after[HF] = _saves(state, lambda step: save_like_the_trainer(trainer, step), settle,
                                      repeats, root / "hf")
    rows = []
    for name in peaks:
        rows.append(row(f"{name}: peak extra RSS per save", [gb(v) for v in peaks[name]], unit="GB"))
        rows.append(row(f"{name}: extra RSS after each save", [gb(v) for v in after[name]], unit="GB"))
    nbytes = state.nbytes
    return {
        "scenario": "memory", "title": f"(5) extra resident memory over {repeats} consecutive saves", "size": size,
        "bytes": nbytes, "rows": rows,
        "ratios": [
            ratio("plain async: peak extra RSS / checkpoint bytes", max(peaks[PLAIN]), nbytes, target=1.25),
            ratio("HF callback async: peak extra RSS / checkpoint bytes", max(peaks[HF]), nbytes, target=1.25),
            ratio("plain async: RSS growth from save 1 to the last / checkpoint bytes",
                  after[PLAIN][-1] - after[PLAIN][0], nbytes, target=0.02),
            ratio("HF callback async: RSS growth from save 1 to the last / checkpoint bytes",
                  after[HF][-1] - after[HF][0], nbytes, target=0.02),
        ],
    }


def _plain_save(manager: CheckpointManager, state: Any, step: int) -> None:
    manager.save(step, state.objects)


def _saves(state: Any, save: Callable[[int], Any], settle: Callable[[], Any], count: int,
           folder: Any) -> tuple[list[float], list[float]]:
    return_free_memory()
    baseline = rss_bytes()
    peaks, after = [], []
    for step in range(1, count + 1):
        state.touch()
        with PeakRSS() as sampler:
            save(step)
            settle()
        peaks.append(sampler.peak - baseline)
        after.append(rss_bytes() - baseline)
        clear(folder)
    return peaks, after
