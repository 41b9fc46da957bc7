"""Disk full, read-only and failing disks: the error reaches the user with the path and the cause,
earlier checkpoints are untouched, and no partial checkpoint is ever visible."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager, CheckpointWriteError
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.storage.store import LocalStore

from .conftest import remount_read_only


def model_of_megabytes(megabytes: float) -> torch.nn.Module:
    features = int((megabytes * 1e6 / 4) ** 0.5)
    return torch.nn.Linear(features, features, bias=False)


def visible_checkpoints(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("checkpoint-"))


def assert_intact(manager: CheckpointManager, steps: list[int]) -> None:
    infos = manager.list()
    assert [info.step for info in infos] == steps
    for info in infos:
        assert find_problems(Path(info.path), info.manifest, "checksum") == []


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_mid_write_is_reported_and_loses_nothing(small_disk: Any, async_save: bool) -> None:
    disk = small_disk("3m")
    manager = CheckpointManager(CheckpointArguments(output_dir=str(disk), async_save=async_save))
    manager.save(1, {"model": model_of_megabytes(1.0)})
    manager.wait()
    big = model_of_megabytes(2.5)  # does not fit next to checkpoint-1
    if async_save:
        manager.save(2, {"model": big})  # returns after the host copy; the write fails in the background
        with pytest.raises(CheckpointWriteError) as info:
            manager.save(3, {"model": big})  # ...and surfaces at the next save
    else:
        with pytest.raises(CheckpointWriteError) as info:
            manager.save(2, {"model": big})
    message = str(info.value)
    assert "No space left on device" in message and str(disk) in message
    assert "Earlier checkpoints are untouched" in message
    assert visible_checkpoints(disk) == ["checkpoint-1"]
    assert not [name for name in os.listdir(disk) if name.startswith(".staging")]  # the partial write is removed
    assert_intact(manager, [1])


def test_async_failure_also_surfaces_at_wait_and_close(small_disk: Any) -> None:
    disk = small_disk("2m")
    manager = CheckpointManager(CheckpointArguments(output_dir=str(disk)))
    manager.save(1, {"model": model_of_megabytes(3.0)})
    with pytest.raises(CheckpointWriteError, match="No space left"):
        manager.wait()
    manager.save(2, {"model": model_of_megabytes(3.0)})
    with pytest.raises(CheckpointWriteError, match="No space left"):
        manager.close()
    assert visible_checkpoints(disk) == []


def test_free_space_is_checked_before_writing(small_disk: Any) -> None:
    disk = small_disk("3m")
    manager = CheckpointManager(CheckpointArguments(output_dir=str(disk), async_save=False))
    model = model_of_megabytes(1.6)
    manager.save(1, {"model": model})
    with pytest.raises(CheckpointWriteError, match=r"Not enough free space .* \(the size of the last one\)"):
        manager.save(2, {"model": model})
    assert visible_checkpoints(disk) == ["checkpoint-1"]
    assert_intact(manager, [1])


def test_warn_policy_keeps_training_and_logs(small_disk: Any, caplog: pytest.LogCaptureFixture) -> None:
    disk = small_disk("2m")
    manager = CheckpointManager(CheckpointArguments(output_dir=str(disk), on_save_error="warn"))
    with caplog.at_level(logging.ERROR, logger="ckpt_callbacks"):
        manager.save(1, {"model": model_of_megabytes(3.0)})
        manager.save(2, {"model": torch.nn.Linear(2, 2)})  # the earlier failure is logged, this one succeeds
        manager.wait()
    assert "training goes on" in caplog.text and "No space left on device" in caplog.text
    assert visible_checkpoints(disk) == ["checkpoint-2"]


def test_read_only_disk_gives_a_clear_error_and_keeps_old_checkpoints(small_disk: Any) -> None:
    disk = small_disk("4m")
    writer = CheckpointManager(CheckpointArguments(output_dir=str(disk), async_save=False))
    writer.save(1, {"model": torch.nn.Linear(3, 3)})
    writer.close()
    remount_read_only(disk)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(disk), async_save=False))
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(2, {"model": torch.nn.Linear(3, 3)})
    assert "Read-only file system" in str(info.value) and str(disk) in str(info.value)
    assert_intact(manager, [1])


class FaultyStore(LocalStore):
    """A real local store whose chosen stage fails with a chosen errno (a disk that errors on demand)."""

    def __init__(self, root: Path, stage: str, error: int) -> None:
        super().__init__(root)
        self.stage, self.error = stage, error

    def _maybe_fail(self, stage: str, path: Path) -> None:
        if stage == self.stage:
            raise OSError(self.error, os.strerror(self.error), str(path))

    def new_staging_dir(self, step: int) -> Path:
        self._maybe_fail("create", self.path)
        return super().new_staging_dir(step)

    def publish(self, staging_dir: Path, name: str) -> None:
        if self.stage == "publish":
            from ckpt_callbacks.core.storage.errors import write_error

            raise write_error(OSError(self.error, os.strerror(self.error)), self.path / name, "commit the checkpoint")
        super().publish(staging_dir, name)

    def delete(self, name: str) -> None:
        self._maybe_fail("delete", self.path / name)
        super().delete(name)


class FailingWriteEngine(SafetensorsEngine):
    name = "failing-write-test"
    error = errno.EIO

    def save(self, state: Any, relpath: str) -> None:
        path = self.directory / f"{relpath}.safetensors"
        path.write_bytes(b"partial")
        raise OSError(self.error, os.strerror(self.error), str(path))


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EIO, errno.EACCES])
@pytest.mark.parametrize("stage", ["create", "write", "publish"])
@pytest.mark.parametrize("async_save", [False, True])
def test_every_write_stage_failure_reaches_the_user_and_loses_nothing(
    tmp_path: Path, stage: str, error: int, async_save: bool
) -> None:
    good = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False))
    good.save(1, {"model": torch.nn.Linear(3, 3)})
    good.close()
    FailingWriteEngine.error = error
    manager = CheckpointManager(
        CheckpointArguments(output_dir=str(tmp_path), async_save=async_save, save_total_limit=1),
        store=FaultyStore(tmp_path, stage, error),
        engine=FailingWriteEngine if stage == "write" else "safetensors",
    )
    with pytest.raises(CheckpointWriteError) as info:
        manager.save(2, {"model": torch.nn.Linear(3, 3)})
        manager.wait()
    assert os.strerror(error) in str(info.value)
    assert str(tmp_path) in str(info.value)
    assert visible_checkpoints(tmp_path) == ["checkpoint-1"]  # retention did not run: nothing committed
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".staging")]
    assert_intact(manager, [1])


def test_failing_retention_keeps_the_new_checkpoint_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False, save_total_limit=1),
                                store=FaultyStore(tmp_path, "delete", errno.EIO))
    manager.save(1, {"model": torch.nn.Linear(3, 3)})
    manager.save(2, {"model": torch.nn.Linear(3, 3)})
    assert visible_checkpoints(tmp_path) == ["checkpoint-1", "checkpoint-2"]
    assert "Could not delete checkpoint-1" in caplog.text
