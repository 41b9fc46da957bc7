"""SIGKILL a training process at random instants, many times: what remains is always consistent.

Each kill is followed by the checks a user's next start relies on: every listed checkpoint verifies,
the stock `get_last_checkpoint` sees only complete checkpoints, the newest one loads and training
resumes, the export folder is whole, and leftovers are cleaned by the next save.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.safetensors_io import read_safetensors
from ckpt_callbacks.core.read.verify import find_problems

from .conftest import KillDelays

REPO = Path(__file__).resolve().parents[2]
KILLS_PER_MODE = 25
TIME_BUDGET_SECONDS = 60


@pytest.fixture(scope="module")
def fork_server() -> Iterator[subprocess.Popen[str]]:
    server = subprocess.Popen([sys.executable, "-m", "tests.faults.kill_child"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    yield server
    server.kill()
    server.wait()


def start_child(server: subprocess.Popen[str], output_dir: Path, mode: str, first_step: int) -> int:
    """Fork a training process; returns its pid once it has loaded its checkpoint and started training."""
    assert server.stdin is not None and server.stdout is not None
    server.stdin.write(f"{output_dir} {mode} {first_step}\n")
    server.stdin.flush()
    word, pid = server.stdout.readline().split()
    assert word == "ready"
    return int(pid)


def wait_until_gone(pid: int) -> None:
    """The fork server reaps the child; wait until the pid no longer exists."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} survived SIGKILL")


def check_consistent(output_dir: Path, *, resume: bool = True) -> int:
    """The invariants after a kill; returns the step to continue from."""
    manager = CheckpointManager(CheckpointArguments(output_dir=str(output_dir)))
    infos = manager.list()
    for info in infos:
        assert find_problems(Path(info.path), info.manifest, "checksum") == [], info.name
    for name in os.listdir(output_dir):
        if layout.parse_checkpoint_step(name) is not None:  # anything a glob or regex for checkpoint-* finds
            assert (output_dir / name / layout.MANIFEST_NAME).is_file(), f"{name} visible without a manifest"
    from transformers.trainer_utils import get_last_checkpoint

    last = get_last_checkpoint(str(output_dir))
    latest = manager.latest()
    assert (last is None and latest is None) or (latest is not None and last == latest.path)
    check_export(output_dir / "export")
    if latest is None or not resume:
        return 1 if latest is None else latest.step + 1
    model = torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(8)])
    manager.load(latest, {"model": model, "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-3)})
    return latest.step + 1


def check_export(export_dir: Path) -> None:
    if not export_dir.exists():
        return
    index = export_dir / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for shard in shards:
        tensors.update(read_safetensors(export_dir / shard))
    assert len(tensors) == 16  # 8 layers x (weight, bias): never a half-written export


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_at_random_instants_never_leaves_a_broken_latest(
    fork_server: subprocess.Popen[str], tmp_path: Path, mode: str
) -> None:
    delays = KillDelays(1234 if mode == "sync" else 5678, 0.0, 0.6)
    started = time.monotonic()
    next_step = 1
    kills = 0
    kills_mid_write = 0
    while kills < KILLS_PER_MODE and time.monotonic() - started < TIME_BUDGET_SECONDS:
        pid = start_child(fork_server, tmp_path, mode, next_step)
        time.sleep(delays.next())
        os.kill(pid, signal.SIGKILL)
        wait_until_gone(pid)
        kills += 1
        mid_write = any(layout.is_leftover(name) for name in os.listdir(tmp_path))
        kills_mid_write += mid_write
        step_before, next_step = next_step, check_consistent(tmp_path)
        delays.after_kill(mid_write or next_step > step_before)
    assert kills >= 10, f"only {kills} kills fit in the time budget"
    assert kills_mid_write >= 3, "the kills did not interrupt any write: the test would prove nothing"
    # The next start cleans what the kills left behind (staging, trash and export staging folders).
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), save_total_limit=2, async_save=False))
    manager.save(next_step, {"model": torch.nn.Linear(2, 2)})
    manager.close()
    assert [name for name in os.listdir(tmp_path) if layout.is_leftover(name)] == []
    check_consistent(tmp_path, resume=False)
    assert next_step > 1, "the run never got past its first checkpoint"
