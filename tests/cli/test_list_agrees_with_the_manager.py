"""`ckpt-callbacks list` and `CheckpointManager.list()`/`best()` agree on every run folder (issue 13).

Run folders with damage of every kind, leftovers of interrupted writers, foreign checkpoints beside this
library's: the command lists exactly the manager's committed checkpoints (plus the foreign ones, marked by
format), marks the manager's best and the newest as latest, and reports the rest apart, truthfully.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format import layout

from .conftest import ManagerRuns, run_cli


def _damage(run: Path, how: str) -> None:
    if how == "intact":
        return
    if how == "missing_file":
        (run / "checkpoint-20" / "model.safetensors").unlink()
    elif how == "resized_file":
        with open(run / "checkpoint-30" / "optimizer.safetensors", "ab") as f:
            f.write(b"x")
    elif how == "manifest_not_json":
        (run / "checkpoint-20" / "manifest.json").write_text("{")
    elif how == "manifest_is_a_folder":
        (run / "checkpoint-30" / "manifest.json").unlink()
        (run / "checkpoint-30" / "manifest.json").mkdir()
    elif how == "manifest_of_another_step":
        shutil.copy(run / "checkpoint-10" / "manifest.json", run / "checkpoint-20" / "manifest.json")
    elif how == "no_manifest":
        (run / "checkpoint-30" / "manifest.json").unlink()
    elif how == "leftovers_and_a_stock_checkpoint":
        (run / ".staging-checkpoint-40-host-1-0badc0de").mkdir()
        (run / ".trash-checkpoint-5-host-1-0badc0de").mkdir()
        stock = run / "checkpoint-50"
        stock.mkdir()
        (stock / "trainer_state.json").write_text('{"global_step": 50, "log_history": [{"step": 50, "eval_loss": 0.1}]}')
        shutil.copy(run / "checkpoint-10" / "model.safetensors", stock / "model.safetensors")


CASES = ["intact", "missing_file", "resized_file", "manifest_not_json", "manifest_is_a_folder",
         "manifest_of_another_step", "no_manifest", "leftovers_and_a_stock_checkpoint"]


@pytest.mark.parametrize("how", CASES)
def test_list_shows_the_managers_checkpoints_best_and_latest(manager_runs: ManagerRuns,
                                                              copy_of: Callable[[Path], Path], how: str) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    _damage(run, how)
    manager = CheckpointManager(CheckpointArguments(output_dir=str(run), metric_for_best_model="eval_loss"))
    committed = [info.name for info in manager.list()]
    best = manager.best()

    data = run_cli("list", run, "--json").json()
    ours = [c for c in data["checkpoints"] if c["format"].startswith("ckpt_callbacks/")]
    assert [c["name"] for c in ours] == committed
    assert [c["name"] for c in data["checkpoints"] if c["best"]] == ([best.name] if best else [])
    newest = max(data["checkpoints"], key=lambda c: c["step"])
    assert [c["name"] for c in data["checkpoints"] if c["latest"]] == [newest["name"]]
    listed_or_reported = {c["name"] for c in data["checkpoints"]} | {d["name"] for d in data["damaged"]}
    listed_or_reported |= {entry["name"] for entry in data["leftovers"]}
    on_disk = {p.name for p in run.iterdir()}
    assert on_disk == listed_or_reported, "an entry of the run folder is neither listed nor reported"
    for damaged in data["damaged"]:
        assert damaged["name"] not in committed and damaged["error"]


def test_damaged_checkpoints_are_reported_apart_with_what_is_wrong(manager_runs: ManagerRuns,
                                                                    copy_of: Callable[[Path], Path]) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    (run / "checkpoint-10" / "manifest.json").write_text("[" * 100_000)
    (run / "checkpoint-20" / "model.safetensors").unlink()
    result = run_cli("list", run)
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].endswith(": 1 checkpoint(s)")
    assert "2 damaged checkpoint(s), not listed above: never resumed from, never deleted by retention" in lines
    assert any(line.startswith("checkpoint-10") and line.endswith("DAMAGED (run verify)") for line in lines)
    assert any(line.startswith("damaged: checkpoint-10: ") and "nested too deep" in line for line in lines)
    assert any(line.startswith("incomplete: checkpoint-20: checkpoint-20/model.safetensors: missing") for line in lines)


def test_leftovers_are_reported_with_who_removes_them(manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    trash = ".trash-checkpoint-5-host-1-0badc0de"
    (run / trash).mkdir()
    dead_writer = layout.staging_name_for("last.ckpt").replace(f"-{os.getpid()}-", "-999999-")  # a pid nobody has
    (run / dead_writer).write_bytes(b"half a file")
    (run / "checkpoint-40").mkdir()  # no manifest, not the stock Trainer's
    result = run_cli("list", run)
    assert f"leftover: {trash} (a deleted checkpoint whose files could not all be removed; the next run retries)" \
        in result.out
    assert f"uncommitted: {dead_writer} (an interrupted single-file save (its process is gone)" in result.out
    assert "uncommitted: checkpoint-40 (no manifest.json and not a stock Trainer checkpoint" in result.out
    verify = run_cli("verify", run)
    assert verify.code == 0, verify.out
    assert verify.out.splitlines()[-1] == "3 checkpoint(s) checked: 3 ok, 0 failed; 4 uncommitted leftover(s), not failures"

    with CheckpointManager(CheckpointArguments(output_dir=str(run), async_save=False)) as manager:
        manager.save(50, {"model": torch.nn.Linear(2, 2)})  # "removed by the next save in this folder"
    assert not (run / ".staging-checkpoint-40-0badc0de").exists() and not (run / trash).exists()
    assert not (run / dead_writer).exists()
