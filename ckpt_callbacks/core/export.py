"""Sharded safetensors export in the Hugging Face format, that never replaces anything but an earlier export.

Shards are planned by `huggingface_hub.split_torch_state_dict_into_shards` (the
same greedy splitter `save_pretrained` uses, same `model-0000k-of-0000N` names
and `model.safetensors.index.json`), written with this library's streaming
writer into a hidden staging folder beside the target, fsynced, and put in
place in one rename, so an interrupted export never leaves a half-written
export folder.

An export folder holds a hidden marker (`layout.EXPORT_MARKER`) listing its
files. The export replaces an existing folder only when it is an earlier
export of this library (it has the marker) or is empty; a folder holding
anything else is refused with an error that names what is in the way, and is
left exactly as it was. Paths that cannot work at all (the run folder itself,
one of its parents, a checkpoint inside it) are refused when the flags are
validated (`export_path_problem`), before training starts.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import split_torch_state_dict_into_shards

from ckpt_callbacks.config import parse_size
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.safetensors_io import unique_tensors, write_safetensors
from ckpt_callbacks.core.storage.durable import (
    delete_tree,
    fsync_tree,
    remove_stale_leftovers,
    remove_tree_quietly,
    replace_folder,
)
from ckpt_callbacks.errors import CheckpointError

__all__ = ["INDEX_NAME", "check_export_target", "export_path_problem", "export_safetensors"]

logger = logging.getLogger("ckpt_callbacks")

INDEX_NAME = "model.safetensors.index.json"
ExportProgress = Callable[[int], object]  # called with the bytes of each tensor file as it is written


def export_safetensors(
    state_dict: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    pretrained_objects: Iterable[Any] = (),
    weights_name: str = "model",
    progress: ExportProgress | None = None,
) -> list[Path]:
    """Write `state_dict` as sharded safetensors (+ index when sharded) into `out_dir`, atomically.

    `pretrained_objects` (a model config, generation config, tokenizer, a PEFT config...) are saved beside the
    weights through their own `save_pretrained`, so `from_pretrained(out_dir)` works. `weights_name` is the file
    stem (`"adapter_model"` for a PEFT adapter). Raises `CheckpointError` when `out_dir` holds anything but an
    earlier export of this library, which it then leaves untouched.

    Example:
        >>> export_safetensors(model.state_dict(), "run/export", max_shard_size="500MB", pretrained_objects=[model.config])
    """
    target = Path(out_dir)
    check_export_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(target.parent, final_name=target.name)  # a killed export of this same target
    staging = target.parent / layout.staging_name_for(target.name)
    staging.mkdir()
    try:
        written = _write_shards(unique_tensors(state_dict), staging, max_shard_size, weights_name, progress)
        for obj in pretrained_objects:
            obj.save_pretrained(str(staging))
        _write_marker(staging)
        fsync_tree(staging)
        check_export_target(target)  # again: something may have appeared there while the shards were written
        retired = replace_folder(staging, target)
    except BaseException:
        remove_tree_quietly(staging)
        raise
    if retired is not None:
        try:
            delete_tree(retired)
        except OSError as exc:
            logger.error("Could not remove the previous export %s (%s); the new one is in place at %s.", retired, exc,
                         target)
    return [target / path.name for path in written]


def check_export_target(target: Path) -> None:
    """Refuse an export target that holds anything but an earlier export of this library (or nothing)."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise CheckpointError(f"export_dir {target} exists and is not a folder; the export would replace it. "
                              "Choose another export_dir.", path=str(target))
    try:
        entries = sorted(os.listdir(target))
    except OSError as exc:
        raise CheckpointError(f"export_dir {target} cannot be read ({os.strerror(exc.errno or 0)}). Choose another "
                              "export_dir, or make it readable.", path=str(target)) from None
    if not entries or layout.EXPORT_MARKER in entries:
        return
    shown = ", ".join(repr(name) for name in entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise CheckpointError(
        f"export_dir {target} holds files this library did not write ({shown}); the export would replace them. "
        "Choose another export_dir (or an empty one), or move those files away.", path=str(target))


def export_path_problem(output_dir: str, export_dir: str) -> str | None:
    """Why `export_dir` cannot hold an export of the run in `output_dir` (None when it can): the run folder itself,
    one of its parents, or a checkpoint (or staging folder) inside it would be replaced by the export."""
    # Links and ".." resolved: a link to the run folder is the run folder.
    run = Path(os.path.realpath(output_dir))
    export = Path(os.path.realpath(export_dir))
    if export == run:
        return "is output_dir itself: the export would replace every checkpoint of the run"
    if run.is_relative_to(export):
        return f"is a parent of output_dir ({run}): the export would replace the whole run"
    if export.is_relative_to(run):
        first = export.relative_to(run).parts[0]
        if layout.parse_checkpoint_step(first) is not None or layout.is_leftover(first) or first == layout.LOCK_NAME:
            return (f"is the checkpoint folder {run / first} of output_dir, or inside it: retention and resume own it, "
                    "and the export would replace it")
    return None


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | str, weights_name: str,
                  progress: ExportProgress | None) -> list[Path]:
    split = split_torch_state_dict_into_shards(
        tensors, filename_pattern=weights_name + "{suffix}.safetensors", max_shard_size=parse_size(max_shard_size)
    )
    written = []
    for filename, names in split.filename_to_tensors.items():
        path = folder / filename
        write_safetensors(path, {name: tensors[name] for name in names}, {"format": "pt"}, fsync=False)
        written.append(path)
        if progress is not None:
            progress(path.stat().st_size)
    if split.is_sharded:
        index = {"metadata": {**split.metadata, "total_parameters": sum(t.numel() for t in tensors.values())},
                 "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        index_path = folder / f"{weights_name}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(index_path)
    return written


def _write_marker(folder: Path) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    marker = {"format": "ckpt_callbacks", "kind": "export", "files": files}
    (folder / layout.EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
