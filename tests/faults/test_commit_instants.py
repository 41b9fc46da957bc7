"""A kill before each file-system operation of a commit, enumerated instead of sampled.

The random kills of `test_kill_anywhere.py` rarely land between two renames a microsecond apart. Here the
run folder is copied just before every rename, fsync and deletion of a save (what a SIGKILL at that instant
leaves on disk), and each copy is checked the way the next start sees it: readers see the previous set of
checkpoints or the new one (with retention: the new one added, then the oldest removed), every visible
checkpoint verifies, and the next writer cleans what is left.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.storage import durable as durable_module
from ckpt_callbacks.core.storage import store as store_module

STORE_OPERATIONS = ("fsync_tree", "fsync_dir", "replace_folder", "delete_tree")


def snapshot_before_every_operation(monkeypatch: pytest.MonkeyPatch, run_dir: Path, snapshots: Path) -> list[Path]:
    """Copy `run_dir` before each rename (anywhere) and each durable operation of the store."""
    taken: list[Path] = []

    def snapshot() -> None:
        target = snapshots / str(len(taken))
        shutil.copytree(run_dir, target, symlinks=True)
        taken.append(target)

    def before(operation: Callable[..., Any]) -> Callable[..., Any]:
        def instrumented(*args: Any, **kwargs: Any) -> Any:
            snapshot()
            return operation(*args, **kwargs)

        return instrumented

    monkeypatch.setattr(os, "replace", before(os.replace))
    for name in STORE_OPERATIONS:
        monkeypatch.setattr(store_module, name, before(getattr(store_module, name)))
    return taken


def value_of(manager: CheckpointManager, step: int) -> float:
    meta = manager.load(step, {"extra": None})
    return float(meta["state"]["extra"]["v"][0])


def visible_after_a_kill(folder: Path) -> dict[int, float]:
    """What readers and the next writer see in `folder`: each checkpoint verifies; {step: saved value}."""
    for name in os.listdir(folder):
        if layout.parse_checkpoint_step(name) is not None:
            assert (folder / name / layout.MANIFEST_NAME).is_file(), f"{name} visible without a manifest"
    reader = CheckpointManager(CheckpointArguments(output_dir=str(folder), async_save=False))
    for info in reader.list():
        assert find_problems(Path(info.path), info.manifest, "checksum") == [], info.name
    seen = {info.step: value_of(reader, info.step) for info in reader.list()}
    reader.save(100, {"extra": {"v": torch.zeros(1)}})  # the next start: cleans leftovers, keeps the rest
    reader.close()
    assert [name for name in os.listdir(folder) if layout.is_leftover(name)] == []
    assert {info.step: value_of(reader, info.step) for info in reader.list() if info.step != 100} == seen
    return seen


def save_value(manager: CheckpointManager, step: int, value: float) -> None:
    manager.save(step, {"extra": {"v": torch.full((1,), value)}})


@pytest.mark.parametrize("scenario", ["new_step_with_rotation", "resave_of_a_step"])
def test_a_kill_before_any_operation_of_a_commit_leaves_the_old_or_the_new_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str,
) -> None:
    run_dir = tmp_path / "run"
    manager = CheckpointManager(CheckpointArguments(output_dir=str(run_dir), async_save=False, save_total_limit=2))
    save_value(manager, 1, 1.0)
    save_value(manager, 2, 2.0)
    snapshots = snapshot_before_every_operation(monkeypatch, run_dir, tmp_path / "snapshots")
    if scenario == "new_step_with_rotation":
        save_value(manager, 3, 3.0)
        allowed = [{1: 1.0, 2: 2.0}, {1: 1.0, 2: 2.0, 3: 3.0}, {2: 2.0, 3: 3.0}]
    else:  # e.g. a run restarted in its old output_dir saves step 2 again
        save_value(manager, 2, 20.0)
        allowed = [{1: 1.0, 2: 2.0}, {1: 1.0, 2: 20.0}]
    manager.close()
    monkeypatch.undo()
    assert len(snapshots) >= 4, "the commit was not instrumented"
    final = tmp_path / "final"
    shutil.copytree(run_dir, final)
    for folder in snapshots:
        seen = visible_after_a_kill(folder)
        assert seen in allowed, f"a kill before operation {folder.name} of the commit leaves {seen}"
    assert visible_after_a_kill(final) == allowed[-1]


def test_resave_where_names_cannot_be_exchanged_still_replaces_the_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(durable_module, "exchange_paths", lambda a, b: False)  # e.g. NFS: two renames instead
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False))
    save_value(manager, 2, 2.0)
    save_value(manager, 2, 20.0)
    assert value_of(manager, 2) == 20.0
    assert sorted(name for name in os.listdir(tmp_path) if not name.startswith(".ckpt")) == ["checkpoint-2"]


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("engine", ["safetensors", "hf"])
def test_every_file_and_folder_is_fsynced_before_the_rename_that_publishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, engine: str, async_save: bool,
) -> None:
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_replace(src: Any, dst: Any) -> None:
        events.append(("rename", f"{os.fspath(src)} -> {os.fspath(dst)}"))
        replace(src, dst)

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the file behind a descriptor")
    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    model = torch.nn.Linear(4, 4)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=async_save), engine=engine)
    manager.save(7, {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1)})
    manager.wait()
    manager.close()
    monkeypatch.undo()

    final = tmp_path / "checkpoint-7"
    publish = next(i for i, (kind, what) in enumerate(events) if kind == "rename" and what.endswith(f"-> {final}"))
    staging = Path(events[publish][1].split(" -> ")[0])
    synced_before = {what for kind, what in events[:publish] if kind == "fsync"}
    written = list(final.rglob("*"))
    assert len(written) >= 3, "the model, the optimizer and the manifest at least"
    for path in written:
        assert str(staging / path.relative_to(final)) in synced_before, f"{path.name} not fsynced before publishing"
    assert str(staging) in synced_before, "the folder's entries were not fsynced before publishing"
    assert ("fsync", str(tmp_path)) in events[publish + 1:], "the rename itself was not made durable"
