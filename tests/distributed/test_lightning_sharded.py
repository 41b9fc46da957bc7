"""Lightning `ModelParallelStrategy` with FSDP2 on 2 CPU processes (gloo), checkpointed through the core.

Real Trainer runs, forked by `lightning_sharded_runs.py` (Lightning imported once): every rank writes its shard of
Lightning's own sharded layout into the staging folder and the core commits it collectively (a manifest of every
shard with checksums, atomic publish, retention); `fit(ckpt_path=...)` verifies every shard before Lightning loads
it. What each test proves is in its name.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from tests.lightning.helpers import tensors_equal

REPO = Path(__file__).resolve().parents[2]
RANKS = (0, 1)
SHARD_SIZE = "300"  # bytes: several export shards and an index even for this tiny model
FLAGS = {"save_steps": 2, "save_total_limit": 3}
FINAL_STEP = 10  # 2 epochs of 5 optimizer steps per rank


def drive(root: Path, orders: list[dict[str, Any]]) -> None:
    """Run `orders` (see `lightning_sharded_runs.py`) in one driver process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.distributed.lightning_sharded_runs", str(root), json.dumps(orders)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    (root / "driver.log").write_text(done.stderr)


def statuses(root: Path, name: str) -> list[int]:
    return list(json.loads((root / f"{name}.json").read_text())["statuses"])


def result(root: Path, name: str, rank: int) -> dict[str, Any]:
    return dict(torch.load(root / f"{name}-rank{rank}.pt", weights_only=False, map_location="cpu"))


def committed_steps(run: Path) -> list[int]:
    return sorted(step for name in os.listdir(run) if (step := layout.parse_checkpoint_step(name)) is not None)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """An uninterrupted run (synchronous saves, export at the end), a run SIGKILLed right after a random step
    (asynchronous saves) and its resume with other seeds, a resume of a copy whose newest shard file is damaged,
    and a resume of the uninterrupted run's last checkpoint on one process."""
    root = tmp_path_factory.mktemp("lightning-sharded")
    kill_at = int(os.environ.get("DEBUG_KILL_AT", 0)) or random.Random(time.time_ns()).randint(5, 9)
    export_flags = {"export_at_end": True, "max_shard_size": SHARD_SIZE}
    drive(root, [
        {"name": "reference", "world_size": 2, "output_dir": str(root / "reference"),
         "flags": {**FLAGS, **export_flags, "async_save": False}, "lightning_save": str(root / "lightning-own.ckpt")},
        {"name": "killed", "world_size": 2, "output_dir": str(root / "run"), "flags": FLAGS, "kill_at_step": kill_at,
         "inspect": True},
        {"name": "damaged", "world_size": 2, "output_dir": str(root / "damaged"), "flags": FLAGS, "ckpt_path": "last",
         "copy": [str(root / "reference"), str(root / "damaged")],
         "flip": str(root / "damaged" / f"checkpoint-{FINAL_STEP}" / "checkpoint.ckpt" / "__1_0.distcp")},
        {"name": "resumed", "world_size": 2, "output_dir": str(root / "run"), "flags": FLAGS, "ckpt_path": "last",
         "seed": 12345},
        {"name": "one-process", "world_size": 1, "output_dir": str(root / "one-process"), "flags": FLAGS,
         "ckpt_path": str(root / "reference" / f"checkpoint-{FINAL_STEP}" / "checkpoint.ckpt")},
    ])
    return root, kill_at


def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact_on_both_ranks(runs: tuple[Path, int]) -> None:
    root, kill_at = runs
    assert statuses(root, "killed") == [-9, -9], f"killed after step {kill_at}"
    assert statuses(root, "resumed") == [0, 0]
    after_kill = json.loads((root / "killed.json").read_text())["after"]
    assert after_kill["without_manifest"] == [], after_kill
    for rank in RANKS:
        reference, resumed = result(root, "reference", rank), result(root, "resumed", rank)
        # the newest checkpoint committed before the kill (the one being committed in the background is lost)
        assert resumed["resumed_from"] == after_kill["newest"], (kill_at, after_kill)
        assert after_kill["newest"] in (kill_at - kill_at % 2, kill_at - kill_at % 2 - 2), (kill_at, after_kill)
        assert resumed["global_step"] == reference["global_step"] == FINAL_STEP
        assert tensors_equal(resumed["local"], reference["local"]), f"rank {rank}: weights/optimizer/scheduler differ"
        assert tensors_equal(resumed["rng"], reference["rng"]), f"rank {rank}: RNG stream did not continue"
        done = len(resumed["seen"])  # the batches the resumed run drew: the same samples, in the same order
        assert resumed["seen"] == reference["seen"][-done:], f"rank {rank}: data order differs"
    assert not torch.equal(result(root, "reference", 0)["rng"]["cpu"], result(root, "reference", 1)["rng"]["cpu"])


def test_every_checkpoint_is_committed_with_a_manifest_of_every_shard_and_rotated(runs: tuple[Path, int]) -> None:
    root, _ = runs
    run = root / "reference"
    assert committed_steps(run) == [6, 8, 10]  # save_total_limit=3
    assert [name for name in os.listdir(run) if layout.is_leftover(name)] == []
    for step in committed_steps(run):
        checkpoint = run / layout.checkpoint_name(step)
        info = read_checkpoint_info(checkpoint)
        assert info.step == step and info.engine == "dcp" and info.manifest.world_size == 2
        assert info.manifest.states == ["checkpoint.ckpt"]
        on_disk = {p.relative_to(checkpoint).as_posix() for p in checkpoint.rglob("*")
                   if p.is_file() and p.name != layout.MANIFEST_NAME}
        assert {entry.path for entry in info.manifest.files} == on_disk == {
            "checkpoint.ckpt/.metadata", "checkpoint.ckpt/__0_0.distcp", "checkpoint.ckpt/__1_0.distcp",
            "checkpoint.ckpt/meta.pt"}
        assert find_problems(checkpoint, info.manifest, "checksum") == []
    assert "val_loss" in read_checkpoint_info(run / f"checkpoint-{FINAL_STEP}").metrics


def test_the_files_are_the_ones_lightnings_own_sharded_save_writes(runs: tuple[Path, int]) -> None:
    """Lightning's own loader reads them (the resume tests), and they hold what `trainer.save_checkpoint` writes."""
    from torch.distributed.checkpoint import FileSystemReader

    root, _ = runs
    ours, own = root / "reference" / f"checkpoint-{FINAL_STEP}" / "checkpoint.ckpt", root / "lightning-own.ckpt"
    assert sorted(os.listdir(ours)) == sorted(os.listdir(own))
    assert (FileSystemReader(str(ours)).read_metadata().state_dict_metadata.keys()
            == FileSystemReader(str(own)).read_metadata().state_dict_metadata.keys())
    assert torch.load(ours / "meta.pt", weights_only=True).keys() == torch.load(own / "meta.pt", weights_only=True).keys()


def test_a_damaged_shard_is_named_on_every_rank_and_nothing_is_loaded(runs: tuple[Path, int]) -> None:
    root, _ = runs
    assert statuses(root, "damaged") == [1, 1]
    for rank in RANKS:
        error = result(root, "damaged", rank)["error"]
        assert error.startswith("CheckpointCorruptError: ")
        assert f"checkpoint-{FINAL_STEP}/checkpoint.ckpt/__1_0.distcp: checksum mismatch" in error, error
    assert committed_steps(root / "damaged") == [6, 8, 10]  # nothing trained, nothing saved


def test_a_checkpoint_of_two_processes_resumes_on_one_with_the_same_values(runs: tuple[Path, int]) -> None:
    root, _ = runs
    assert statuses(root, "one-process") == [0]
    saved, loaded = result(root, "reference", 0)["full"], result(root, "one-process", 0)["full"]
    assert sorted(loaded) == sorted(saved) and any(key.startswith("optim.") for key in saved)
    for key in saved:  # whole weights and whole Adam moments, resharded from 2 slices into 1
        assert torch.equal(loaded[key], saved[key]), key


def test_the_export_is_byte_identical_to_the_export_of_the_same_weights_from_one_process(
    runs: tuple[Path, int], tmp_path: Path,
) -> None:
    from ckpt_callbacks.core.export import export_safetensors
    from tests.lightning.helpers import tiny_module_class

    root, _ = runs
    full = result(root, "reference", 0)["full"]
    weights = {key.removeprefix("model."): value for key, value in full.items() if key.startswith("model.")}
    assert weights["net.0.weight"].shape == (16, 8) and weights["net.3.weight"].shape == (1, 16)  # whole tensors
    one_process = tiny_module_class("lightning.pytorch")()  # the same module, unsharded, holding the same weights
    one_process.load_state_dict(weights)
    export_safetensors(one_process.state_dict(), tmp_path / "single", max_shard_size=SHARD_SIZE)
    exported = folder_bytes(root / "reference" / "export")
    assert "model.safetensors.index.json" in exported and len(exported) > 2
    assert exported == folder_bytes(tmp_path / "single")


def test_cli_verifies_inspects_and_exports_the_sharded_checkpoints(
    runs: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    from ckpt_callbacks.cli import main as cli

    root, _ = runs
    assert cli(["verify", str(root / "reference")]) == 0
    assert "3 ok, 0 failed" in capsys.readouterr().out
    assert cli(["verify", str(root / "damaged" / f"checkpoint-{FINAL_STEP}")]) == 1
    assert "checkpoint.ckpt/__1_0.distcp" in "".join(capsys.readouterr())
    assert cli(["inspect", str(root / "reference" / f"checkpoint-{FINAL_STEP}")]) == 0
    assert "net.0.weight" in capsys.readouterr().out
    out = tmp_path / "cli-export"
    assert cli(["export", str(root / "reference" / f"checkpoint-{FINAL_STEP}"), str(out),
                "--max-shard-size", SHARD_SIZE]) == 0
    assert folder_bytes(out) == folder_bytes(root / "reference" / "export")  # the last checkpoint: the final weights


# ---------------------------------------------------------------------------------------------- longer runs


@pytest.mark.slow
def test_sigkills_during_commits_leave_only_complete_checkpoints_and_the_next_run_resumes_from_the_newest(
    tmp_path: Path,
) -> None:
    """Saving every step in the background, both ranks are SIGKILLed at random instants of the training; after
    every kill each visible `checkpoint-*` has a complete manifest whose every shard verifies, the next run
    resumes from the newest of them, and the last run removes what the kills left."""
    kills = 4
    common = {"world_size": 2, "output_dir": str(tmp_path / "run"), "ckpt_path": "last", "inspect": True,
              "flags": {"save_steps": 1, "save_total_limit": 2}, "max_epochs": 1000}
    orders = [{**common, "name": f"kill{kill}", "seed": kill, "kill_after": [0.3, 1.5]}
              for kill in range(kills)]
    drive(tmp_path, [*orders, {**common, "name": "last", "seed": kills, "steps_after_last": 3}])
    newest, mid_write = 0, 0
    for kill in range(kills):
        report = json.loads((tmp_path / f"kill{kill}.json").read_text())
        assert report["statuses"] == [-9, -9], report
        assert report["start_step"] == newest, f"kill {kill}: did not resume from the newest checkpoint"
        after = report["after"]
        assert after["without_manifest"] == [], f"kill {kill}: half-visible checkpoints {after['without_manifest']}"
        assert all(problems == [] for problems in after["problems"].values()), after["problems"]
        assert after["newest"] >= newest, "a kill lost a committed checkpoint"
        newest, mid_write = after["newest"], mid_write + bool(after["leftovers"])
    assert newest > 0, "no run lived long enough to commit a checkpoint"
    assert mid_write >= 1, "no kill interrupted a commit: the test would prove nothing"
    last = json.loads((tmp_path / "last.json").read_text())
    assert last["statuses"] == [0, 0] and last["start_step"] == newest
    assert last["after"]["leftovers"] == [] and last["after"]["newest"] == newest + 3


@pytest.fixture(scope="module")
def more_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process resumed on two; full state dicts through the plugin, killed and resumed; a SIGTERM to one rank;
    ranks that disagree on a new best; the best checkpoint loaded at the end and exported."""
    root = tmp_path_factory.mktemp("lightning-sharded-more")
    full = {"distributed_checkpoint": False, "flags": FLAGS}
    best = {"save_strategy": "epoch", "metric_for_best_model": "val_loss", "save_total_limit": 1}
    drive(root, [
        {"name": "reference", "world_size": 2, "output_dir": str(root / "reference"), "flags": FLAGS},
        {"name": "one-process", "world_size": 1, "output_dir": str(root / "one-process"), "flags": FLAGS},
        {"name": "two-processes", "world_size": 2, "output_dir": str(root / "two-processes"), "flags": FLAGS,
         "ckpt_path": str(root / "one-process" / "checkpoint-20" / "checkpoint.ckpt")},  # one process: 10 steps/epoch
        {"name": "full-killed", "world_size": 2, "output_dir": str(root / "full"), "kill_at_step": 7, **full},
        {"name": "full-resumed", "world_size": 2, "output_dir": str(root / "full"), "ckpt_path": "last",
         "seed": 12345, **full},
        {"name": "full-one-process", "world_size": 1, "output_dir": str(root / "full-one-process"),
         "ckpt_path": str(root / "full" / f"checkpoint-{FINAL_STEP}" / "checkpoint.ckpt"), **full},
        {"name": "full-damaged", "world_size": 2, "output_dir": str(root / "full-damaged"), "ckpt_path": "last",
         "copy": [str(root / "full"), str(root / "full-damaged")],
         "flip": str(root / "full-damaged" / f"checkpoint-{FINAL_STEP}" / "checkpoint.ckpt"), **full},
        {"name": "preempted", "world_size": 2, "output_dir": str(root / "preempted"), "flags": {"save_steps": 100},
         "signal_at_step": [1, 3]},
        {"name": "preempted-resumed", "world_size": 2, "output_dir": str(root / "preempted"),
         "flags": {"save_steps": 100}, "ckpt_path": "last", "seed": 12345},
        {"name": "disagreeing-best", "world_size": 2, "output_dir": str(root / "disagreeing-best"), "timeout": 120,
         "flags": {"save_strategy": "best", "metric_for_best_model": "val_loss"},
         "val_losses_per_rank": [[0.5, 0.4], [0.5, 0.6]]},
        {"name": "best", "world_size": 2, "output_dir": str(root / "best"),
         "flags": {**best, "load_best_model_at_end": True, "export_at_end": True, "max_shard_size": SHARD_SIZE},
         "val_losses_per_rank": [[0.5, 0.9], [0.5, 0.9]]},
    ])
    return root


@pytest.mark.slow
def test_a_checkpoint_of_one_process_resumes_on_two_with_the_same_values(more_runs: Path) -> None:
    assert statuses(more_runs, "one-process") == [0] and statuses(more_runs, "two-processes") == [0, 0]
    saved, loaded = result(more_runs, "one-process", 0)["full"], result(more_runs, "two-processes", 0)["full"]
    assert sorted(loaded) == sorted(saved)
    for key in saved:  # whole values, resharded from 1 slice into 2 and gathered back
        assert torch.equal(loaded[key], saved[key]), key


@pytest.mark.slow
def test_full_state_dicts_go_through_the_plugin_and_resume_exactly_after_a_sigkill(more_runs: Path) -> None:
    assert statuses(more_runs, "full-killed") == [-9, -9] and statuses(more_runs, "full-resumed") == [0, 0]
    info = read_checkpoint_info(more_runs / "full" / f"checkpoint-{FINAL_STEP}")
    assert info.engine == "torch" and [entry.path for entry in info.manifest.files] == ["checkpoint.ckpt"]
    for rank in RANKS:
        reference, resumed = result(more_runs, "reference", rank), result(more_runs, "full-resumed", rank)
        assert resumed["resumed_from"] in (4, 6) and resumed["global_step"] == FINAL_STEP
        assert tensors_equal(resumed["local"], reference["local"]), f"rank {rank}: weights/optimizer/scheduler differ"
        assert tensors_equal(resumed["rng"], reference["rng"]), f"rank {rank}: RNG stream did not continue"


@pytest.mark.slow
def test_a_full_state_checkpoint_of_two_processes_resumes_on_one_with_the_same_values(more_runs: Path) -> None:
    assert statuses(more_runs, "full-one-process") == [0]
    saved, loaded = result(more_runs, "full-resumed", 0)["full"], result(more_runs, "full-one-process", 0)["full"]
    assert sorted(loaded) == sorted(saved)
    for key in saved:
        assert torch.equal(loaded[key], saved[key]), key


@pytest.mark.slow
def test_a_damaged_full_state_checkpoint_is_named_on_every_rank_before_the_strategy_loads_it(more_runs: Path) -> None:
    assert statuses(more_runs, "full-damaged") == [1, 1]
    for rank in RANKS:
        error = result(more_runs, "full-damaged", rank)["error"]
        assert f"checkpoint-{FINAL_STEP}/checkpoint.ckpt: checksum mismatch" in error, error


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_the_same_step_on_both_stops_and_resumes_exactly(more_runs: Path) -> None:
    assert statuses(more_runs, "preempted") == [0, 0]
    info = read_checkpoint_info(more_runs / "preempted" / "checkpoint-3")
    assert committed_steps(more_runs / "preempted")[0] == 3 and info.manifest.world_size == 2
    for rank in RANKS:
        stopped = result(more_runs, "preempted", rank)
        assert stopped["global_step"] == 3 and stopped["exit_code"] == 128 + 15, stopped["exit_code"]
        reference, resumed = result(more_runs, "reference", rank), result(more_runs, "preempted-resumed", rank)
        assert resumed["resumed_from"] == 3 and resumed["global_step"] == FINAL_STEP
        assert tensors_equal(resumed["local"], reference["local"]), f"rank {rank}: weights/optimizer/scheduler differ"
        assert tensors_equal(resumed["rng"], reference["rng"]), f"rank {rank}"


@pytest.mark.slow
def test_ranks_that_disagree_on_a_new_best_still_save_together(more_runs: Path) -> None:
    """Under save_strategy="best" a rank's own metrics decide; a sharded save is collective, so any rank's new
    best is a save on every rank (as ModelCheckpoint reduces its decision), never a rank left waiting."""
    assert statuses(more_runs, "disagreeing-best") == [0, 0]  # rank 0 improves at epoch 2, rank 1 does not
    assert committed_steps(more_runs / "disagreeing-best") == [5, 10]


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_loaded_at_the_end_and_exported(more_runs: Path, tmp_path: Path) -> None:
    from ckpt_callbacks.cli import main as cli

    assert statuses(more_runs, "best") == [0, 0]
    run = more_runs / "best"
    assert committed_steps(run) == [5, 10]  # save_total_limit=1 keeps the newest and the best
    out = tmp_path / "best-export"
    assert cli(["export", str(run / "checkpoint-5"), str(out), "--max-shard-size", SHARD_SIZE]) == 0
    assert folder_bytes(run / "export") == folder_bytes(out)  # the export holds the best weights, not the final ones
    final, best = result(more_runs, "best", 0)["full"], result(more_runs, "reference", 0)["full"]
    assert not torch.equal(final["model.net.0.weight"], best["model.net.0.weight"])  # loading changed the weights
