"""(8) The savers a user would pick instead, on the same GPT-2 + AdamW state, in the same run.

Saves (one process, variants interleaved within each repeat, the disk synced
and the state modified in place before each save, the first round dropped):

- ours: `CheckpointManager.save` (async, safetensors engine, its buffers reused
  from save to save), durable at `wait()`;
- `torch.save` of the state dicts, then an fsync of the file;
- Lightning `AsyncCheckpointIO(TorchCheckpointIO)` (clones every tensor on the
  caller's thread, `torch.save` on a thread), durable after `teardown()` and
  an fsync of the file (Lightning itself does not fsync);
- PyTorch DCP `async_save` on a one-process gloo group: the thread
  checkpointer with its default stager (a fresh copy per save), the thread
  checkpointer with a reused `DefaultStager` staging in the background, and
  (in a second pass, so that no more than one reused stager holds a copy of
  the state beside ours) the process checkpointer with a reused stager in
  shared memory; durable when the upload future is done (its
  `FileSystemWriter` fsyncs);
- `dd bs=64M oflag=direct conv=fsync` of our checkpoint's files: what the disk
  allows for the same bytes.

Blocking = from the call until the live state may change again (for a stager
that copies in the background, the call plus the wait for its staging to
complete): each save is followed at once by an in-place update of every
tensor. (Both ours, with `defer_staging`, and DCP's background staging can hide
that copy behind the next forward/backward; scenario (1) measures ours so.)
Durable = from the call until the files are fsynced. Memory: the resident
memory a saver holds between saves (its buffers, measured over its first
save, freed memory handed back to the system) plus the largest rise during a
save until durable (sampled every 5 ms).

Loads (a fresh process per run, as a resume is): model and optimizer built
fresh (all memory touched, as a model's initialisation does), then the load
timed, then the first optimizer step (which pays for whatever the load left
unread: `torch.load(mmap=True)` returns before reading). Ours verifies every
checksum (the default). Warm: the files were read once just before; cold:
dropped from the page cache (`posix_fadvise(DONTNEED)`).
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
    PeakRSS,
    TrainingState,
    clear,
    dd_copy,
    drop_from_page_cache,
    folder_bytes,
    gb,
    in_fresh_process,
    medians,
    quiet,
    ratio,
    read_into_page_cache,
    return_free_memory,
    row,
    rss_bytes,
    scratch,
    single_process_group,
    sync_disk,
    training_state,
)
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.storage.durable import fsync_file

OURS = "ours, CheckpointManager.save (async)"
OURS_2 = "ours, CheckpointManager.save (async), pass 2"
TORCH = "torch.save + fsync"
LIGHTNING = "Lightning AsyncCheckpointIO(TorchCheckpointIO) + fsync"
DCP_DEFAULT = "DCP async_save, thread, default stager (a fresh copy per save)"
DCP_THREAD = "DCP async_save, thread, reused DefaultStager (background staging)"
DCP_PROCESS = "DCP async_save, process, reused DefaultStager (shared memory, background staging)"
DD = "dd bs=64M oflag=direct conv=fsync, our files"
ASYNC_PEERS = (LIGHTNING, DCP_DEFAULT, DCP_THREAD, DCP_PROCESS)

LOAD_TORCH = "torch.load + load_state_dict"
LOAD_MMAP = "torch.load(mmap=True) + load_state_dict"
LOAD_DCP = "DCP load (get_state_dict, dcp.load, set_state_dict)"
LOAD_OURS = "ours, CheckpointManager.load (checksums verified)"
# The floors of any load that reads every byte (as verification must): our checkpoint's files read with 2 threads
# (this machine's cores), nothing decoded or checked; warm a copy out of the page cache, cold the disk's read. Into
# memory touched before the clock starts (the lower bound), and into fresh memory (as a load must put the optimizer
# state somewhere new). Their "first step" is a fresh AdamW's (state allocated, not restored): only the load compares.
LOAD_FLOOR = "floor: read of our files into touched memory"
LOAD_FLOOR_FRESH = "floor: read of our files into fresh memory"
FLOORS = (LOAD_FLOOR, LOAD_FLOOR_FRESH)
LOADS = (LOAD_TORCH, LOAD_MMAP, LOAD_DCP, LOAD_OURS, *FLOORS)
# What each load reads, under the loads folder. A warm load finds only its own source cached: at 350M the four
# sources together (13 GB) and the processes do not fit in this machine's memory, so "warm" would be part cold.
LOAD_SOURCES = {LOAD_TORCH: "state.pt", LOAD_MMAP: "state.pt", LOAD_DCP: "dcp", LOAD_OURS: "ours",
                LOAD_FLOOR: "ours", LOAD_FLOOR_FRESH: "ours"}
COLD_LOADS = (LOAD_TORCH, LOAD_MMAP, LOAD_OURS, *FLOORS)


class Saver:
    """One way to save: `save(step)` returns once the live state may change; `durable()` once it is on disk."""

    def __init__(self, save: Callable[[int], Any], durable: Callable[[], Any], close: Callable[[], Any] = lambda: None,
                 folder: Path | None = None) -> None:
        self.save, self.durable, self.close, self.folder = save, durable, close, folder


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    needed = 4.5 * state.nbytes  # the state, our buffers, one reused DCP stager, one transient copy, slack
    if available_memory() < needed:
        return {"scenario": "peers", "size": size, "skipped": f"needs {gb(needed):.0f} GB of free memory, "
                f"{gb(available_memory()):.0f} GB available"}
    single_process_group()
    blocking: dict[str, list[float]] = {}
    durable: dict[str, list[float]] = {}
    held: dict[str, float] = {}
    transient: dict[str, list[float]] = {}
    nbytes: dict[str, int] = {}
    with scratch("peers") as root:
        for names in ((OURS, TORCH, LIGHTNING, DCP_DEFAULT, DCP_THREAD, DD), (OURS_2, DCP_PROCESS)):
            savers = {name: _saver(name, state, root / _slug(name)) for name in names if name != DD}
            for name in names:
                blocking[name], durable[name], transient[name] = [], [], []
            for repeat in range(repeats + 1):  # the first round (allocations, the process checkpointer's start) is dropped
                step = repeat + 1
                for name, saver in savers.items():
                    state.touch()
                    return_free_memory()
                    sync_disk()
                    before = rss_bytes()
                    with PeakRSS(interval=0.005) as peak:
                        started = time.perf_counter()
                        saver.save(step)
                        returned = time.perf_counter()
                        state.touch()  # training goes on
                        saver.durable()
                        done = time.perf_counter()
                    if repeat == 0:
                        return_free_memory()
                        held[name] = max(0, rss_bytes() - before)  # its buffers, kept for the next save
                    else:
                        blocking[name].append(returned - started)
                        durable[name].append(done - started)
                        transient[name].append(max(0, peak.peak - before))
                    assert saver.folder is not None
                    nbytes[name] = folder_bytes(saver.folder)
                    if name in (OURS, OURS_2) and DD in names:
                        files = sorted(p for p in saver.folder.rglob("*") if p.is_file() and p.name != ".ckpt_callbacks.lock")
                        copies = root / "dd"
                        copies.mkdir(exist_ok=True)
                        sync_disk()
                        seconds = dd_copy(files, copies, "oflag=direct")
                        clear(copies)
                        nbytes[DD] = nbytes[name]
                        if repeat:
                            durable[DD].append(seconds)
                    _clear_saves(saver.folder)
            for saver in savers.values():
                saver.close()
        loads = _loads(state, root, repeats)
    rows = [row(f"{name}: blocking per save", values) for name, values in blocking.items() if values]
    rows += [row(f"{name}: call to durable", values) for name, values in durable.items() if values]
    rows += [row(f"{name}: durable throughput", [gb(nbytes[name]) / v for v in values], unit="GB/s")
             for name, values in durable.items() if values]
    rows += [row(f"{name}: peak extra RSS", [gb(held.get(name, 0) + v) for v in values], unit="GB",
                 note="held between saves + largest rise during a save") for name, values in transient.items() if values]
    rows += loads
    m = medians(rows)
    return {
        "scenario": "peers", "title": "(8) peers: blocking, durability, memory, load", "size": size,
        "bytes": state.nbytes, "rows": rows, "ratios": _ratios(m), "per_gb": _per_gb(m, state.nbytes),
    }


def _ratios(m: dict[str, float]) -> list[dict[str, Any]]:
    best_block = min(ASYNC_PEERS[:3], key=lambda name: m[f"{name}: blocking per save"])
    best_durable = min((TORCH, *ASYNC_PEERS[:3]), key=lambda name: m[f"{name}: call to durable"])
    ratios = [
        ratio(f"blocking: ours / best async peer ({best_block})", m[f"{OURS}: blocking per save"],
              m[f"{best_block}: blocking per save"], target=1.0),
        ratio("blocking: ours (pass 2) / DCP process checkpointer", m[f"{OURS_2}: blocking per save"],
              m[f"{DCP_PROCESS}: blocking per save"], target=1.0),
        ratio("blocking: ours / torch.save + fsync", m[f"{OURS}: blocking per save"], m[f"{TORCH}: blocking per save"],
              target=1 / 20),
        ratio(f"durable: ours / best peer ({best_durable})", m[f"{OURS}: call to durable"],
              m[f"{best_durable}: call to durable"], target=1.1),
        ratio("durable: ours (pass 2) / DCP process checkpointer", m[f"{OURS_2}: call to durable"],
              m[f"{DCP_PROCESS}: call to durable"], target=1.1),
        ratio("durable: ours / dd oflag=direct of the same bytes", m[f"{OURS}: call to durable"],
              m[f"{DD}: call to durable"], target=1.1),
    ]
    return ratios + _load_ratios(m)


def _load_ratios(m: dict[str, float]) -> list[dict[str, Any]]:
    ratios = []
    for cache in ("warm", "cold"):
        best = min((LOAD_TORCH, LOAD_MMAP), key=lambda name: m[f"{name}, {cache}: load + first step"])
        ratios.append(ratio(f"{cache}: ours load + first step / best torch.load ({best})",
                            m[f"{LOAD_OURS}, {cache}: load + first step"], m[f"{best}, {cache}: load + first step"],
                            target=0.5))
    ratios.append(ratio("warm: ours load + first step / DCP load + first step", m[f"{LOAD_OURS}, warm: load + first step"],
                        m[f"{LOAD_DCP}, warm: load + first step"]))
    for cache in ("warm", "cold"):
        for floor in FLOORS:
            if f"{floor}, {cache}: load" in m:
                ratios.append(ratio(f"{cache}: ours load / {floor}", m[f"{LOAD_OURS}, {cache}: load"],
                                    m[f"{floor}, {cache}: load"]))
    return ratios


def run_loads(size: str, repeats: int) -> dict[str, Any]:
    """The loads of `run` alone (scenario `peer_loads`): every format written once from one training state, then
    each loaded in fresh processes, warm and cold."""
    state = training_state(size)
    with scratch("peer-loads") as root:
        rows = _loads(state, root, repeats)
    m = medians(rows)
    per_gb = {name: m[name] / gb(state.nbytes) for name in m
              if name.endswith("load + first step") and not name.startswith(FLOORS)}  # its step is no resume's
    return {"scenario": "peer_loads", "title": "(8b) peers: load + first optimizer step", "size": size,
            "bytes": state.nbytes, "rows": rows, "ratios": _load_ratios(m), "per_gb": per_gb}


def _per_gb(m: dict[str, float], nbytes: int) -> dict[str, float]:
    """Seconds per GB of state, for the run's cross-size table (a flat line from 45M to 350M: no cliff)."""
    names = [f"{OURS}: blocking per save", f"{OURS}: call to durable", f"{LOAD_OURS}, warm: load + first step",
             f"{LOAD_OURS}, cold: load + first step", f"{DCP_THREAD}: blocking per save", f"{DCP_THREAD}: call to durable",
             f"{TORCH}: call to durable", f"{LOAD_TORCH}, warm: load + first step", f"{LOAD_MMAP}, warm: load + first step"]
    return {name: m[name] / gb(nbytes) for name in names if name in m}


def available_memory() -> int:
    with open("/proc/meminfo") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["MemAvailable"].split()[0]) * 1024


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.split(",")[0].split("(")[0]).strip("-") + str(abs(hash(name)) % 997)


def _saver(name: str, state: TrainingState, folder: Path) -> Saver:
    folder.mkdir(parents=True)
    if name in (OURS, OURS_2):
        manager = CheckpointManager(CheckpointArguments(output_dir=str(folder)))
        return Saver(lambda step: manager.save(step, {"model": state.model, "optimizer": state.optimizer}),
                     manager.wait, manager.close, folder)
    if name == TORCH:
        def torch_save(step: int) -> None:
            path = folder / f"step-{step}.pt"
            torch.save({"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}, path)
            fsync_file(path)
        return Saver(torch_save, lambda: None, folder=folder)
    if name == LIGHTNING:
        from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

        plugin = AsyncCheckpointIO(TorchCheckpointIO())
        written: list[Path] = []

        def lightning_save(step: int) -> None:
            path = folder / f"step={step}.ckpt"
            written.append(path)
            plugin.save_checkpoint({"state_dict": state.model.state_dict(),
                                    "optimizer_states": [state.optimizer.state_dict()], "global_step": step}, path)

        def lightning_durable() -> None:
            plugin.teardown()  # waits for the thread's write
            while written:
                fsync_file(written.pop())
        return Saver(lightning_save, lightning_durable, plugin.teardown, folder)
    return _dcp_saver(name, state, folder)


def _dcp_saver(name: str, state: TrainingState, folder: Path) -> Saver:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    process = name == DCP_PROCESS
    stager = None
    if name != DCP_DEFAULT:  # pinned memory needs CUDA; non-blocking copies matter only from a GPU
        cuda = torch.cuda.is_available()
        stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=process, use_async_staging=True,
                                              use_non_blocking_copy=cuda))
    pending: list[Any] = []

    def dcp_save(step: int) -> None:
        model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
        response = dcp.async_save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(folder / f"step-{step}"),
                                  async_checkpointer_type=AsyncCheckpointerType.PROCESS if process else AsyncCheckpointerType.THREAD,
                                  async_stager=stager)
        if hasattr(response, "staging_completion"):
            response.staging_completion.result()  # the live state may change only once staged
            pending.append(response.upload_completion)
        else:
            pending.append(response)

    def dcp_durable() -> None:
        while pending:
            pending.pop().result()

    return Saver(dcp_save, dcp_durable, stager.close if stager is not None else (lambda: None), folder)


def _clear_saves(folder: Path | None) -> None:
    """Delete what a saver wrote, outside the timed region (ours keeps the lock file of its run folder)."""
    import shutil

    for child in folder.iterdir() if folder is not None else ():
        if child.name != ".ckpt_callbacks.lock":
            shutil.rmtree(child) if child.is_dir() else child.unlink()


# ---------------------------------------------------------------------------------------------- loads


def _loads(state: TrainingState, root: Path, repeats: int) -> list[dict[str, Any]]:
    """Write one checkpoint per format of the current state, then time loads in fresh processes."""
    sources = root / "loads"
    sources.mkdir()
    objects = {"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict()}
    torch.save(objects, sources / "state.pt")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(state.model, state.optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=str(sources / "dcp"))
    with CheckpointManager(CheckpointArguments(output_dir=str(sources / "ours"), async_save=False)) as manager:
        manager.save(1, {"model": state.model, "optimizer": state.optimizer})
    spec = [(name, list(t.shape), str(t.dtype).removeprefix("torch."), name in dict(state.model.named_parameters()))
            for name, t in state.model.state_dict().items()]
    (sources / "spec.json").write_text(json.dumps({"tensors": spec, "ties": _ties(state.model)}))
    sync_disk()
    load: dict[str, list[float]] = {}
    step: dict[str, list[float]] = {}
    for _ in range(repeats):
        for cache in ("warm", "cold"):
            for name in LOADS:
                if cache == "cold" and name not in COLD_LOADS:
                    continue
                drop_from_page_cache(sources)
                if cache == "warm":
                    read_into_page_cache(sources / LOAD_SOURCES[name])
                seconds = in_fresh_process("benchmarks.peers", name, str(sources))
                load.setdefault(f"{name}, {cache}", []).append(seconds["load"])
                step.setdefault(f"{name}, {cache}", []).append(seconds["step"])
    rows = [row(f"{name}: load", values) for name, values in load.items()]
    rows += [row(f"{name}: first optimizer step", values) for name, values in step.items()]
    rows += [row(f"{name}: load + first step", [a + b for a, b in zip(load[name], step[name], strict=True)]) for name in load]
    return rows


def _ties(model: torch.nn.Module) -> dict[str, str]:
    """Parameter names that share another's tensor (GPT-2's lm_head.weight is transformer.wte.weight)."""
    first: dict[int, str] = {}
    ties = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if parameter.data_ptr() in first:
            ties[name] = first[parameter.data_ptr()]
        else:
            first[parameter.data_ptr()] = name
    return ties


def _fresh_objects(spec: dict[str, Any]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A module with the saved model's parameter names, shapes and ties (no transformers import, no random
    initialisation: every tensor filled once, so its memory is touched as a model's initialisation touches it),
    and a fresh AdamW over it, with zero gradients for the first step."""
    root = torch.nn.Module()
    made: dict[str, torch.Tensor] = {}
    for name, shape, dtype, is_parameter in spec["tensors"]:
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]  # type: ignore[assignment]
        if name in spec["ties"]:
            module.register_parameter(leaf, made[spec["ties"][name]])  # type: ignore[arg-type]
            continue
        tensor = torch.empty(shape, dtype=getattr(torch, dtype)).fill_(0.01)
        made[name] = torch.nn.Parameter(tensor) if is_parameter else tensor
        if is_parameter:
            module.register_parameter(leaf, made[name])  # type: ignore[arg-type]
        else:
            module.register_buffer(leaf, tensor)
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-4)
    for parameter in root.parameters():
        parameter.grad = torch.zeros_like(parameter)
    return root, optimizer


def _read_files(files: list[Path], buffers: list[torch.Tensor], threads: int = 2, chunk: int = 64 << 20) -> None:
    """Read each file into its buffer in `chunk`-sized pieces spread over `threads` threads (`os.preadv`, which
    releases the GIL)."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    fds = [os.open(path, os.O_RDONLY) for path in files]
    try:
        views = [memoryview(buffer.numpy()) for buffer in buffers]
        pieces = [(fd, view, start) for fd, view in zip(fds, views, strict=True) for start in range(0, len(view), chunk)]

        def read(piece: tuple[int, memoryview, int]) -> None:
            fd, view, start = piece
            done, end = start, min(start + chunk, len(view))
            while done < end:
                got = os.preadv(fd, [view[done:end]], done)
                if not got:
                    raise OSError(f"short read at {done}")
                done += got

        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(read, pieces))
    finally:
        for fd in fds:
            os.close(fd)


def _load_here(name: str, sources: Path) -> dict[str, float]:
    """In a fresh process: build fresh objects (untimed), time the load, then the first optimizer step."""
    quiet()
    model, optimizer = _fresh_objects(json.loads((sources / "spec.json").read_text()))
    if name in (LOAD_TORCH, LOAD_MMAP):
        def load() -> None:
            loaded = torch.load(sources / "state.pt", weights_only=True, mmap=name == LOAD_MMAP)
            model.load_state_dict(loaded["model"])
            optimizer.load_state_dict(loaded["optimizer"])
    elif name == LOAD_DCP:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        def load() -> None:
            model_state, optimizer_state = get_state_dict(model, optimizer)  # allocates the optimizer state
            loaded = {"model": model_state, "optim": optimizer_state}
            dcp.load(loaded, checkpoint_id=str(sources / "dcp"))
            set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    elif name in FLOORS:
        files = sorted(p for p in (sources / "ours").rglob("*") if p.is_file())
        make = torch.zeros if name == LOAD_FLOOR else torch.empty  # zeros: touched now, untimed; empty: fresh pages
        buffers = [make(path.stat().st_size, dtype=torch.uint8) for path in files]

        def load() -> None:
            _read_files(files, buffers)
    else:
        manager = CheckpointManager(CheckpointArguments(output_dir=str(sources / "ours")))

        def load() -> None:
            manager.load(1, {"model": model, "optimizer": optimizer})
    start = time.perf_counter()
    load()
    loaded = time.perf_counter()
    optimizer.step()
    stepped = time.perf_counter()
    assert optimizer.state, "the optimizer state was not restored"
    return {"load": loaded - start, "step": stepped - loaded}


if __name__ == "__main__":
    print(json.dumps(_load_here(sys.argv[1], Path(sys.argv[2]))))
