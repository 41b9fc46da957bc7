"""Background writer: thread or process? What a checkpoint write costs a GIL-bound training loop.

The loop (a small MLP trained on one thread: Python-heavy, so as sensitive to
the GIL as training gets) runs while the staged copy of a GPT-2 checkpoint is
written with fsync, by a thread of this process (what the library does) or by
a separate process (spawned once, the staged buffers in shared memory, as DCP's
process mode does). Reported: the loop's steps per second during the write,
and without any write, interleaved. This is the measurement behind the choice
of a thread in `ckpt_callbacks/core/writer.py`.
"""

from __future__ import annotations

import os
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from benchmarks.common import medians, ratio, row, scratch, training_state
from ckpt_callbacks.core.format.safetensors_io import write_safetensors
from ckpt_callbacks.core.storage.written_files import WrittenFiles, recording

NONE = "no write"
THREAD = "written by a thread"
NICE_THREAD = "written by a thread at niceness 10"
PROCESS = "written by a process"


def write_checkpoint(buffers: dict[str, torch.Tensor], path: Path) -> None:
    """What the core's writer does with one piece: write it, record its checksum, fsync it."""
    with recording(WrittenFiles()):
        write_safetensors(path, buffers, fsync=True)
    path.unlink()


def _process_writer(requests: Any, replies: Any) -> None:
    torch.set_num_threads(1)
    buffers, folder = requests.get()
    while (request := requests.get()) is not None:
        write_checkpoint(buffers, Path(folder) / f"process-{request}.safetensors")
        replies.put(request)


def _then_set(work: Any, done: threading.Event, niceness: int = 0) -> None:
    if niceness:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    work()
    done.set()


def run(size: str, repeats: int) -> dict[str, Any]:
    state = training_state(size)
    staged = {f"t{i}": t.detach().clone() for i, t in enumerate(state.tensors())}
    shared = {name: t.clone().share_memory_() for name, t in staged.items()}
    del state
    torch.set_num_threads(1)
    net = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    optimizer = torch.optim.AdamW(net.parameters())
    batch = torch.randn(16, 64)

    def step() -> None:
        net(batch).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    rates: dict[str, list[float]] = {NONE: [], THREAD: [], NICE_THREAD: [], PROCESS: []}
    durations: dict[str, list[float]] = {name: [] for name in rates}
    with scratch("writer-mode") as folder:
        context = mp.get_context("spawn")
        requests, replies = context.Queue(), context.Queue()
        child = context.Process(target=_process_writer, args=(requests, replies), daemon=True)
        child.start()
        requests.put((shared, str(folder)))
        for repeat in range(repeats):
            for name in rates:
                done = threading.Event()
                if name in (THREAD, NICE_THREAD):
                    write = partial(write_checkpoint, staged, folder / "t.safetensors")
                    niceness = 10 if name == NICE_THREAD else 0
                    threading.Thread(target=_then_set, args=(write, done, niceness)).start()
                elif name == PROCESS:
                    requests.put(repeat)
                    threading.Thread(target=_then_set, args=(replies.get, done)).start()
                else:
                    threading.Timer(2.0, done.set).start()
                steps, start = 0, time.perf_counter()
                while not done.is_set():
                    step()
                    steps += 1
                seconds = time.perf_counter() - start
                rates[name].append(steps / seconds)
                durations[name].append(seconds)
        requests.put(None)
        child.join(timeout=60)
    rows = [row(name, values, unit="steps/s") for name, values in rates.items()]
    rows += [row(f"{name}: write took", values) for name, values in durations.items() if name != NONE]
    m = medians(rows)
    return {
        "scenario": "writer_mode", "title": "background writer: thread vs process (GIL-bound loop, steps/s)",
        "size": size, "bytes": sum(t.numel() * t.element_size() for t in staged.values()), "rows": rows,
        "ratios": [ratio("loop speed during a thread write / during a process write", m[THREAD], m[PROCESS]),
                   ratio("loop speed during a thread write / no write", m[THREAD], m[NONE]),
                   ratio("loop speed during a niceness-10 thread write / at niceness 0", m[NICE_THREAD], m[THREAD])],
    }
