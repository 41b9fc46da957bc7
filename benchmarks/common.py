"""Shared pieces of the benchmarks: models, training state, timing, memory sampling, scratch folders.

Every figure is the median of several runs; variants that are compared are run
interleaved in the same process, so that the (very noisy) shared disk and CPU
affect them alike.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
# On the same disk as the results (and as a user's output_dir in the repo), never on a tmpfs.
SCRATCH = RESULTS / "scratch"

# GPT-2 shapes from its config; n_positions stays at GPT-2's 1024 so the 124M figure is the real one. "tiny"
# (1.7M parameters, 20 MB with AdamW) is for smoke runs and for the loaded-machine scenario's small saves.
SIZES: dict[str, dict[str, int]] = {
    "tiny": {"n_embd": 32, "n_layer": 2, "n_head": 2},
    "45M": {"n_embd": 512, "n_layer": 6, "n_head": 8},
    "124M": {"n_embd": 768, "n_layer": 12, "n_head": 12},
    "350M": {"n_embd": 1024, "n_layer": 24, "n_head": 16},
}


def quiet() -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def gpt2(size: str, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(**SIZES[size]))


def tokens(batch: int = 1, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 50257, (batch, length), generator=generator)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> None:
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class TrainingState:
    """A GPT-2 with AdamW state (both moments populated), as a training run holds it between steps."""

    size: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler

    @property
    def objects(self) -> dict[str, Any]:
        return {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}

    def tensors(self) -> list[torch.Tensor]:
        """Every distinct tensor a checkpoint holds (tied weights once)."""
        seen: set[int] = set()
        found = []
        for tensor in [*self.model.state_dict().values(), *_optimizer_tensors(self.optimizer)]:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                found.append(tensor)
        return found

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def touch(self) -> None:
        """Stand-in for an optimizer step between saves: every saved tensor is modified in place, so no save
        can skip a copy as unchanged (as none could in training). Cheap next to a real step."""
        with torch.no_grad():
            for tensor in self.tensors():
                if tensor.is_floating_point():
                    tensor.mul_(1.0)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for state in optimizer.state.values():
        yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def training_state(size: str) -> TrainingState:
    model = gpt2(size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    train_step(model, optimizer, tokens(length=8))
    scheduler.step()
    return TrainingState(size, model, optimizer, scheduler)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(operation: Callable[[], Any]) -> float:
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


@contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A fresh folder on the benchmark disk, deleted afterwards."""
    folder = SCRATCH / f"{name}-{os.getpid()}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def clear(folder: Path) -> None:
    """Empty `folder` between runs (outside the timed region)."""
    for child in folder.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    sync_disk()


def sync_disk() -> None:
    """Let earlier writes reach the disk before the next timed run starts, so it does not pay for them."""
    gc.collect()
    os.sync()


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dd_copy(files: list[Path], into: Path, *flags: str) -> float:
    """Seconds `dd bs=64M conv=fsync [flags]` takes to write the same files (the same bytes) into `into`."""
    start = time.perf_counter()
    for index, source in enumerate(files):
        subprocess.run(["dd", f"if={source}", f"of={into / f'dd-{index}'}", "bs=64M", "conv=fsync", *flags,
                        "status=none"], check=True)
    return time.perf_counter() - start


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples this process's resident memory every `interval` seconds while active."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:
        self.peak = rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)


def gb(nbytes: float) -> float:
    return nbytes / 1e9


def row(name: str, runs: list[float], unit: str = "s", note: str = "") -> dict[str, Any]:
    """One line of a result table: the median of `runs` and the runs themselves."""
    return {"name": name, "median": median(runs), "runs": [round(r, 6) for r in runs], "unit": unit, "note": note}


def ratio(name: str, numerator: float, denominator: float, target: float | None = None,
          higher_is_better: bool = False) -> dict[str, Any]:
    value = numerator / denominator if denominator else float("nan")
    met = None if target is None else (value >= target if higher_is_better else value <= target)
    return {"name": name, "value": value, "target": target, "higher_is_better": higher_is_better, "met": met}


def medians(result_rows: list[dict[str, Any]]) -> dict[str, float]:
    return {r["name"]: r["median"] for r in result_rows}


def _files_under(path: Path) -> list[Path]:
    return [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]


def read_into_page_cache(folder: Path) -> None:
    """Read every file under `folder` (or the file `folder`) once with large reads, as a warm-cache run expects."""
    for path in _files_under(folder):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def drop_from_page_cache(folder: Path) -> None:
    """Evict every file under `folder` from the page cache (`posix_fadvise(DONTNEED)`), as for a resume in a new
    job on another machine. Files written with O_DIRECT are not cached to begin with. `folder` may be one file."""
    for path in _files_under(folder):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)  # dirty pages are not dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def return_free_memory() -> None:
    """Hand freed heap memory back to the system, so the next allocation faults fresh pages as a new process's
    would (glibc keeps small freed blocks otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuHogs:
    """`count` processes that each keep one core busy (pure Python loops), as dataloader workers and other jobs
    do beside real training; stopped on exit."""

    def __init__(self, count: int) -> None:
        self.count = count
        self._processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> CpuHogs:
        self._processes = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.count)]
        time.sleep(0.5)  # let them reach the run queue
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self._processes:
            process.kill()
        for process in self._processes:
            process.wait()
        self._processes = []


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def single_process_group() -> None:
    """A one-process gloo group (what DCP's savers expect), on a free local port."""
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group("gloo", rank=0, world_size=1)


def in_fresh_process(module: str, *args: str) -> Any:
    """Run `python -m module *args` from the repository root and return the JSON its last output line holds."""
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT.parent, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
