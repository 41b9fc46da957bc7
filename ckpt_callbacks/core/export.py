"""Sharded safetensors export in the Hugging Face format.

Shards are planned by `huggingface_hub.split_torch_state_dict_into_shards` (the
same greedy splitter `save_pretrained` uses, same `model-0000k-of-0000N` names
and `model.safetensors.index.json`), written with this library's streaming
writer into a hidden folder, fsynced, and renamed into place, so an
interrupted export never leaves a half-written export folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from ckpt_callbacks.config import parse_size
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.safetensors_io import unique_tensors, write_safetensors
from ckpt_callbacks.core.storage.durable import fsync_dir, fsync_tree, remove_tree_quietly

INDEX_NAME = "model.safetensors.index.json"


def export_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    pretrained_objects: Iterable[Any] = (),
) -> list[Path]:
    """Write `state_dict` as sharded safetensors (+ index when sharded) into `out_dir`, atomically.

    `pretrained_objects` (a model config, generation config, tokenizer, ...) are saved beside the
    weights through their own `save_pretrained`, so `from_pretrained(out_dir)` works.

    Example:
        >>> export_safetensors(model.state_dict(), "run/export", max_shard_size="500MB", pretrained_objects=[model.config])
    """
    target = Path(out_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / layout.staging_name_for(target.name)
    staging.mkdir()
    try:
        written = _write_shards(unique_tensors(state_dict), staging, max_shard_size)
        for obj in pretrained_objects:
            obj.save_pretrained(str(staging))
        fsync_tree(staging)
        _replace_folder(staging, target)
    except BaseException:
        remove_tree_quietly(staging)
        raise
    return [target / path.name for path in written]


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str) -> list[Path]:
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern="model{suffix}.safetensors", max_shard_size=parse_size(max_shard_size)
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        path = folder / filename
        write_safetensors(path, {name: tensors[name] for name in names}, {"format": "pt"}, fsync=False)
        written.append(path)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": sum(t.numel() for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(folder / INDEX_NAME)
    return written


def _replace_folder(staging: Path, target: Path) -> None:
    trash = None
    if target.exists():
        trash = target.parent / layout.trash_name(target.name)
        os.replace(target, trash)
    os.replace(staging, target)
    fsync_dir(target.parent)
    if trash is not None:
        remove_tree_quietly(trash)
