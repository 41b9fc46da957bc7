"""`ckpt-callbacks reseal`: the documented way to accept a checkpoint changed on purpose (issue 14, defect 6).

A checkpoint whose weights were re-sharded by hand is refused by `verify` and by loads; after `reseal` it
verifies and loads the same tensors, with its step, metrics and states kept. What would make the new
manifest unsafe, or the checkpoint unloadable, is refused with nothing changed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointCorruptError, CheckpointManager
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.storage.store import LocalStore
from tests.parity.hf.test_resume import reshard_weights

from .conftest import ManagerRuns, run_cli


def manifest_of(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "manifest.json").read_text())


@pytest.fixture
def resharded(manager_runs: ManagerRuns, tmp_path: Path) -> Path:
    """A copy of the hf-engine run whose checkpoint-20 has re-sharded weights."""
    run = tmp_path / "run"
    shutil.copytree(manager_runs.run("hf"), run)
    reshard_weights(run / "checkpoint-20")  # as transformers' own checkpoint tests do
    return run


def test_a_resharded_checkpoint_is_refused_until_resealed_then_loads_the_same_weights(
        manager_runs: ManagerRuns, resharded: Path) -> None:
    checkpoint = resharded / "checkpoint-20"
    before = manifest_of(checkpoint)
    refused = run_cli("verify", checkpoint)
    assert refused.code == 1 and "checkpoint-20/model.safetensors: missing (listed in the manifest)" in refused.out
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    with pytest.raises(CheckpointCorruptError):
        CheckpointManager(CheckpointArguments(output_dir=str(resharded))).load(20, {"model": model})

    resealed = run_cli("reseal", checkpoint)
    assert resealed.code == 0, resealed.err
    assert resealed.out.splitlines()[1:] == [
        "  added: model-00001-of-00002.safetensors, model-00002-of-00002.safetensors, model.safetensors.index.json",
        "  removed: model.safetensors"]
    assert run_cli("verify", checkpoint).code == 0
    after = manifest_of(checkpoint)
    assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in before.items() if k != "files"}
    assert sorted(entry["path"] for entry in after["files"]) == sorted(
        p.name for p in checkpoint.iterdir() if p.name != "manifest.json")
    assert not (resharded / ".ckpt_callbacks.lock").exists(), "reseal left the run folder's lock file behind"

    meta = CheckpointManager(CheckpointArguments(output_dir=str(resharded))).load(20, {"model": model},
                                                                                 restore_rng=False)
    assert meta["step"] == 20 and meta["metrics"] == {"eval_loss": 0.3}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in manager_runs.weights[20].items())
    assert run_cli("reseal", checkpoint).out.strip() == (
        "checkpoint-20: nothing to reseal: its manifest.json already matches every file.")


def test_reseal_dry_run_and_json_write_nothing(resharded: Path) -> None:
    checkpoint = resharded / "checkpoint-20"
    before = (checkpoint / "manifest.json").read_bytes()
    planned = run_cli("reseal", checkpoint, "--dry-run", "--json")
    assert planned.code == 0, planned.err
    report = planned.json()
    assert (report["dry_run"], report["written"], report["removed"]) == (True, False, ["model.safetensors"])
    assert (checkpoint / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("change", ["link_inside", "state_files_gone", "damaged_manifest", "manifest_is_a_link"])
def test_reseal_refuses_what_would_be_unsafe_or_unloadable_and_changes_nothing(resharded: Path, change: str) -> None:
    checkpoint = resharded / "checkpoint-20"
    expected = {
        "link_inside": "is a link; a manifest records only the checkpoint's own files",
        "state_files_gone": "the manifest lists state(s) whose files are gone: 'optimizer' (optimizer.pt)",
        "damaged_manifest": "manifest is not valid JSON",
        "manifest_is_a_link": "its manifest is a link",
    }[change]
    if change == "link_inside":
        (checkpoint / "extra.bin").symlink_to(resharded / "checkpoint-10" / "optimizer.pt")
    elif change == "state_files_gone":
        (checkpoint / "optimizer.pt").unlink()
    elif change == "damaged_manifest":
        (checkpoint / "manifest.json").write_text("{not json")
    else:
        (checkpoint / "manifest.json").rename(resharded / "elsewhere.json")
        (checkpoint / "manifest.json").symlink_to(resharded / "elsewhere.json")
    before = {p.name: (p.read_bytes() if p.is_file() else None) for p in checkpoint.iterdir()}
    result = run_cli("reseal", checkpoint)
    assert result.code == 1, result.out + result.err
    assert expected in result.err and "Traceback" not in result.err
    assert {p.name: (p.read_bytes() if p.is_file() else None) for p in checkpoint.iterdir()} == before


def test_reseal_refuses_while_a_training_process_writes_the_run(resharded: Path) -> None:
    writer = LocalStore(resharded)
    writer.acquire_writer_lock()
    try:
        result = run_cli("reseal", resharded / "checkpoint-20")
    finally:
        writer.release_writer_lock()
    assert result.code == 1 and "is being written by a running training process" in result.err
    assert "model.safetensors" in {entry["path"] for entry in manifest_of(resharded / "checkpoint-20")["files"]}


def test_reseal_usage_errors(manager_runs: ManagerRuns, trained: Path) -> None:
    run = manager_runs.run("safetensors")
    assert run_cli("reseal", run / "checkpoint-10" / "model.safetensors").code == 2
    stock = run_cli("reseal", trained / "hf-stock" / "checkpoint-2")
    assert stock.code == 2 and "has no manifest.json: not a checkpoint of this library" in stock.err
    assert run_cli("reseal", run / "nowhere").code == 2


def test_reseal_leaves_out_the_leftover_of_an_interrupted_manifest_write(resharded: Path) -> None:
    checkpoint = resharded / "checkpoint-20"
    leftover = checkpoint / layout.staging_name_for("manifest.json")
    leftover.write_text("{}")
    report = run_cli("reseal", checkpoint, "--json").json()
    assert report["ignored"] == [leftover.name] and report["written"] is True
    assert leftover.name not in {entry["path"] for entry in manifest_of(checkpoint)["files"]}
