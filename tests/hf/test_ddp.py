"""`transformers.Trainer` with DDP on 2 CPU processes (torchrun, gloo) and the callback: every rank writes its own
`rng_state_{rank}.pth`, rank 0 the replicated files, the commit is collective, retention and export run once,
and an interrupted run resumed with the stock `trainer.train(resume_from_checkpoint=True)` ends bit for bit
where the uninterrupted one does, on every rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

from tests.hf.conftest import assert_same_state_dicts, checkpoint_steps

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2
RANKS = range(WORLD_SIZE)


def torchrun_command(root: Path, mode: str, async_save: bool, writer: str = "engine") -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD_SIZE}",
            "-m", "tests.hf.ddp_train", str(root), mode, "async" if async_save else "sync", writer]


def torchrun(root: Path, mode: str, async_save: bool, writer: str = "engine") -> list[dict[str, Any]]:
    """Run tests/hf/ddp_train.py on 2 processes; return what each rank ended with."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun_command(root, mode, async_save, writer), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [torch.load(root / f"final-{mode}-rank{rank}.pt", weights_only=True) for rank in RANKS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("uninterrupted")
    return root, torchrun(root, "reference", async_save=True)


def test_each_rank_writes_its_rng_file_and_rank0_the_rest_once(reference: tuple[Path, list[dict[str, Any]]]) -> None:
    root, finals = reference
    assert checkpoint_steps(root) == [9, 10]  # save_steps=3, the final step, save_total_limit=2 applied once
    assert get_last_checkpoint(str(root)) == str(root / "checkpoint-10")
    assert not [name for name in os.listdir(root) if name.startswith(".") and "checkpoint" in name]  # no staging left
    checkpoint = root / "checkpoint-10"
    assert sorted(os.listdir(checkpoint)) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "optimizer.pt",
        "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json", "training_args.bin",
    ]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["world_size"] == WORLD_SIZE
    assert {entry["path"] for entry in manifest["files"]} == set(os.listdir(checkpoint)) - {"manifest.json"}
    # Each file holds its own rank's generators (the ranks run different streams).
    rng = [torch.load(checkpoint / f"rng_state_{rank}.pth", weights_only=False) for rank in RANKS]
    assert not torch.equal(rng[0]["cpu"], rng[1]["cpu"])
    # The export is written once, from the final weights.
    exported = load_file(root / "export" / "model.safetensors")
    for name, tensor in exported.items():
        assert torch.equal(tensor, finals[0]["weights"][name]), name


@pytest.mark.parametrize(
    ("interruption", "async_save", "resumed_from", "kept"),
    [("crash", False, 6, [3, 6]), ("preempt", True, 7, [6, 7])],
    ids=["exception-sync", "signal-to-one-rank-async"],
)
def test_interrupted_ddp_run_resumes_bitwise_exact_on_every_rank(
    tmp_path: Path, reference: tuple[Path, list[dict[str, Any]]], interruption: str, async_save: bool,
    resumed_from: int, kept: list[int],
) -> None:
    # crash: every rank raises after step 7, the newest checkpoint is step 6. preempt: only rank 1 is signalled
    # during step 7; both ranks must save step 7 together (the commit is collective) and stop.
    _, expected = reference
    interrupted = torchrun(tmp_path, interruption, async_save)
    assert [final["global_step"] for final in interrupted] == [7, 7]
    assert [final["preempted"] for final in interrupted] == [interruption == "preempt"] * WORLD_SIZE
    assert checkpoint_steps(tmp_path) == kept
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / f"checkpoint-{resumed_from}")

    resumed = torchrun(tmp_path, "resume", async_save)  # other seeds: only the checkpoint can make it match

    for rank in RANKS:
        assert resumed[rank]["global_step"] == 10
        assert_same_state_dicts(resumed[rank]["weights"], expected[rank]["weights"], f"rank {rank} weights")
        assert_same_state_dicts(resumed[rank]["optimizer"], expected[rank]["optimizer"], f"rank {rank} optimizer")
        assert_same_state_dicts(resumed[rank]["rng"], expected[rank]["rng"], f"rank {rank} RNG")
    assert not torch.equal(expected[0]["rng"]["cpu"], expected[1]["rng"]["cpu"])  # per-rank streams, really


def test_damaged_checkpoint_stops_every_rank_with_the_bad_file_named(
    tmp_path: Path, reference: tuple[Path, list[dict[str, Any]]],
) -> None:
    # Rank 0 verifies and broadcasts its verdict: both ranks raise, neither waits for the other in training.
    root = tmp_path / "run"
    shutil.copytree(reference[0] / "checkpoint-10", root / "checkpoint-10")
    optimizer_file = root / "checkpoint-10" / "optimizer.pt"
    data = bytearray(optimizer_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    optimizer_file.write_bytes(bytes(data))

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(torchrun_command(root, "resume", async_save=False), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in RANKS:
        error = (root / f"error-rank{rank}.txt").read_text()
        assert error.startswith("CheckpointCorruptError") and "checkpoint-10/optimizer.pt: checksum mismatch" in error


def test_the_stock_saver_path_commits_every_ranks_files_and_resumes_exactly(
    tmp_path: Path, reference: tuple[Path, list[dict[str, Any]]],
) -> None:
    # The path FSDP and DeepSpeed take (the stock saver writes into the core's staging folder, every rank its own
    # files; the commit is collective), here under DDP on CPU. Its resume must end where the uninterrupted run does.
    _, expected = reference
    interrupted = torchrun(tmp_path, "crash", async_save=False, writer="stock")
    assert [final["global_step"] for final in interrupted] == [7, 7]
    assert checkpoint_steps(tmp_path) == [3, 6]
    assert not [name for name in os.listdir(tmp_path) if name.startswith((".staging", ".trash"))]
    checkpoint = tmp_path / "checkpoint-6"
    assert sorted(os.listdir(checkpoint)) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "optimizer.pt",
        "rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json", "training_args.bin",
    ]
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert manifest["world_size"] == WORLD_SIZE
    assert {entry["path"] for entry in manifest["files"]} == set(os.listdir(checkpoint)) - {"manifest.json"}
    assert {"rng_0", "rng_1"} <= set(manifest["states"])

    resumed = torchrun(tmp_path, "resume", async_save=False, writer="stock")

    for rank in RANKS:
        assert resumed[rank]["global_step"] == 10
        assert_same_state_dicts(resumed[rank]["weights"], expected[rank]["weights"], f"rank {rank} weights")
        assert_same_state_dicts(resumed[rank]["optimizer"], expected[rank]["optimizer"], f"rank {rank} optimizer")
        assert_same_state_dicts(resumed[rank]["rng"], expected[rank]["rng"], f"rank {rank} RNG")
    assert checkpoint_steps(tmp_path) == [9, 10]
