"""Child processes of the kill-at-any-instant tests: train and save every step, rotate and export often.

Started as a small fork server: it imports torch once, then for each line "output_dir mode first_step"
on stdin forks a real training process and prints its pid. Killing that pid is a real SIGKILL of a real
process, without paying the interpreter and torch start-up (seconds on this machine) for every kill.
"""

from __future__ import annotations

import os
import sys

import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.export import export_safetensors


def train(output_dir: str, mode: str, first_step: int) -> None:
    torch.manual_seed(first_step)
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": model, "optimizer": optimizer}
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, async_save=mode == "async", save_total_limit=2))
    if manager.latest() is not None:
        manager.load_last(state)
    print(f"ready {os.getpid()}", flush=True)
    for step in range(first_step, first_step + 10_000):
        model(torch.randn(8, 256)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(step, state)
        if step % 3 == 0:
            export_safetensors(model.state_dict(), f"{output_dir}/export", max_shard_size="300KB")


def serve() -> None:
    # Building the first optimizer imports a lot lazily (~2 s here); pay it once, before forking.
    torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
    for line in sys.stdin:
        output_dir, mode, first_step = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                train(output_dir, mode, int(first_step))
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(1)
            os._exit(0)
        os.waitpid(pid, 0)  # the test kills it; reap it before taking the next order


if __name__ == "__main__":
    serve()
