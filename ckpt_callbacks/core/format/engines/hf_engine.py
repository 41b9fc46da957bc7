"""`hf` engine: the exact file layout of `transformers.Trainer` checkpoints.

The HF adapter hands state pieces under the stock names; this engine writes
each to the stock file and format, so `trainer.train(resume_from_checkpoint=...)`,
`get_last_checkpoint` and `AutoModel.from_pretrained(checkpoint_dir)` work
unchanged. No transformers import: config and tokenizer objects are written
through their own `save_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ckpt_callbacks.core.format.engines.base import CheckpointEngine
from ckpt_callbacks.core.format.engines.torch_engine import load_weights_only, save_torch
from ckpt_callbacks.core.format.safetensors_io import read_safetensors, unique_tensors, write_safetensors
from ckpt_callbacks.core.state.rng import numpy_state_as_stock, numpy_state_from_stock
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointNotFoundError

MODEL_FILE = "model.safetensors"
MODEL_INDEX_FILE = "model.safetensors.index.json"
TRAINER_STATE_FILE = "trainer_state.json"
TORCH_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "scaler": "scaler.pt"}
# Objects whose own save_pretrained writes config.json, generation_config.json, tokenizer files, ...
PRETRAINED_PIECE = "pretrained"


def rng_file_name(relpath: str) -> str:
    """'rng' -> 'rng_state.pth' (one process), 'rng_3' -> 'rng_state_3.pth' (rank 3)."""
    suffix = relpath.removeprefix("rng")
    return f"rng_state{suffix}.pth"


class HFEngine(CheckpointEngine):
    name = "hf"

    def save(self, state: Any, relpath: str) -> None:
        directory = self.directory
        if relpath == "model":
            write_safetensors(directory / MODEL_FILE, unique_tensors(state), {"format": "pt"}, fsync=False)
        elif relpath in TORCH_FILES:
            save_torch(state, directory / TORCH_FILES[relpath])
        elif relpath == "rng" or relpath.startswith("rng_"):
            save_torch(_rng_to_stock(state, single_process=relpath == "rng"), directory / rng_file_name(relpath))
        elif relpath == "trainer_state":
            (directory / TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        elif relpath == "training_args":
            # Written as the stock Trainer does (a pickle, for users' tools); this library never reads it back.
            save_torch(state, directory / "training_args.bin")
        elif relpath == PRETRAINED_PIECE:
            for obj in state:
                obj.save_pretrained(str(directory))
        else:
            target = directory / f"{relpath}.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            save_torch(state, target)

    def load(self, relpath: str, map_location: Any = None) -> Any:
        directory = self.directory
        if relpath == "model":
            return load_model_weights(directory, map_location)
        if relpath in TORCH_FILES:
            return load_weights_only(directory / TORCH_FILES[relpath], map_location)
        if relpath == "rng" or relpath.startswith("rng_"):
            return _rng_from_stock(_load_stock_rng(directory / rng_file_name(relpath)))
        if relpath == "trainer_state":
            path = directory / TRAINER_STATE_FILE
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise CheckpointCorruptError(f"{path}: unreadable ({exc}).", path=str(path), reason="unreadable") from None
        return load_weights_only(directory / f"{relpath}.pt", map_location)

    def has(self, relpath: str) -> bool:
        if relpath == "model":
            return any((self.directory / name).is_file() for name in (MODEL_FILE, MODEL_INDEX_FILE, "pytorch_model.bin"))
        if relpath in TORCH_FILES:
            return (self.directory / TORCH_FILES[relpath]).is_file()
        if relpath == "rng" or relpath.startswith("rng_"):
            return (self.directory / rng_file_name(relpath)).is_file()
        if relpath == "trainer_state":
            return (self.directory / TRAINER_STATE_FILE).is_file()
        return super().has(relpath)


def load_model_weights(directory: Path, map_location: Any = None) -> dict[str, torch.Tensor]:
    """Model weights of a stock-layout folder: single or sharded safetensors, or a legacy `pytorch_model.bin`."""
    single = directory / MODEL_FILE
    if single.is_file():
        return read_safetensors(single, map_location)
    index = directory / MODEL_INDEX_FILE
    if index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise CheckpointCorruptError(f"{index}: unreadable index ({exc!r}).", path=str(index), reason="unreadable") from None
        weights: dict[str, torch.Tensor] = {}
        for shard in shard_names:
            if Path(shard).name != shard:
                raise CheckpointCorruptError(f"{index}: shard name {shard!r} leaves the folder.", path=str(index), reason="unsafe path")
            weights.update(read_safetensors(directory / shard, map_location))
        return weights
    legacy = directory / "pytorch_model.bin"
    if legacy.is_file():
        return load_weights_only(legacy, map_location)
    raise CheckpointNotFoundError(f"{directory}: no model weights ({MODEL_FILE}, {MODEL_INDEX_FILE} or pytorch_model.bin).",
                                  path=str(directory))


def _rng_to_stock(state: dict[str, Any], *, single_process: bool) -> dict[str, Any]:
    stock = dict(state)
    stock["numpy"] = numpy_state_as_stock(state["numpy"])
    if single_process and isinstance(stock.get("cuda"), list) and torch.cuda.is_available():
        # The stock single-process resume calls torch.cuda.random.set_rng_state(state["cuda"]): one device.
        stock["cuda"] = stock["cuda"][torch.cuda.current_device()]
    return stock


def _rng_from_stock(stock: dict[str, Any]) -> dict[str, Any]:
    state = dict(stock)
    if isinstance(stock.get("numpy"), tuple):
        state["numpy"] = numpy_state_from_stock(stock["numpy"])
    return state


def _load_stock_rng(path: Path) -> Any:
    # The stock file holds numpy's state tuple (an ndarray); allow exactly those numpy types, nothing else.
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
    with torch.serialization.safe_globals(allowed):
        return load_weights_only(path)
