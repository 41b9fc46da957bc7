"""Bodies of the sharded-export tests; each runs on every rank."""

from __future__ import annotations

import torch

from ckpt_callbacks.core.distributed.consolidate import export_consolidated, full_model_state_dict

from .workers import build_fsdp, train_and_save_sharded

SHARD_SIZE = 300  # bytes: forces several export shards and an index even for this tiny model


def train_sharded_then_export(rank: int, world_size: int, output_dir: str, export_dir: str, weights_file: str) -> None:
    """FSDP2 training with the dcp engine, then the end-of-training export from the sharded model."""
    model, optimizer = build_fsdp(world_size)
    train_and_save_sharded(model, optimizer, output_dir).close()
    written = export_consolidated(model, export_dir, max_shard_size=SHARD_SIZE)
    weights = full_model_state_dict(model)
    assert bool(written) == (rank == 0) and bool(weights) == (rank == 0)
    if rank == 0:
        torch.save(weights, weights_file)
