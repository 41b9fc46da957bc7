"""(1) How long training waits per save: stock `Trainer._save_checkpoint` vs this library, and the floor.

The floor is copying the same tensors into buffers allocated beforehand: the
least any save that lets training continue right away can cost. Before each
timed save every saved tensor is modified in place, as an optimizer step would,
so no save can skip a copy as unchanged. Each save's files are deleted (outside
the timed region) and the disk synced before the next one, so no save pays for
an earlier one's writeback.

The HF callback's default (async) defers the copy: the save returns before it,
and the copy runs during the next forward/backward; the stall is then the save
call plus the wait just before the optimizer step. The forward/backward it
overlaps is timed too, alone and with the copy running, so the cost moved there
is visible. The callback copying before it returns (`defer_staging = False`)
is measured too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import (
    TrainingState,
    clear,
    medians,
    ratio,
    row,
    scratch,
    timed,
    tokens,
    training_state,
)
from benchmarks.hf_setup import copying_callback, save_like_the_trainer, trainer_for
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.hf import CheckpointCallback

FLOOR = "memcpy into reused buffers (floor)"
STOCK = "stock Trainer._save_checkpoint"
HF_SYNC = "ours, HF callback, sync (durable)"
HF_ASYNC = "ours, HF callback, async, copy before returning"
HF_DEFERRED = "ours, HF callback, async (default: copy during the next forward/backward)"
PLAIN_SYNC = "ours, plain manager, sync (durable)"
PLAIN_ASYNC = "ours, plain manager, async"
FWD_BWD = "forward/backward alone (not a stall)"
FWD_BWD_COPYING = "forward/backward during the deferred copy"


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    buffers = [torch.empty_like(t) for t in state.tensors()]
    batch = tokens(1, 32)
    names = (FLOOR, STOCK, HF_SYNC, HF_ASYNC, HF_DEFERRED, PLAIN_SYNC, PLAIN_ASYNC, FWD_BWD, FWD_BWD_COPYING)
    runs: dict[str, list[float]] = {name: [] for name in names}
    with scratch("stall") as root:
        stock = trainer_for(state, root / "stock")
        callbacks = {"sync": CheckpointCallback(async_save=False, export_at_end=False),
                     "async": copying_callback(export_at_end=False),
                     "deferred": CheckpointCallback(export_at_end=False)}
        ours_hf = {mode: trainer_for(state, root / f"hf-{mode}", callbacks=[cb]) for mode, cb in callbacks.items()}
        plain = {mode: CheckpointManager(CheckpointArguments(output_dir=str(root / f"plain-{mode}"), async_save=mode == "async"))
                 for mode in ("sync", "async")}

        def floor(step: int) -> None:
            for buffer, tensor in zip(buffers, state.tensors(), strict=True):
                buffer.copy_(tensor)

        def forward_backward() -> None:
            state.model(input_ids=batch, labels=batch).loss.backward()

        def deferred(step: int) -> tuple[float, float]:
            """(stall, forward/backward seconds) of a deferred save followed by a training step's compute."""
            save = timed(lambda: save_like_the_trainer(ours_hf["deferred"], step))
            compute = timed(forward_backward)
            wait = timed(callbacks["deferred"].manager.wait_for_staging)  # type: ignore[union-attr]
            return save + wait, compute

        savers: dict[str, tuple[Callable[[int], Any], Callable[[], Any] | None]] = {
            FLOOR: (floor, None),
            STOCK: (lambda step: save_like_the_trainer(stock, step), None),
            HF_SYNC: (lambda step: save_like_the_trainer(ours_hf["sync"], step), None),
            HF_ASYNC: (lambda step: save_like_the_trainer(ours_hf["async"], step), lambda: _manager(callbacks["async"]).wait()),
            PLAIN_SYNC: (lambda step: plain["sync"].save(step, state.objects), None),
            PLAIN_ASYNC: (lambda step: plain["async"].save(step, state.objects), plain["async"].wait),
        }
        for repeat in range(repeats + 1):  # the first round warms up (allocations, first page faults) and is dropped
            step = repeat + 1
            measured = {name: _measure(state, save, step, settle) for name, (save, settle) in savers.items()}
            state.touch()
            measured[HF_DEFERRED], measured[FWD_BWD_COPYING] = deferred(step)
            _manager(callbacks["deferred"]).wait()
            measured[FWD_BWD] = timed(forward_backward)
            state.optimizer.zero_grad(set_to_none=True)
            for folder in root.iterdir():
                clear(folder)
            if repeat:
                for name, seconds in measured.items():
                    runs[name].append(seconds)
        for manager in (*plain.values(), *(cb.manager for cb in callbacks.values() if cb.manager is not None)):
            manager.close()
    rows = [row(name, values) for name, values in runs.items()]
    m = medians(rows)
    return {
        "scenario": "stall", "title": "(1) training stall per save", "size": size, "bytes": state.nbytes,
        "parameters": state.parameters, "rows": rows,
        "ratios": [
            ratio("HF callback async (default) / stock", m[HF_DEFERRED], m[STOCK], target=1 / 20),
            ratio("HF callback async (default) / memcpy floor", m[HF_DEFERRED], m[FLOOR], target=2.0),
            ratio("HF callback async, copy before returning / stock", m[HF_ASYNC], m[STOCK]),
            ratio("HF callback async, copy before returning / memcpy floor", m[HF_ASYNC], m[FLOOR], target=2.0),
            ratio("plain async / memcpy floor", m[PLAIN_ASYNC], m[FLOOR], target=2.0),
            ratio("forward/backward slowdown from the deferred copy", m[FWD_BWD_COPYING], m[FWD_BWD]),
            ratio("HF callback sync (durable) / stock (not durable)", m[HF_SYNC], m[STOCK]),
        ],
    }


def _manager(callback: CheckpointCallback) -> CheckpointManager:
    assert callback.manager is not None
    return callback.manager


def _measure(state: TrainingState, save: Callable[[int], Any], step: int, settle: Callable[[], Any] | None) -> float:
    state.touch()
    seconds = timed(lambda: save(step))
    if settle is not None:
        settle()  # the background write finishes outside the timed region
    return seconds
