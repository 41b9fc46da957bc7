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


def test_files_a_framework_writes_on_every_rank_are_committed_with_a_manifest_and_rotated(tmp_path: Path) -> None:
    output_dir = tmp_path / "run"
    run_on_processes(workers.framework_written_sharded_save, 2, str(output_dir))
    assert sorted(os.listdir(output_dir)) == ["checkpoint-2"]  # retention ran; no staging folder, no lock left
    manager = CheckpointManager(CheckpointArguments(output_dir=str(output_dir)))
    (info,) = manager.list()
    assert info.step == 2 and info.engine == "dcp" and info.manifest.world_size == 2
    assert info.manifest.states == ["checkpoint.ckpt"]
    files = {entry.path for entry in info.manifest.files}
    on_disk = {p.relative_to(output_dir / "checkpoint-2").as_posix() for p in (output_dir / "checkpoint-2").rglob("*")
               if p.is_file() and p.name != "manifest.json"}
    assert files == on_disk and {"checkpoint.ckpt/__0_0.distcp", "checkpoint.ckpt/__1_0.distcp"} <= files
    # every shard is verified as any checkpoint: a damaged one is named
    shard = output_dir / "checkpoint-2" / "checkpoint.ckpt" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    from ckpt_callbacks import CheckpointCorruptError

    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-2/checkpoint\.ckpt/__1_0\.distcp: checksum mismatch"):
        manager.load_last({"checkpoint.ckpt": None})
