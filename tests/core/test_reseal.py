"""`core/save/reseal.py`: a reseal records the files as they are, keeps the rest, and refuses what is unsafe."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointError, CheckpointManager
from ckpt_callbacks.core.save.reseal import plan_reseal, reseal_checkpoint


def _checkpoint(tmp_path: Path) -> Path:
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "run"), async_save=False)) as manager:
        manager.save(7, {"model": torch.nn.Linear(3, 2)}, metrics={"eval_loss": 0.5}, epoch=1.5,
                     metadata={"note": "mine"})
    return tmp_path / "run" / "checkpoint-7"


def test_reseal_records_a_replaced_file_and_keeps_everything_else(tmp_path: Path) -> None:
    checkpoint = _checkpoint(tmp_path)
    before = json.loads((checkpoint / "manifest.json").read_text())
    replacement = torch.nn.Linear(3, 2)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "other"), async_save=False)) as manager:
        manager.save(7, {"model": replacement})
    for name in ("model.safetensors", "model.json"):
        (checkpoint / name).write_bytes((tmp_path / "other" / "checkpoint-7" / name).read_bytes())

    result = reseal_checkpoint(checkpoint)
    assert result.written and result.changed == ["model.safetensors"] and not result.added and not result.removed
    after = json.loads((checkpoint / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != "files"} == {k: v for k, v in before.items() if k != "files"}
    model = torch.nn.Linear(3, 2)
    meta = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "run"))).load(7, {"model": model},
                                                                                         restore_rng=False)
    assert meta["metadata"] == {"note": "mine"} and meta["epoch"] == 1.5
    assert torch.equal(model.weight, replacement.weight)
    assert plan_reseal(checkpoint).unchanged


@pytest.mark.parametrize("entry", ["fifo", "colon_in_name"])
def test_reseal_refuses_special_files_and_names_a_manifest_cannot_hold(tmp_path: Path, entry: str) -> None:
    checkpoint = _checkpoint(tmp_path)
    before = (checkpoint / "manifest.json").read_bytes()
    if entry == "fifo":
        os.mkfifo(checkpoint / "pipe")
    else:
        (checkpoint / "notes:v2.txt").write_text("x")
    with pytest.raises(CheckpointError) as info:
        reseal_checkpoint(checkpoint)
    assert ("not a regular file" if entry == "fifo" else "a name the manifest format refuses") in str(info.value)
    assert (checkpoint / "manifest.json").read_bytes() == before
