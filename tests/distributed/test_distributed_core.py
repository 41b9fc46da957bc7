"""Multi-process checkpointing on real torch.distributed (gloo, CPU, 2 processes)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ckpt_callbacks import CheckpointArguments, CheckpointManager

from . import workers
from .launch import run_on_processes


@pytest.mark.parametrize("async_save", [False, True])
def test_collective_commit_with_per_rank_rng(tmp_path: Path, async_save: bool) -> None:
    run_on_processes(workers.replicated_save_and_load, 2, str(tmp_path), async_save)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    assert [info.step for info in manager.list()] == [2, 3]
    manifest = json.loads((tmp_path / "checkpoint-3" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert {"rng_0", "rng_1", "model", "optimizer"} <= set(manifest["states"])
    files = {entry["path"] for entry in manifest["files"]}
    assert {"rng_0.safetensors", "rng_1.safetensors", "model.safetensors"} <= files


@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)])
def test_sharded_checkpoint_reshards_across_world_sizes(tmp_path: Path, save_world: int, load_world: int) -> None:
    output_dir, reference = str(tmp_path / "run"), str(tmp_path / "reference.pt")
    run_on_processes(workers.sharded_save, save_world, output_dir, reference)
    run_on_processes(workers.sharded_resume, load_world, output_dir, reference)


def test_killing_one_rank_mid_save_commits_nothing(tmp_path: Path) -> None:
    with pytest.raises(Exception):  # noqa: B017  (the spawn launcher reports the killed rank)
        run_on_processes(workers.killed_rank_mid_save, 2, str(tmp_path))
    assert (tmp_path / "rank0-saved-1").exists() and (tmp_path / "rank1-saved-1").exists()
    names = sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-"))
    assert names == ["checkpoint-1"]
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    assert [info.step for info in manager.list()] == [1]
