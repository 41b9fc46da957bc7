"""Issue 16: the CLI verifies before it exports, and an unreadable file or folder is a named error.

`ckpt-callbacks export` of a checkpoint whose checksums fail exits non-zero naming the file (this library's
checkpoints, a `.ckpt` written by the Lightning plugin, a stock Lightning `.ckpt` whose zip CRC fails),
unless `--no-verify` is given. A file or folder the command may not read gives a named error and the
documented exit code (1: "a checkpoint that cannot be read"), never a traceback, and `verify` of a run
folder reports every checkpoint, carrying on past the unreadable ones.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.lightning import CheckpointIOPlugin
from tests.safety.helpers import (
    assert_no_traceback,
    flip_byte,
    hand_over,
    make_unreadable,
    reader_uid,
    run_cli,
    run_cli_many,
    shared_scratch,
    tensor_data_offset,
    write_run,
)

MODEL_FILE = {"safetensors": "model.safetensors", "torch": "model.pt"}


def _lightning_dict() -> dict:
    torch.manual_seed(0)
    return {"state_dict": {"net.weight": torch.randn(64, 64), "net.bias": torch.randn(64)},
            "global_step": 12, "epoch": 1, "pytorch-lightning_version": "2.6.6"}


def _assert_refused_naming(result, name: str, out: Path) -> None:
    assert_no_traceback(result)
    assert result.code not in (0, None), f"exported a damaged checkpoint:\n{result.describe()}"
    assert name in result.text, f"{name} is not named:\n{result.describe()}"
    assert not out.exists() or not any(out.iterdir()), f"damaged weights were written to {out}"


@pytest.mark.parametrize("engine", list(MODEL_FILE))
def test_cli_export_of_a_checkpoint_failing_its_checksums_exits_non_zero_naming_the_file(tmp_path: Path,
                                                                                       engine: str) -> None:
    run = tmp_path / "run"
    write_run(run, engine=engine)
    damaged = run / "checkpoint-30" / MODEL_FILE[engine]
    flip_byte(damaged, tensor_data_offset(damaged))  # same size, loadable, wrong bytes
    refused, forced = run_cli_many([
        ("export", run / "checkpoint-30", tmp_path / "out"),
        ("export", run / "checkpoint-30", tmp_path / "forced", "--no-verify"),
    ])
    _assert_refused_naming(refused, MODEL_FILE[engine], tmp_path / "out")
    assert forced.code == 0, f"--no-verify must export what the file holds:\n{forced.describe()}"
    assert (tmp_path / "forced" / "model.safetensors").is_file()


@pytest.mark.parametrize("writer", ["ckpt_callbacks_plugin", "stock_lightning"])
def test_cli_export_of_a_damaged_lightning_ckpt_exits_non_zero_naming_the_file(tmp_path: Path, writer: str) -> None:
    """The plugin's `.ckpt` has a sidecar manifest (checksum); a stock one has only its zip CRCs."""
    ckpt = tmp_path / "ckpts" / "epoch=1-step=12.ckpt"
    ckpt.parent.mkdir()
    if writer == "stock_lightning":
        TorchCheckpointIO().save_checkpoint(_lightning_dict(), ckpt)
    else:
        CheckpointIOPlugin(CheckpointArguments(async_save=False)).save_checkpoint(_lightning_dict(), ckpt)
    flip_byte(ckpt, tensor_data_offset(ckpt))
    result = run_cli("export", ckpt, tmp_path / "out")
    _assert_refused_naming(result, ckpt.name, tmp_path / "out")


# ------------------------------------------------------------------------------------------- unreadable

UNREADABLE_WORDS = r"(?i)permission|not readable|unreadable|cannot read|can't read|access"


@pytest.fixture(scope="module")
def unreadable_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A run whose checkpoint-10 has an unreadable model file and whose checkpoint-20 folder is unreadable;
    checkpoint-30 is intact. Every command runs as a user the permissions apply to (nobody, under root)."""
    template = tmp_path_factory.mktemp("template") / "run"
    write_run(template)
    with shared_scratch() as scratch:
        run = scratch / "run"
        shutil.copytree(template, run)
        hand_over(scratch)
        make_unreadable(run / "checkpoint-10" / "model.safetensors")
        make_unreadable(run / "checkpoint-20")
        commands = {
            "list": ("list", run),
            "inspect_file": ("inspect", run / "checkpoint-10"),
            "inspect_folder": ("inspect", run / "checkpoint-20"),
            "verify": ("verify", run),
            "export": ("export", run / "checkpoint-10", scratch / "out"),
            "prune": ("prune", run, "--keep-last", "1", "--dry-run"),
            "diff": ("diff", run / "checkpoint-10", run / "checkpoint-30"),
        }
        results = run_cli_many(list(commands.values()), user=reader_uid(), timeout=180)
        outcome: dict[str, object] = dict(zip(commands, results, strict=True))
        outcome["run"] = str(run)
    return outcome


def _check(outcome: dict[str, object], op: str, codes: tuple[int, ...], names: tuple[str, ...]) -> None:
    result = outcome[op]
    assert_no_traceback(result)  # type: ignore[arg-type]
    assert result.code in codes, f"expected exit {codes}:\n{result.describe()}"  # type: ignore[attr-defined]
    for name in names:
        assert name in result.text, f"{name} is not named:\n{result.describe()}"  # type: ignore[attr-defined]
    assert re.search(UNREADABLE_WORDS, result.text), (  # type: ignore[attr-defined]
        f"the output does not say the file cannot be read:\n{result.describe()}")  # type: ignore[attr-defined]


def test_cli_list_with_an_unreadable_file_and_folder_names_them_without_a_traceback(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "list", (0, 1), ("checkpoint-20",))
    assert "checkpoint-30" in unreadable_outcomes["list"].out


def test_cli_inspect_of_a_checkpoint_with_an_unreadable_file_exits_1_naming_it(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "inspect_file", (1,), ("model.safetensors",))


def test_cli_inspect_of_an_unreadable_checkpoint_folder_exits_1_naming_it(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "inspect_folder", (1,), ("checkpoint-20",))


def test_cli_verify_of_a_run_reports_every_checkpoint_past_unreadable_ones(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "verify", (1,), ("checkpoint-10", "model.safetensors", "checkpoint-20"))
    verify = unreadable_outcomes["verify"]
    assert re.search(r"(?m)^ok\s+checkpoint-30\b", verify.out), f"verify stopped before checkpoint-30:\n{verify.describe()}"


def test_cli_export_of_a_checkpoint_with_an_unreadable_file_exits_1_naming_it(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "export", (1,), ("model.safetensors",))


def test_cli_prune_with_an_unreadable_folder_names_it_without_a_traceback(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "prune", (0, 1), ("checkpoint-20",))


def test_cli_diff_with_an_unreadable_file_exits_1_naming_it(unreadable_outcomes) -> None:
    _check(unreadable_outcomes, "diff", (1,), ("model.safetensors",))
