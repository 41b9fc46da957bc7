"""`transformers.Trainer` with FSDP (accelerate's FSDP2 and FSDP1, SHARDED_STATE_DICT and FULL_STATE_DICT) and
DeepSpeed ZeRO-1/2/3, with the callback: checkpoints in the stock layout, written by the stock saver into the core's
staging folder and committed with a manifest of every rank's files; the same folders, best and retention as the
stock Trainer; the stock resume bitwise exact; `load_best_model_at_end` from either flag; `save_only_model` as
stock; and a reshard 2 -> 1 where the stock loader allows it (FSDP).

FSDP and DeepSpeed need CUDA (on CPU accelerate turns FSDP off by itself): those cases skip without a GPU, ZeRO ones
also without the deepspeed package, the reshard without 2 GPUs. The `ddp` case runs the same script and checks on
2 CPU processes (the stock saver forced): it proves the harness and the stock-saver end of training (best loaded
by the stock loader, the export gathered on every rank) where there is no GPU. scripts/gpu_checks.sh runs this
file on a GPU machine. Each case is one torchrun launch (tests/hf/sharded_train.py) of all its runs.
"""

from __future__ import annotations

import importlib.util
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

from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from tests.conftest import assert_same_tensors

REPO = Path(__file__).resolve().parents[2]
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
NEEDS_GPU = pytest.mark.skipif(GPUS == 0, reason="FSDP and DeepSpeed need CUDA (accelerate turns FSDP off on CPU): "
                                                 "GPU only, not run here; scripts/gpu_checks.sh runs it")
NEEDS_DEEPSPEED = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="the deepspeed package is not installed")
NEEDS_TWO_GPUS = pytest.mark.skipif(GPUS < 2, reason="a reshard 2 -> 1 needs 2 GPUs (GPU only: not run here)")
STRATEGIES = [
    pytest.param("fsdp2-sharded", marks=NEEDS_GPU),
    pytest.param("fsdp2-full", marks=NEEDS_GPU),
    pytest.param("fsdp1-sharded", marks=NEEDS_GPU),
    pytest.param("fsdp1-full", marks=NEEDS_GPU),
    pytest.param("zero1", marks=[NEEDS_GPU, NEEDS_DEEPSPEED]),
    pytest.param("zero2", marks=[NEEDS_GPU, NEEDS_DEEPSPEED]),
    pytest.param("zero3", marks=[NEEDS_GPU, NEEDS_DEEPSPEED]),
    "ddp",
]
RESHARDABLE = ("fsdp2-sharded", "fsdp2-full", "fsdp1-sharded", "fsdp1-full")  # DCP / full files; ZeRO: no
SAVE_ONLY_MODEL_REFUSED = ("fsdp2-sharded", "fsdp1-sharded")


def processes(strategy: str) -> int:
    return 2 if strategy == "ddp" else min(2, GPUS)


def launch(root: Path, strategy: str, nproc: int, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "tests.hf.sharded_train", str(root), strategy, *extra]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]


@pytest.fixture(scope="module", params=STRATEGIES)
def launched(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    strategy = str(request.param)
    root = tmp_path_factory.mktemp(strategy)
    launch(root, strategy, processes(strategy))
    return strategy, root


def result(root: Path, name: str) -> dict[str, Any]:
    return torch.load(root / f"{name}.pt", weights_only=False)  # type: ignore[no-any-return]


def files_under(folder: Path) -> set[str]:
    return {(Path(dirpath) / name).relative_to(folder).as_posix()
            for dirpath, _, names in os.walk(folder) for name in names}


def steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("checkpoint-*"))


def no_leftovers(folder: Path) -> bool:
    return not [name for name in os.listdir(folder) if name.startswith((".staging", ".trash"))]


def test_checkpoints_are_the_stock_ones_sealed_with_every_ranks_files(launched: tuple[str, Path]) -> None:
    strategy, root = launched
    world_size = processes(strategy)
    ours, stock = root / "ref", root / "stock"
    assert steps(ours) == steps(stock) == [9, 10]  # save_total_limit=2: the best (9) and the newest
    assert no_leftovers(ours)
    assert get_last_checkpoint(str(ours)) == str(ours / "checkpoint-10")
    for step in (9, 10):
        folder = ours / f"checkpoint-{step}"
        files = files_under(folder)
        # The stock file set (DCP shards, DeepSpeed's global_step folder, consolidated files), plus the manifest.
        assert files == files_under(stock / f"checkpoint-{step}") | {"manifest.json"}
        info = read_checkpoint_info(folder)
        assert {entry.path for entry in info.manifest.files} == files - {"manifest.json"}
        assert find_problems(folder, info.manifest, "checksum") == []
        assert info.manifest.world_size == world_size
        rng_files = {"rng_state.pth"} if world_size == 1 else {f"rng_state_{rank}.pth" for rank in range(world_size)}
        assert rng_files <= files
        assert {"trainer_state.json", "training_args.bin", "config.json"} <= files
    checkpoint = files_under(ours / "checkpoint-10")
    if strategy.endswith("-sharded"):
        assert any(name.endswith("/.metadata") for name in checkpoint)  # the DCP folders of model and optimizer
    elif strategy.startswith("zero"):
        assert "latest" in checkpoint and any(name.startswith("global_step10/") for name in checkpoint)
    else:
        assert "model.safetensors" in checkpoint


def test_an_interrupted_run_resumes_bitwise_exact_through_the_stock_loader(launched: tuple[str, Path]) -> None:
    _, root = launched
    reference, crashed, resumed = result(root, "ref"), result(root, "run-crash"), result(root, "run-resumed")
    assert sorted(crashed["saved"]) == [3, 6]
    assert sorted(resumed["saved"]) == [9, 10]  # resumed from checkpoint-6, the newest at the crash
    for step in (9, 10):
        assert_same_tensors(resumed["saved"][step], reference["saved"][step])
    assert_same_tensors(resumed["final"], reference["final"])
    assert resumed["losses"] == reference["losses"]
    assert steps(root / "run") == [9, 10]


def test_best_and_load_best_model_at_end_are_the_stock_trainers(launched: tuple[str, Path]) -> None:
    _, root = launched
    reference, stock = result(root, "ref"), result(root, "stock")
    assert reference["best_model_checkpoint"] == str(root / "ref" / "checkpoint-9")  # the real folder
    assert stock["best_model_checkpoint"] == str(root / "stock" / "checkpoint-9")
    assert read_checkpoint_info(root / "ref" / "checkpoint-9").metrics["eval_score"] == 1.0
    # TrainingArguments(load_best_model_at_end=True): the stock loader read our committed checkpoint-9.
    assert_same_tensors(reference["final"], reference["saved"][9])
    assert not all(torch.equal(reference["final"][k], v) for k, v in reference["saved"][10].items())
    assert_same_tensors(stock["final"], reference["final"])


def test_load_best_given_to_the_callback_alone_and_the_export(launched: tuple[str, Path]) -> None:
    _, root = launched
    run = result(root, "cbbest")
    assert sorted(run["saved"]) == [3, 6]
    assert_same_tensors(run["final"], run["saved"][3])  # the best, loaded by the stock loader at the end
    exported = load_file(root / "cbbest" / "export" / "model.safetensors")
    assert "transformer.wte.weight" in exported
    for name, tensor in exported.items():  # whole tensors, gathered on every rank, written once
        assert torch.equal(tensor, run["saved"][3][name]), name


def test_save_only_model_writes_what_the_stock_trainer_writes(launched: tuple[str, Path]) -> None:
    strategy, root = launched
    if strategy in SAVE_ONLY_MODEL_REFUSED:
        pytest.skip("the stock Trainer refuses save_only_model with FSDP's SHARDED_STATE_DICT (so does the callback)")
    ours, stock = files_under(root / "only" / "checkpoint-3"), files_under(root / "only-stock" / "checkpoint-3")
    assert ours == stock | {"manifest.json"}
    assert not [name for name in ours if "optim" in name or name.startswith(("global_step", "rng_state"))]


def test_what_cannot_be_served_is_refused_at_attach_naming_it(launched: tuple[str, Path]) -> None:
    strategy, root = launched
    if strategy == "ddp":
        pytest.skip("a plain DDP Trainer has no sharded combination to refuse")
    refused = result(root, "refusals")
    name = {"zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3"}.get(strategy)
    assert "stock_saver=False cannot save " + (name or "FSDP") in refused["stock_saver=False"]
    if strategy.endswith("-sharded"):
        assert refused["save_only_model"] == (
            "save_only_model option is not compatible with FSDP state dict type 'SHARDED_STATE_DICT'")
    if strategy == "zero3":
        assert "stage3_gather_16bit_weights_on_model_save" in refused["export without gather"]
        assert "CheckpointCallback with DeepSpeed ZeRO-3 and export_at_end=True" in refused["export without gather"]


@pytest.mark.parametrize("strategy", [pytest.param(s, marks=[NEEDS_GPU, NEEDS_TWO_GPUS]) for s in RESHARDABLE])
def test_a_checkpoint_of_two_ranks_resumes_on_one(tmp_path: Path, strategy: str) -> None:
    launch(tmp_path, strategy, 2)
    shutil.copytree(tmp_path / "ref" / "checkpoint-9", tmp_path / "reshard" / "checkpoint-9")
    launch(tmp_path, strategy, 1, "reshard")
    resharded, reference = result(tmp_path, "reshard"), result(tmp_path, "ref")
    assert resharded["world_size"] == 1
    assert resharded["start"] is not None
    assert_same_tensors(resharded["start"], reference["saved"][9])  # what the stock loader restored at world size 1
