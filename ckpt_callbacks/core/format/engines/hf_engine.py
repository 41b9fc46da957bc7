"""`hf` engine: the exact file layout of `transformers.Trainer` checkpoints.

The HF adapter hands state pieces under the stock names; this engine writes
each to the stock file and format, so `trainer.train(resume_from_checkpoint=...)`,
`get_last_checkpoint` and `AutoModel.from_pretrained(checkpoint_dir)` work
unchanged. No transformers import: config and tokenizer objects are written
through their own `save_pretrained`.

Pieces and their files (names in `layout`):

| piece | files |
|---|---|
| `model` | `model.safetensors` (or, written by others, shards + index, or `pytorch_model.bin`) |
| `adapter`, `{name}/adapter` | `adapter_model.safetensors` of a PEFT adapter (in `{name}/` for a non-default one) |
| `optimizer`, `scheduler`, `scaler` | `optimizer.pt`, `scheduler.pt`, `scaler.pt` |
| `rng`, `rng_{rank}` | `rng_state.pth`, `rng_state_{rank}.pth` |
| `trainer_state` | `trainer_state.json` |
| `training_args` | `training_args.bin` (a full pickle for users' tools; never loaded) |
| `pretrained` | what the objects' `save_pretrained` writes (`config.json`, tokenizer, `adapter_config.json`...) |

A PEFT checkpoint holds what `PeftModel.save_pretrained` writes: `adapter_model.safetensors` and
`adapter_config.json` per adapter (a non-default adapter in its own `{name}/` folder), and the model card
`README.md`; the frozen base model is not in it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines.base import CheckpointEngine
from ckpt_callbacks.core.format.engines.torch_engine import load_lazily, load_weights_only, save_torch
from ckpt_callbacks.core.format.safetensors_io import (
    TensorSpec,
    read_safetensors,
    read_tensor_specs,
    unique_tensors,
    write_safetensors,
)
from ckpt_callbacks.core.state.rng import numpy_state_as_stock, numpy_state_from_stock
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError

__all__ = ["PRETRAINED_FILES", "PRETRAINED_PIECE", "HFEngine", "is_stock_trainer_checkpoint", "load_model_weights"]

# Objects whose own save_pretrained writes config.json, generation_config.json, tokenizer files, ...
PRETRAINED_PIECE = "pretrained"
TRAINING_ARGS_PIECE = "training_args"
ADAPTER_PIECE = "adapter"
# Files `from_pretrained` needs beside the weights: written by the `pretrained` piece, copied by an export.
PRETRAINED_FILES = (
    layout.HF_CONFIG_FILE, "generation_config.json", layout.HF_PEFT_CONFIG_FILE, "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "preprocessor_config.json", "processor_config.json",
)
PEFT_MODEL_CARD = "README.md"  # what PeftModel.save_pretrained writes beside the adapters


def is_stock_trainer_checkpoint(folder: Path) -> bool:
    """Whether `folder` (a `checkpoint-{step}` folder without a manifest) is one the stock Trainer wrote."""
    return (folder / layout.HF_TRAINER_STATE_FILE).is_file()


class HFEngine(CheckpointEngine):
    name = "hf"

    def save(self, state: Any, relpath: str) -> None:
        directory = self.directory
        if relpath == "model":
            write_safetensors(directory / layout.HF_MODEL_FILE, unique_tensors(state), {"format": "pt"}, fsync=False)
        elif _is_adapter(relpath):
            target = self._adapter_file(relpath)
            target.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(target, unique_tensors(state), {"format": "pt"}, fsync=False)
        elif relpath in layout.HF_TORCH_FILES:
            save_torch(state, directory / layout.HF_TORCH_FILES[relpath])
        elif _is_rng(relpath):
            save_torch(_rng_to_stock(state, single_process=relpath == "rng"), directory / layout.hf_rng_file(relpath))
        elif relpath == "trainer_state":
            (directory / layout.HF_TRAINER_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
        elif relpath == TRAINING_ARGS_PIECE:
            # Written as the stock Trainer does (a pickle, for users' tools); this library never reads it back.
            save_torch(state, directory / layout.HF_TRAINING_ARGS_FILE)
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
        if _is_adapter(relpath):
            return read_safetensors(self._adapter_file(relpath), map_location)
        if relpath in layout.HF_TORCH_FILES:
            return load_weights_only(directory / layout.HF_TORCH_FILES[relpath], map_location)
        if _is_rng(relpath):
            return _rng_from_stock(_load_stock_rng(directory / layout.hf_rng_file(relpath)))
        if relpath == "trainer_state":
            return _read_json(directory / layout.HF_TRAINER_STATE_FILE)
        if relpath == PRETRAINED_PIECE:
            return {path.name: _read_json(path) for path in self._existing(PRETRAINED_FILES) if path.suffix == ".json"}
        if relpath == TRAINING_ARGS_PIECE:
            path = directory / layout.HF_TRAINING_ARGS_FILE
            raise CheckpointError(f"{path} is a full pickle of TrainingArguments; it is never loaded, because "
                                  "unpickling it could run code.", path=str(path))
        return load_weights_only(directory / f"{relpath}.pt", map_location)

    def describe(self, relpath: str) -> Any:
        if relpath == "model" or _is_adapter(relpath):
            files = self.files_of(relpath)
            if files and files[0].endswith(".bin"):
                return load_lazily(self.directory / files[0])
            specs: dict[str, TensorSpec] = {}
            for name in files:
                if name.endswith(".safetensors"):
                    specs.update(read_tensor_specs(self.directory / name))
            return specs
        if relpath == TRAINING_ARGS_PIECE:
            return "a full pickle of TrainingArguments (never loaded)"
        if relpath in layout.HF_TORCH_FILES:
            return load_lazily(self.directory / layout.HF_TORCH_FILES[relpath])
        return self.load(relpath, "cpu")

    def files_of(self, relpath: str) -> list[str]:
        directory = self.directory
        if relpath == "model":
            if (directory / layout.HF_MODEL_FILE).is_file():
                return [layout.HF_MODEL_FILE]
            index = directory / layout.HF_MODEL_INDEX_FILE
            if index.is_file():
                return [layout.HF_MODEL_INDEX_FILE, *_shards_of(index)]
            return [layout.LEGACY_MODEL_FILE]
        if _is_adapter(relpath):
            return [self._adapter_file(relpath).relative_to(directory).as_posix()]
        if relpath in layout.HF_TORCH_FILES:
            return [layout.HF_TORCH_FILES[relpath]]
        if _is_rng(relpath):
            return [layout.hf_rng_file(relpath)]
        if relpath == "trainer_state":
            return [layout.HF_TRAINER_STATE_FILE]
        if relpath == TRAINING_ARGS_PIECE:
            return [layout.HF_TRAINING_ARGS_FILE]
        if relpath == PRETRAINED_PIECE:
            return [path.relative_to(directory).as_posix() for path in self._pretrained_files()]
        return [f"{relpath}.pt"]

    def pieces(self) -> list[str]:
        """The pieces of the stock layout present in the open folder (for folders without a manifest)."""
        found = [piece for piece in ("model", *layout.HF_TORCH_FILES, "trainer_state") if self.has(piece)]
        found[:0] = self._adapter_pieces()
        found += sorted("rng" + p.name.removeprefix(layout.HF_RNG_FILE_PREFIX).removesuffix(".pth")
                        for p in self.directory.glob(f"{layout.HF_RNG_FILE_PREFIX}*.pth"))
        if (self.directory / layout.HF_TRAINING_ARGS_FILE).is_file():
            found.append(TRAINING_ARGS_PIECE)
        if self._pretrained_files():
            found.append(PRETRAINED_PIECE)
        return found

    def _adapter_pieces(self) -> list[str]:
        """The PEFT adapters in the open folder: `adapter` at the top, `{name}/adapter` in subfolders."""
        pieces = [ADAPTER_PIECE] if (self.directory / layout.HF_PEFT_MODEL_FILE).is_file() else []
        pieces += sorted(f"{path.parent.name}/{ADAPTER_PIECE}"
                         for path in self.directory.glob(f"*/{layout.HF_PEFT_MODEL_FILE}") if path.is_file())
        return pieces

    def _pretrained_files(self) -> list[Path]:
        """What the `pretrained` piece wrote: the files `from_pretrained` needs, and for a PEFT checkpoint the model
        card and the config of each adapter in a subfolder."""
        files = self._existing(PRETRAINED_FILES)
        if self._adapter_pieces():
            files += self._existing((PEFT_MODEL_CARD,))
            files += sorted(path for path in self.directory.glob(f"*/{layout.HF_PEFT_CONFIG_FILE}") if path.is_file())
        return files

    def has(self, relpath: str) -> bool:
        if relpath == "model":
            names = (layout.HF_MODEL_FILE, layout.HF_MODEL_INDEX_FILE, layout.LEGACY_MODEL_FILE)
            return any((self.directory / name).is_file() for name in names)
        if relpath == PRETRAINED_PIECE:
            return bool(self._pretrained_files())
        return all((self.directory / name).is_file() for name in self.files_of(relpath))

    def _adapter_file(self, relpath: str) -> Path:
        return self.directory / Path(relpath).parent / layout.HF_PEFT_MODEL_FILE

    def _existing(self, names: tuple[str, ...]) -> list[Path]:
        return [self.directory / name for name in names if (self.directory / name).is_file()]


def load_model_weights(directory: Path, map_location: Any = None) -> dict[str, torch.Tensor]:
    """Model weights of a stock-layout folder: single or sharded safetensors, or a legacy `pytorch_model.bin`."""
    single = directory / layout.HF_MODEL_FILE
    if single.is_file():
        return read_safetensors(single, map_location)
    index = directory / layout.HF_MODEL_INDEX_FILE
    if index.is_file():
        weights: dict[str, torch.Tensor] = {}
        for shard in _shards_of(index):
            weights.update(read_safetensors(directory / shard, map_location))
        return weights
    legacy = directory / layout.LEGACY_MODEL_FILE
    if legacy.is_file():
        return cast(dict[str, torch.Tensor], load_weights_only(legacy, map_location))
    raise CheckpointNotFoundError(
        f"{directory}: no model weights ({layout.HF_MODEL_FILE}, {layout.HF_MODEL_INDEX_FILE} or "
        f"{layout.LEGACY_MODEL_FILE}).", path=str(directory))


def _shards_of(index: Path) -> list[str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        shards = sorted({str(name) for name in weight_map.values()})
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointCorruptError(f"{index}: unreadable index ({exc!r}).", path=str(index), reason="unreadable") from None
    for shard in shards:
        if Path(shard).name != shard:
            raise CheckpointCorruptError(f"{index}: shard name {shard!r} leaves the folder.", path=str(index),
                                         reason="unsafe path")
    return shards


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointCorruptError(f"{path}: unreadable ({exc}).", path=str(path), reason="unreadable") from None


def _is_rng(relpath: str) -> bool:
    return relpath == "rng" or relpath.startswith("rng_")


def _is_adapter(relpath: str) -> bool:
    return relpath == ADAPTER_PIECE or relpath.endswith(f"/{ADAPTER_PIECE}")


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
