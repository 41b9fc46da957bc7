"""(3) Durable save throughput vs `dd ... conv=fsync` of the same bytes on the same disk.

Our saves are timed from the call until the checkpoint is committed (files and
folders fsynced, manifest written, folder renamed). dd then writes the same
files (the same bytes, read back from the page cache, as our writer reads its
staged copy from memory) with `bs=64M conv=fsync`, one file after the other,
as the writer does, both through the page cache (dd's default, the target's
reference) and with `oflag=direct` (what our writer does by default,
`direct_io`). Our save through the page cache (`direct_io.ENABLED = False`) is
shown too. The stock Trainer does not fsync; it is shown with an fsync of its
files added, for reference. Variants alternate within a repeat and the disk is
synced before each.
"""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import (
    clear,
    dd_copy,
    gb,
    medians,
    ratio,
    row,
    scratch,
    sync_disk,
    timed,
    training_state,
)
from benchmarks.hf_setup import save_like_the_trainer, trainer_for
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.save.writer import BackgroundWriter
from ckpt_callbacks.core.storage import direct_io
from ckpt_callbacks.core.storage.durable import fsync_tree

DEFAULT_NICENESS = BackgroundWriter.niceness

SYNC = "ours, sync save"
BUFFERED = "ours, sync save through the page cache"
ASYNC = "ours, async save, call to durable"
ASYNC_NICE0 = "ours, async save, writer at niceness 0, call to durable"
DD = "dd bs=64M conv=fsync, same files"
DD_DIRECT = "dd bs=64M conv=fsync oflag=direct, same files"
STOCK = "stock Trainer save + fsync of its files"


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    names = (SYNC, BUFFERED, ASYNC, ASYNC_NICE0, DD, DD_DIRECT, STOCK)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    nbytes = dict.fromkeys(names, 0)
    with scratch("disk") as root:
        ours = {mode: CheckpointManager(CheckpointArguments(output_dir=str(root / mode), async_save=mode == "async"))
                for mode in ("sync", "buffered", "async")}
        BackgroundWriter.niceness = 0  # the writer thread of this manager starts at its first save
        ours["async-nice0"] = CheckpointManager(CheckpointArguments(output_dir=str(root / "async-nice0")))
        ours["async-nice0"].save(0, {"warm-up": 0})
        ours["async-nice0"].wait()
        BackgroundWriter.niceness = DEFAULT_NICENESS
        stock = trainer_for(state, root / "stock")
        copies = root / "dd"
        copies.mkdir()
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            step = repeat + 1
            measured = {}
            state.touch()
            sync_disk()
            measured[SYNC] = timed(partial(ours["sync"].save, step, state.objects))
            files = _files(root / "sync")
            nbytes[SYNC] = nbytes[DD] = nbytes[DD_DIRECT] = sum(f.stat().st_size for f in files)
            sync_disk()
            measured[DD] = dd_copy(files, copies)
            clear(copies)
            sync_disk()
            measured[DD_DIRECT] = dd_copy(files, copies, "oflag=direct")
            clear(copies)
            state.touch()
            sync_disk()
            direct_io.ENABLED = False
            measured[BUFFERED] = timed(partial(ours["buffered"].save, step, state.objects))
            direct_io.ENABLED = True
            nbytes[BUFFERED] = nbytes[SYNC]
            state.touch()
            sync_disk()
            measured[ASYNC] = timed(partial(_save_durably, ours["async"], step, state.objects))
            nbytes[ASYNC] = sum(f.stat().st_size for f in _files(root / "async"))
            state.touch()
            sync_disk()
            measured[ASYNC_NICE0] = timed(partial(_save_durably, ours["async-nice0"], step, state.objects))
            nbytes[ASYNC_NICE0] = nbytes[ASYNC]
            sync_disk()
            measured[STOCK] = timed(partial(_stock_save_durably, stock, step, root / "stock"))
            nbytes[STOCK] = sum(f.stat().st_size for f in _files(root / "stock"))
            for folder in (root / "sync", root / "buffered", root / "async", root / "async-nice0", root / "stock"):
                clear(folder)
            if repeat:
                for name, value in measured.items():
                    seconds[name].append(value)
        for manager in ours.values():
            manager.close()
    rows = [row(f"{name}: time", values) for name, values in seconds.items()]
    rows += [row(f"{name}: throughput", [gb(nbytes[name]) / s for s in values], unit="GB/s")
             for name, values in seconds.items()]
    m = medians(rows)
    return {
        "scenario": "disk", "title": "(3) durable save throughput", "size": size, "bytes": nbytes[SYNC], "rows": rows,
        "ratios": [
            ratio("ours sync / dd throughput", m[f"{SYNC}: throughput"], m[f"{DD}: throughput"], target=0.9,
                  higher_is_better=True),
            ratio("ours sync / dd oflag=direct throughput", m[f"{SYNC}: throughput"], m[f"{DD_DIRECT}: throughput"],
                  target=0.9, higher_is_better=True),
            ratio("ours through the page cache / dd throughput", m[f"{BUFFERED}: throughput"],
                  m[f"{DD}: throughput"], higher_is_better=True),
            ratio("ours async, writer at niceness 0 (call to durable) / dd throughput",
                  m[f"{ASYNC_NICE0}: throughput"], m[f"{DD}: throughput"], target=0.9, higher_is_better=True),
            ratio("ours async (call to durable) / dd throughput", m[f"{ASYNC}: throughput"], m[f"{DD}: throughput"],
                  target=0.9, higher_is_better=True),
        ],
    }


def _save_durably(manager: CheckpointManager, step: int, objects: dict[str, Any]) -> None:
    manager.save(step, objects)
    manager.wait()


def _stock_save_durably(trainer: Any, step: int, folder: Path) -> None:
    save_like_the_trainer(trainer, step)
    fsync_tree(folder)


def _files(folder: Path) -> list[Path]:
    return sorted(Path(dirpath) / name for dirpath, _, names in os.walk(folder) for name in names
                  if not name.startswith(".ckpt_callbacks"))
