"""Random number generator state of this process: capture and restore.

Covers python `random`, numpy's legacy global generator, torch CPU, and every
CUDA / MPS / XPU device present. The captured form holds only tensors, ints,
floats, strings, tuples and dicts, so every engine can store it without pickle.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "numpy_state_as_stock", "numpy_state_from_stock", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The state of every random generator this process uses."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_portable(tuple(np.random.get_state(legacy=True))),
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if _mps_available():
        state["mps"] = torch.mps.get_rng_state()
    if _xpu_available():
        state["xpu"] = torch.xpu.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back as `capture_rng_state` saw it; devices absent here are skipped."""
    random.setstate(_as_python_state(state["python"]))
    np.random.set_state(_numpy_state_from_portable(state["numpy"]))
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if isinstance(cuda_states, torch.Tensor):
            torch.cuda.set_rng_state(cuda_states)
        else:
            for device_index, device_state in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(device_state, device_index)
    if "mps" in state and _mps_available():
        torch.mps.set_rng_state(state["mps"])
    if "xpu" in state and _xpu_available():
        for device_index, device_state in enumerate(state["xpu"][: torch.xpu.device_count()]):
            torch.xpu.set_rng_state(device_state, device_index)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _xpu_available() -> bool:
    return bool(hasattr(torch, "xpu") and torch.xpu.is_available())


def _as_python_state(value: Any) -> tuple[Any, ...]:
    # JSON-based engines return lists; random.setstate wants (int, tuple, float|None).
    version, internal, gauss = value
    return (int(version), tuple(int(x) for x in internal), gauss)


def _numpy_state_to_portable(state: tuple[Any, ...]) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gaussian = state
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gaussian),
    }


def _numpy_state_from_portable(state: Any) -> tuple[Any, ...]:
    if isinstance(state, tuple):  # the stock Trainer stores np.random.get_state() as is
        return state
    keys = state["keys"]
    keys_array = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
    return (state["kind"], keys_array.astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"])


def numpy_state_as_stock(state: dict[str, Any]) -> tuple[Any, ...]:
    """numpy's own tuple form, as `np.random.get_state()` returns it (the stock Trainer's file format)."""
    return _numpy_state_from_portable(state)


def numpy_state_from_stock(state: tuple[Any, ...]) -> dict[str, Any]:
    return _numpy_state_to_portable(state)
