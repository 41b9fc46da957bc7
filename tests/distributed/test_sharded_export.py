"""A sharded (FSDP2, `dcp` engine) run on 2 processes: its end-of-training export is the one a single process
writes, and `ckpt-callbacks verify` / `export` work on its checkpoints."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_callbacks.cli import main as cli
from ckpt_callbacks.core.distributed.consolidate import export_consolidated
from ckpt_callbacks.core.export import export_safetensors
from ckpt_callbacks.core.format import layout

from . import export_workers
from .launch import run_on_processes


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded")
    run_on_processes(export_workers.train_sharded_then_export, 2, str(root / "run"), str(root / "export"),
                     str(root / "final_weights.pt"))
    return root


def test_sharded_export_equals_the_single_process_export(sharded_run: Path, tmp_path: Path) -> None:
    weights = torch.load(sharded_run / "final_weights.pt", weights_only=True)
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        "0.weight": (16, 8), "0.bias": (16,), "2.weight": (4, 16), "2.bias": (4,)}  # whole, not rank slices
    export_safetensors(weights, tmp_path / "single", max_shard_size=export_workers.SHARD_SIZE)

    exported = folder_bytes(sharded_run / "export")
    assert "model.safetensors.index.json" in exported and len(exported) > 2
    assert exported == folder_bytes(tmp_path / "single")


def test_cli_verifies_and_exports_a_sharded_checkpoint(sharded_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["verify", str(sharded_run / "run")]) == 0
    assert "2 ok, 0 failed" in capsys.readouterr().out

    out = tmp_path / "cli-export"
    assert cli(["export", str(sharded_run / "run" / "checkpoint-2"), str(out),
                "--max-shard-size", str(export_workers.SHARD_SIZE)]) == 0
    assert folder_bytes(out) == folder_bytes(sharded_run / "export")  # the checkpoint holds the final weights


def test_cli_verify_names_a_damaged_shard_of_a_sharded_checkpoint(sharded_run: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    damaged = tmp_path / "checkpoint-2"
    shutil.copytree(sharded_run / "run" / "checkpoint-2", damaged)
    shard = damaged / "model" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, different bytes: only the checksum can tell
    shard.write_bytes(bytes(data))

    assert cli(["verify", str(damaged)]) == 1
    output = capsys.readouterr()
    assert "model/__1_0.distcp" in output.out + output.err


def test_export_consolidated_without_process_group_is_the_plain_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    written = export_consolidated(model, tmp_path / "consolidated", max_shard_size=export_workers.SHARD_SIZE)
    export_safetensors(model.state_dict(), tmp_path / "plain", max_shard_size=export_workers.SHARD_SIZE)
    # the weight files, plus the marker that makes the folder recognizable as an export of this library
    assert sorted([path.name for path in written] + [layout.EXPORT_MARKER]) == sorted(os.listdir(tmp_path / "plain"))
    assert folder_bytes(tmp_path / "consolidated") == folder_bytes(tmp_path / "plain")
