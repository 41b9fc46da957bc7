"""A user's own engine, as small as one can be: each tensor in a `.npy` file, the rest in JSON.

It implements only `save` and `load`; atomic commit, manifest and checksums, async writing,
verification and retention come from the core.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np
import torch

from ckpt_callbacks import CheckpointEngine


class NpyEngine(CheckpointEngine):
    name = "npy"

    def save(self, state: Any, relpath: str) -> None:
        folder = self.directory / relpath
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v for k, v in _flatten(state).items() if isinstance(v, torch.Tensor)}
        others = {k: v for k, v in _flatten(state).items() if not isinstance(v, torch.Tensor)}
        for key, tensor in tensors.items():
            np.save(folder / f"{key}.npy", tensor.detach().cpu().numpy())
            time.sleep(float(os.environ.get("NPY_ENGINE_SLOW_SECONDS", "0")))  # lets a test kill it mid-save
        (folder / "values.json").write_text(json.dumps({"tensors": sorted(tensors), "values": others}))

    def load(self, relpath: str, map_location: Any = None) -> Any:
        folder = self.directory / relpath
        spec = json.loads((folder / "values.json").read_text())
        flat: dict[str, Any] = dict(spec["values"])
        for key in spec["tensors"]:
            flat[key] = torch.from_numpy(np.load(folder / f"{key}.npy"))
        return _unflatten(flat)


def _flatten(state: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(state, dict):
        out: dict[str, Any] = {}
        for key, value in state.items():
            out.update(_flatten(value, f"{prefix}{key}~"))
        return out
    return {prefix.rstrip("~"): state}


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("~")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
