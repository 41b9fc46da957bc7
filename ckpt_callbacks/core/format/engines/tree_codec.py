"""Nested state <-> (JSON structure, flat tensor dict), so that no pickle is ever needed.

Every container and scalar is written as a tagged JSON value; tensors become
references into a flat name -> tensor mapping stored as safetensors. Tensors
that are the same object (tied weights) are stored once and come back tied.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ckpt_callbacks.core.format.safetensors_io import view_key
from ckpt_callbacks.errors import CheckpointError

__all__ = ["decode_tree", "encode_tree"]

_SCALARS = (str, bool, int)


def encode_tree(state: Any, *, where: str = "state") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `state` into a JSON-able structure and the tensors it references."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[Any, str] = {}

    def encode(value: Any, path: str) -> Any:
        if value is None or isinstance(value, _SCALARS):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"t": "float", "v": repr(value)}
        if isinstance(value, torch.Tensor):
            identity = view_key(value) or id(value)
            key = seen.get(identity)
            if key is None:
                key = path
                seen[identity] = key
                tensors[key] = value
            return {"t": "tensor", "key": key}
        if isinstance(value, np.ndarray):
            return encode(torch.from_numpy(np.ascontiguousarray(value)), path)
        if isinstance(value, np.generic):
            return encode(value.item(), path)
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"t": "device", "v": str(value)}
        if isinstance(value, dict):
            return {"t": "dict", "items": [[encode(k, f"{path}/{k}#key"), encode(v, f"{path}/{k}")] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"t": "tuple", "items": [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, list):
            return {"t": "list", "items": [encode(v, f"{path}/{i}") for i, v in enumerate(value)]}
        raise CheckpointError(
            f"{where}: cannot store {type(value).__name__} at '{path}' without pickle. Store it as tensors and "
            "plain values (dict/list/tuple/str/int/float/bool/None), or use engine='torch'.",
        )

    return encode(state, ""), tensors


def decode_tree(structure: Any, tensors: dict[str, torch.Tensor], *, where: str = "state") -> Any:
    """Inverse of `encode_tree`; raises `CheckpointError` on anything malformed."""

    def decode(value: Any) -> Any:
        if value is None or isinstance(value, (_SCALARS, float)):
            return value
        if not isinstance(value, dict) or "t" not in value:
            raise CheckpointError(f"{where}: malformed structure entry {str(value)[:80]!r}.")
        tag = value["t"]
        if tag == "tensor":
            try:
                return tensors[value["key"]]
            except KeyError:
                raise CheckpointError(f"{where}: tensor '{value['key']}' is referenced but missing from the tensor file.") from None
        if tag == "float":
            return float(value["v"])
        if tag == "dtype":
            return getattr(torch, value["v"])
        if tag == "device":
            return torch.device(value["v"])
        if tag == "dict":
            return {decode(k): decode(v) for k, v in value["items"]}
        if tag == "tuple":
            return tuple(decode(v) for v in value["items"])
        if tag == "list":
            return [decode(v) for v in value["items"]]
        raise CheckpointError(f"{where}: unknown structure tag {tag!r}; written by a newer ckpt_callbacks?")

    try:
        return decode(structure)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{where}: malformed structure ({exc!r}).") from None
