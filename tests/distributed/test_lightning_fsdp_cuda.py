"""Lightning `FSDPStrategy` (FSDP1), sharded and full state dicts, checkpointed through the core.

Lightning runs FSDPStrategy on CUDA only (`accelerator='cpu'` is refused: "The strategy `fsdp` requires a GPU
accelerator"), so these tests skip without a GPU; on a GPU machine they run on every GPU up to 2. The same
scenarios as the CPU tests of `ModelParallelStrategy` (test_lightning_sharded.py): a SIGKILL right after a step
then an exact resume, a damaged file named before the strategy loads it, the export byte-identical to the export
of the same weights from one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from tests.lightning.helpers import tensors_equal

from .test_lightning_sharded import SHARD_SIZE, drive, folder_bytes, result, statuses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="FSDPStrategy needs CUDA: Lightning refuses accelerator='cpu' for FSDP")

WORLD = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 1
FINAL_STEP = 20 // WORLD  # 2 epochs of 40 samples in batches of 4, split over the ranks
FLAGS = {"save_steps": 2}


@pytest.fixture(scope="module", params=["sharded", "full"])
def fsdp_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    state_dict_type = str(request.param)
    root = tmp_path_factory.mktemp(f"fsdp-{state_dict_type}")
    common: dict[str, Any] = {"world_size": WORLD, "strategy": "fsdp", "state_dict_type": state_dict_type,
                              "accelerator": "cuda", "flags": FLAGS}
    damaged = root / "damaged" / f"checkpoint-{FINAL_STEP}" / "checkpoint.ckpt"
    drive(root, [
        {**common, "name": "reference", "output_dir": str(root / "reference"),
         "flags": {**FLAGS, "async_save": False, "export_at_end": True, "max_shard_size": SHARD_SIZE}},
        {**common, "name": "killed", "output_dir": str(root / "run"), "kill_at_step": 7},
        {**common, "name": "resumed", "output_dir": str(root / "run"), "ckpt_path": "last", "seed": 12345},
        {**common, "name": "damaged", "output_dir": str(root / "damaged"), "ckpt_path": "last",
         "copy": [str(root / "reference"), str(root / "damaged")],
         "flip": str(damaged / "__0_0.distcp" if state_dict_type == "sharded" else damaged)},
    ])
    return root, state_dict_type


def test_fsdp_checkpoints_are_committed_by_the_core(fsdp_runs: tuple[Path, str]) -> None:
    root, state_dict_type = fsdp_runs
    info = read_checkpoint_info(root / "reference" / f"checkpoint-{FINAL_STEP}")
    assert info.manifest.world_size == (WORLD if state_dict_type == "sharded" else 1)
    assert info.engine == ("dcp" if state_dict_type == "sharded" else "torch")
    names = {entry.path for entry in info.manifest.files}
    expected = {f"checkpoint.ckpt/__{rank}_0.distcp" for rank in range(WORLD)} | {"checkpoint.ckpt/.metadata"}
    assert expected <= names if state_dict_type == "sharded" else names == {"checkpoint.ckpt"}


def test_fsdp_sigkill_then_resume_is_bitwise_exact(fsdp_runs: tuple[Path, str]) -> None:
    root, _ = fsdp_runs
    assert statuses(root, "killed") == [-9] * WORLD and statuses(root, "resumed") == [0] * WORLD
    for rank in range(WORLD):
        reference, resumed = result(root, "reference", rank), result(root, "resumed", rank)
        assert resumed["resumed_from"] in (4, 6) and resumed["global_step"] == FINAL_STEP
        assert tensors_equal(resumed["local"], reference["local"]), f"rank {rank}: weights/optimizer/scheduler differ"
        assert tensors_equal(resumed["rng"], reference["rng"]), f"rank {rank}: RNG stream did not continue"


def test_fsdp_damaged_file_is_named_before_the_strategy_loads_it(fsdp_runs: tuple[Path, str]) -> None:
    root, state_dict_type = fsdp_runs
    assert statuses(root, "damaged") == [1] * WORLD
    damaged = "checkpoint.ckpt/__0_0.distcp" if state_dict_type == "sharded" else "checkpoint.ckpt"
    for rank in range(WORLD):
        assert f"checkpoint-{FINAL_STEP}/{damaged}: checksum mismatch" in result(root, "damaged", rank)["error"]


def test_fsdp_export_is_the_export_of_the_same_weights_from_one_process(fsdp_runs: tuple[Path, str],
                                                                         tmp_path: Path) -> None:
    from ckpt_callbacks.core.export import export_safetensors
    from tests.lightning.helpers import tiny_module_class

    root, _ = fsdp_runs
    full = result(root, "reference", 0)["full"]
    one_process = tiny_module_class("lightning.pytorch")()
    one_process.load_state_dict({k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")})
    export_safetensors(one_process.state_dict(), tmp_path / "single", max_shard_size=SHARD_SIZE)
    assert folder_bytes(root / "reference" / "export") == folder_bytes(tmp_path / "single")
