"""Issue 16, critical: the export deletes or replaces only a previous export of this library.

A folder in the way that this library did not write is refused with a clear error and left byte-identical;
paths that can never work (`export_dir` equal to, above, or inside the run's checkpoints) are refused when
the flags are validated, before any training step; a previous export of this library is replaced.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.hf import CheckpointCallback as HFCallback
from tests.hf.conftest import make_trainer
from tests.lightning.helpers import namespace, seed_everything, train_loader
from tests.safety.helpers import (
    assert_no_traceback,
    run_cli,
    run_cli_many,
    tiny_model,
    tree_digest,
    write_run,
)

USER_FILE = "other-model.safetensors"
USER_BYTES = b"the user's own weights, not written by ckpt_callbacks\n" * 64


def user_folder(folder: Path) -> dict[str, str]:
    """A folder holding a user's file (and a subfolder), as it was before the run; returns its digest."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / USER_FILE).write_bytes(USER_BYTES)
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "README.txt").write_text("keep me\n")
    return tree_digest(folder)


def assert_told_about(folder: Path, raised: BaseException | None, records: list[logging.LogRecord]) -> None:
    """The user learns that the export was refused, with the folder named: an exception or an error log."""
    said = [str(raised)] if raised is not None else []
    said += [r.getMessage() for r in records if r.levelno >= logging.WARNING and r.name.startswith("ckpt_callbacks")]
    assert any(str(folder) in text or folder.name in text for text in said), (
        f"the export into {folder} (which holds a user's files) was neither refused with an error nor reported "
        f"in a warning; raised={raised!r}, warnings={said}"
    )


class StepCounter(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps += 1


def hf_run(output_dir: Path, **flags: Any) -> tuple[Any, BaseException | None]:
    """A 2-step Trainer run with the HF callback; returns the trainer and what `train()` raised, if anything."""
    trainer = None
    try:  # the refusal may come when the callback attaches, or at the end, when the export runs
        trainer = make_trainer(output_dir, [HFCallback(async_save=False, **flags)], max_steps=2, save_steps=2)
        trainer.train()
    except Exception as exc:
        return trainer, exc
    return trainer, None


def exported_weights(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}


def assert_export_holds(folder: Path, model: torch.nn.Module) -> None:
    exported = exported_weights(folder)
    live = model.state_dict()
    assert exported, f"{folder} holds no exported weights"
    for name, tensor in exported.items():
        assert torch.equal(tensor, live[name].detach().cpu()), f"{folder}: {name} is not the final model's"


# -------------------------------------------------------------------- flag validation (CheckpointArguments)


def _bad_export_dirs(run: Path) -> dict[str, Path]:
    link = run.parent / "link-to-run"
    return {
        "equal_to_output_dir": run,
        "equal_spelled_with_dotdot_and_slash": Path(f"{run}/../{run.name}/"),
        "symlink_to_output_dir": link,
        "parent_of_output_dir": run.parent,
        "grandparent_of_output_dir": run.parent.parent,
        "a_checkpoint_of_the_run": run / "checkpoint-5",
        "inside_a_checkpoint_of_the_run": run / "checkpoint-5" / "export",
    }


@pytest.mark.parametrize("case", list(_bad_export_dirs(Path("/x/run"))))
def test_export_dir_that_can_never_work_is_refused_by_checkpoint_arguments(tmp_path: Path, case: str) -> None:
    run = tmp_path / "work" / "run"
    run.mkdir(parents=True)
    (tmp_path / "work" / "link-to-run").symlink_to(run, target_is_directory=True)
    export_dir = _bad_export_dirs(run)[case]
    with pytest.raises(ValueError) as info:
        CheckpointArguments(output_dir=str(run), export_dir=str(export_dir))
    message = str(info.value)
    assert "export_dir" in message and "output_dir" in message, message


@pytest.mark.parametrize("case", ["default_export_subfolder", "sibling_folder"])
def test_export_dir_beside_or_under_the_run_is_accepted(tmp_path: Path, case: str) -> None:
    run = tmp_path / "run"
    export_dir = run / "export" if case == "default_export_subfolder" else tmp_path / "exported-model"
    args = CheckpointArguments(output_dir=str(run), export_dir=str(export_dir))
    assert args.export_dir == str(export_dir)


# ------------------------------------------------------------------------------------- HF adapter


@pytest.mark.parametrize("where", ["output_dir", "parent_of_output_dir"])
def test_hf_export_dir_equal_to_or_above_output_dir_is_refused_before_training(tmp_path: Path, where: str) -> None:
    """`output_dir` comes from TrainingArguments here, so the check belongs to attaching the callback."""
    run = tmp_path / "project" / "run"
    parent_digest = user_folder(tmp_path / "project")
    export_dir = run if where == "output_dir" else run.parent
    counter = StepCounter()
    with pytest.raises(ValueError) as info:
        trainer = make_trainer(run, [HFCallback(export_dir=str(export_dir), async_save=False), counter],
                               max_steps=2, save_steps=1)
        trainer.train()
    assert "export_dir" in str(info.value), str(info.value)
    assert counter.steps == 0, "training ran before the impossible export_dir was refused"
    assert not run.exists() or not list(run.glob("checkpoint-*")), "a checkpoint was saved before the refusal"
    after = tree_digest(tmp_path / "project")
    assert {k: v for k, v in after.items() if not k.startswith("run")} == parent_digest


def test_hf_export_into_a_folder_holding_user_files_leaves_them_intact(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "models"
    before = user_folder(target)
    with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
        _, raised = hf_run(tmp_path / "run", export_dir=str(target))
    assert tree_digest(target) == before, f"{target}: the user's files were changed or deleted by the export"
    assert_told_about(target, raised, caplog.records)
    assert (tmp_path / "run" / "checkpoint-2").is_dir(), "the run's checkpoint must survive a refused export"


def test_hf_default_export_folder_with_a_user_file_is_not_wiped(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    before = user_folder(run / "export")
    with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
        _, raised = hf_run(run)
    assert tree_digest(run / "export") == before, "the default {output_dir}/export was wiped with the user's file"
    assert_told_about(run / "export", raised, caplog.records)


def test_hf_export_replaces_a_previous_export_of_this_library(tmp_path: Path) -> None:
    target = tmp_path / "models"
    first, raised = hf_run(tmp_path / "run-a", export_dir=str(target))
    assert raised is None, raised
    assert_export_holds(target, first.model)
    torch.manual_seed(1)
    second = make_trainer(tmp_path / "run-b", [HFCallback(async_save=False, export_dir=str(target))],
                          max_steps=3, save_steps=3, model_seed=1, learning_rate=5e-3)
    second.train()
    assert_export_holds(target, second.model)
    exported = exported_weights(target)
    assert any(not torch.equal(exported[k], v) for k, v in first.model.state_dict().items() if k in exported), (
        "the second run's export did not replace the first")


# ------------------------------------------------------------------------------------ Lightning adapter

LIGHTNING = "lightning.pytorch"


def lightning_fit(root: Path, **args: Any) -> tuple[Any, Any, BaseException | None]:
    ns = namespace(LIGHTNING)
    seed_everything(0)
    module = ns.Tiny()
    arguments = CheckpointArguments(async_save=False, save_steps=2, **args)
    plugin, callback = ns.adapter.CheckpointIOPlugin(arguments), ns.adapter.CheckpointCallback(arguments)
    trainer = ns.trainer(root, callbacks=[callback], plugins=[plugin], max_epochs=1, limit_train_batches=2,
                         limit_val_batches=0)
    try:
        trainer.fit(module, train_loader())
    except Exception as exc:
        return trainer, module, exc
    return trainer, module, None


def test_lightning_export_into_a_folder_holding_user_files_leaves_them_intact(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "models"
    before = user_folder(target)
    with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
        _, _, raised = lightning_fit(tmp_path, output_dir=str(tmp_path / "checkpoints"), export_dir=str(target))
    assert tree_digest(target) == before, f"{target}: the user's files were changed or deleted by the export"
    assert_told_about(target, raised, caplog.records)


def test_lightning_export_dir_equal_to_the_default_output_dir_is_refused_before_training(tmp_path: Path) -> None:
    """`output_dir` defaults to `{default_root_dir}/checkpoints`: known at setup, before the first step."""
    run = tmp_path / "checkpoints"
    digest = user_folder(run)
    with pytest.raises(ValueError) as info:
        trainer, _, raised = lightning_fit(tmp_path, export_dir=str(run))
        if raised is not None:
            raise raised
        pytest.fail(f"fit() with export_dir == output_dir ({run}) ran to the end (global_step {trainer.global_step})")
    assert "export_dir" in str(info.value), str(info.value)
    assert not list(run.glob("checkpoint-*")), "training ran and saved before the impossible export_dir was refused"
    assert tree_digest(run) == digest


def test_lightning_export_replaces_a_previous_export_of_this_library(tmp_path: Path) -> None:
    target = tmp_path / "models"
    _, first, raised = lightning_fit(tmp_path / "a", output_dir=str(tmp_path / "a" / "ckpts"), export_dir=str(target))
    assert raised is None, raised
    assert_export_holds(target, first)
    _, second, raised = lightning_fit(tmp_path / "b", output_dir=str(tmp_path / "b" / "ckpts"), export_dir=str(target))
    assert raised is None, raised
    assert_export_holds(target, second)


# -------------------------------------------------------------------------------------------- the CLI


def test_cli_export_into_a_folder_holding_user_files_is_refused_and_leaves_it_intact(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    target = tmp_path / "models"
    before = user_folder(target)
    result = run_cli("export", tmp_path / "run" / "checkpoint-30", target)
    assert_no_traceback(result)
    assert result.code not in (0, None), result.describe()
    assert str(target) in result.text or target.name in result.text, result.describe()
    assert tree_digest(target) == before


def test_cli_export_overwrite_replaces_only_a_previous_export(tmp_path: Path) -> None:
    """`--overwrite` may replace what an earlier export wrote; a folder this library did not write stays.

    SPEC: "The library never deletes, renames or overwrites a file or folder it did not write; an export
    replaces only a previous export of this library." """
    write_run(tmp_path / "run")
    exported = tmp_path / "exported"
    target = tmp_path / "models"
    before = user_folder(target)
    first, refused = run_cli_many([
        ("export", tmp_path / "run" / "checkpoint-20", exported),
        ("export", tmp_path / "run" / "checkpoint-30", target, "--overwrite"),
    ])
    assert first.code == 0, first.describe()
    again = run_cli("export", tmp_path / "run" / "checkpoint-30", exported, "--overwrite")
    assert again.code == 0, again.describe()
    assert_export_holds(exported, _weights_module(tmp_path / "run" / "checkpoint-30"))

    assert_no_traceback(refused)
    assert tree_digest(target) == before, "--overwrite deleted a folder that no export of this library wrote"
    assert refused.code not in (0, None), refused.describe()


def _weights_module(checkpoint: Path) -> torch.nn.Module:
    model = tiny_model()
    CheckpointManager(CheckpointArguments(output_dir=str(checkpoint.parent))).load(
        checkpoint, {"model": model}, restore_rng=False)
    return model


def test_cli_export_into_the_run_folder_or_its_parent_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "project" / "run"
    write_run(run)
    before = tree_digest(tmp_path / "project")
    targets = (run, run.parent, run / "checkpoint-10")
    for result in run_cli_many([("export", run / "checkpoint-30", target, "--overwrite") for target in targets]):
        assert_no_traceback(result)
        assert result.code not in (0, None), result.describe()
    assert tree_digest(tmp_path / "project") == before, "an export into the run (or a checkpoint of it) changed it"
