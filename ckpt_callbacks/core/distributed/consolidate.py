"""Whole model weights from a sharded model, and the export written from them.

With FSDP2 (`fully_shard`) or DTensor tensor parallelism every rank holds a slice of each weight. An export
must hold whole tensors, in the same sharded-safetensors layout a single process writes, so the weights are
gathered to rank 0 on CPU with `get_model_state_dict(..., StateDictOptions(full_state_dict=True,
cpu_offload=True))` (a collective: every rank calls it) and rank 0 writes the export.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.core.export import export_safetensors
from ckpt_callbacks.errors import CheckpointError

__all__ = ["export_consolidated", "full_model_state_dict"]


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights as whole CPU tensors: on rank 0 of the process group (other ranks get `{}`), or in a
    process without one. Collective when a process group is initialized: call it on every rank.

    Example:
        >>> weights = full_model_state_dict(fsdp_model)   # every rank; rank 0 gets {"layers.0.weight": ...}
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _owning_their_storage({name: value for name, value in state.items() if isinstance(value, torch.Tensor)})


def _owning_their_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each tensor in a storage of its own size, as a model in one process holds its weights. A weight that FSDP2
    sharded unevenly comes back gathered into a padded buffer (a (1, 16) weight over 2 ranks: a (2, 16) storage),
    and the export's index counts storage bytes (`total_size`). Tied weights (the same view twice) stay one tensor."""
    copies: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    owned = {}
    for name, tensor in state.items():
        if tensor.untyped_storage().nbytes() == tensor.nbytes:
            owned[name] = tensor
            continue
        view = (tensor.untyped_storage().data_ptr(), int(tensor.storage_offset()), tuple(tensor.shape),
                tuple(tensor.stride()))
        if view not in copies:
            copies[view] = tensor.clone()
        owned[name] = copies[view]
    return owned


def export_consolidated(
    model: torch.nn.Module,
    out_dir: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    pretrained_objects: Iterable[Any] = (),
) -> list[Path]:
    """Export a (possibly sharded) model as `export_safetensors` does in one process: gather the whole weights to
    rank 0, write there, and return on every rank once the export is in place (the written paths on rank 0,
    `[]` elsewhere). A failure on rank 0 raises `CheckpointError` on the other ranks too.

    Example:
        >>> export_consolidated(fsdp_model, "run/export", max_shard_size="500MB")   # on every rank
    """
    import torch.distributed as dist

    weights = full_model_state_dict(model)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        return export_safetensors(weights, out_dir, max_shard_size=max_shard_size, pretrained_objects=pretrained_objects)
    written: list[Path] = []
    failure: list[str | None] = [None]
    if dist.get_rank() == 0:
        try:
            written = export_safetensors(weights, out_dir, max_shard_size=max_shard_size,
                                         pretrained_objects=pretrained_objects)
        except BaseException as exc:
            failure[0] = f"{type(exc).__name__}: {exc}"
            dist.broadcast_object_list(failure, src=0)
            raise
    dist.broadcast_object_list(failure, src=0)  # doubles as the barrier: the export exists when this returns
    if failure[0] is not None:
        raise CheckpointError(f"The export to {out_dir} failed on rank 0 ({failure[0]}).", path=str(out_dir))
    return written
