"""Run a function on N real processes joined by a gloo process group on 127.0.0.1 (CPU)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def run_on_processes(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Start `world_size` processes running `fn(rank, world_size, *args)`; raise if any fails."""
    if world_size == 1:
        _entry_single(fn, args)
        return
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, start_method="spawn")


def _entry_single(fn: Callable[..., None], args: tuple[Any, ...]) -> None:
    ctx = mp.get_context("spawn")
    process = ctx.Process(target=_entry, args=(0, 1, free_port(), fn, args))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise RuntimeError(f"single-process worker failed with exit code {process.exitcode}")
