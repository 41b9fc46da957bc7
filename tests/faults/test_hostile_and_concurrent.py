"""Hostile files never run code; readers during writes see only complete checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointError, CheckpointManager
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.storage.checksums import checksum_file

REPO = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs a shell command that creates the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.sentinel}",))


def plant(folder: Path, filename: str, payload: object) -> None:
    """Replace one file with a hostile pickle and fix the manifest so that verification passes."""
    target = folder / filename
    torch.save({"state": payload}, target)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == filename:
            entry["size"], entry["checksum"] = target.stat().st_size, checksum_file(target)
    manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(("engine", "filename", "piece"), [
    ("torch", "optimizer.pt", "optimizer"),
    ("hf", "optimizer.pt", "optimizer"),
    ("hf", "rng_state.pth", None),
    ("torch", "rng.pt", None),
])
def test_pickle_payload_is_refused_and_never_runs(tmp_path: Path, engine: str, filename: str, piece: str | None) -> None:
    model = torch.nn.Linear(3, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "run"), engine=engine, async_save=False))
    manager.save(1, {"model": model, "optimizer": optimizer})
    sentinel = tmp_path / "pwned"
    plant(tmp_path / "run" / "checkpoint-1", filename, Payload(sentinel))
    targets: dict[str, object] = {"model": model}
    if piece:
        targets[piece] = optimizer
    with pytest.raises(CheckpointError, match="refused to load") as info:
        manager.load(1, targets)
    assert filename in str(info.value)
    assert not sentinel.exists()


def test_reader_during_writes_sees_only_complete_checkpoints(tmp_path: Path) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER_PROGRAM, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    reader = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    checked = set()
    deadline = time.monotonic() + 20
    try:
        while writer.poll() is None and time.monotonic() < deadline:
            for info in reader.list():
                assert find_problems(Path(info.path), info.manifest, "checksum") == [], info.name
                checked.add(info.step)
    finally:
        writer.kill()
        writer.wait()
    assert len(checked) >= 3, checked


WRITER_PROGRAM = """
import sys, torch
from ckpt_callbacks import CheckpointArguments, CheckpointManager
manager = CheckpointManager(CheckpointArguments(output_dir=sys.argv[1]))
model = torch.nn.Linear(512, 512)
for step in range(1, 40):
    with torch.no_grad():
        model.weight.add_(1.0)
    manager.save(step, {"model": model})
manager.close()
"""
