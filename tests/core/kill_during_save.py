"""Subprocess for the kill test: saves checkpoint 1 quickly, then a slow checkpoint 2 and prints markers."""

from __future__ import annotations

import os
import sys

import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from tests.core.npy_engine import NpyEngine  # noqa: F401  (registers the engine)

output_dir, async_flag = sys.argv[1], sys.argv[2] == "async"
model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)])
manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, engine="npy", async_save=async_flag))
manager.save(1, {"model": model})
manager.wait()
print("saved-1", flush=True)
os.environ["NPY_ENGINE_SLOW_SECONDS"] = "0.2"
manager.save(2, {"model": model})
print("saving-2", flush=True)
manager.wait()
print("saved-2", flush=True)
