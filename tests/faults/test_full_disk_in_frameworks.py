"""A disk that fills up during real HF Trainer and Lightning training, sync and async.

By default (`on_save_error="raise"`) training stops with a `CheckpointWriteError` naming the folder and the
cause; with `on_save_error="warn"` the failure is logged and training goes on. Either way no partial
checkpoint is visible and every checkpoint that is visible verifies and is the one a resume picks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytest

from ckpt_callbacks import CheckpointArguments, CheckpointManager, CheckpointWriteError
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.read.verify import find_problems

MAX_STEPS = 12
DISK_FULL = ("No space left on device", "Not enough free space")  # the write failed, or the precheck refused it


def train_hf(output_dir: Path, **flags: Any) -> int:
    from ckpt_callbacks.hf import CheckpointCallback
    from tests.hf.conftest import make_trainer

    trainer = make_trainer(output_dir, [CheckpointCallback(save_steps=2, export_at_end=False, **flags)],
                           max_steps=MAX_STEPS)
    try:
        trainer.train()
    finally:
        steps = int(trainer.state.global_step)
    return steps


def train_lightning(output_dir: Path, **flags: Any) -> int:
    from tests.lightning.helpers import namespace, seed_everything, train_loader, val_loader

    ns = namespace("lightning.pytorch")
    seed_everything(0)
    plugin, callback = ns.ours(output_dir, output_dir=str(output_dir), save_steps=2, **flags)
    trainer = ns.trainer(output_dir, callbacks=[callback], plugins=[plugin], max_steps=MAX_STEPS, max_epochs=-1)
    try:
        trainer.fit(ns.Tiny(hidden=256), train_loader(), val_loader())
    finally:
        steps = int(trainer.global_step)
    return steps


FRONT_ENDS = {"hf": train_hf, "lightning": train_lightning}
# Disk sizes with room for about two checkpoints (the third is refused by the free-space check), or for none
# (the first write runs out of space: a real ENOSPC from the file system mid-write).
DISK_SIZES = {("hf", 2): "1m", ("hf", 0): "300k", ("lightning", 2): "150k", ("lightning", 0): "40k"}


def assert_only_intact_checkpoints(folder: Path) -> list[int]:
    names = os.listdir(folder)
    assert not [name for name in names if name.startswith(layout.STAGING_PREFIX)], names
    for name in names:
        if layout.parse_checkpoint_step(name) is not None:
            assert (folder / name / layout.MANIFEST_NAME).is_file(), f"{name} visible without a manifest"
    infos = CheckpointManager(CheckpointArguments(output_dir=str(folder))).list()
    for info in infos:
        assert find_problems(Path(info.path), info.manifest, "checksum") == [], info.name
    return [info.step for info in infos]


@pytest.mark.parametrize("room_for", [2, 0], ids=["room_for_two", "room_for_none"])
@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("front_end", ["hf", "lightning"])
def test_full_disk_stops_training_with_the_folder_and_the_cause(
    small_disk: Any, front_end: str, async_save: bool, room_for: int,
) -> None:
    disk = small_disk(DISK_SIZES[front_end, room_for])
    with pytest.raises(CheckpointWriteError) as raised:
        FRONT_ENDS[front_end](disk, async_save=async_save)
    message = str(raised.value)
    assert str(disk) in message and any(cause in message for cause in DISK_FULL), message
    if room_for == 0:
        assert "No space left on device" in message
    assert "Earlier checkpoints are untouched" in message
    steps = assert_only_intact_checkpoints(disk)
    assert len(steps) == room_for and all(step < MAX_STEPS for step in steps), steps


@pytest.mark.parametrize("front_end", ["hf", "lightning"])
def test_full_disk_with_on_save_error_warn_logs_and_training_goes_on(
    small_disk: Any, caplog: pytest.LogCaptureFixture, front_end: str,
) -> None:
    disk = small_disk(DISK_SIZES[front_end, 2])
    with caplog.at_level(logging.ERROR, logger="ckpt_callbacks"):
        steps_trained = FRONT_ENDS[front_end](disk, async_save=True, on_save_error="warn")
    assert steps_trained == MAX_STEPS
    assert "training goes on" in caplog.text and any(cause in caplog.text for cause in DISK_FULL), caplog.text
    assert assert_only_intact_checkpoints(disk)
