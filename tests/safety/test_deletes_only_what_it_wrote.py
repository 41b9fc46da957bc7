"""Issue 16's audit of every delete and rename: the same class of bug outside the export.

SPEC: "The library never deletes, renames or overwrites a file or folder it did not write." Each test puts
something the library did not write where one of its deletes or renames can reach it, and checks that it
survives byte-identical (the library may refuse with an error or a warning instead of saving, but never
remove it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ckpt_callbacks import CheckpointArguments, CheckpointError, CheckpointManager
from tests.safety.helpers import tiny_model, tree_digest


def _users_folder(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights the user copied here by hand\n" * 32)
    (folder / "notes.txt").write_text("mine\n")
    return tree_digest(folder)


def _save(run: str, step: int) -> BaseException | None:
    try:
        with CheckpointManager(CheckpointArguments(output_dir=run, async_save=False)) as manager:
            manager.save(step, {"model": tiny_model(step)})
    except CheckpointError as exc:  # refusing is allowed; deleting is not
        return exc
    return None


def test_saving_a_step_whose_folder_this_library_did_not_write_keeps_that_folder(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """`checkpoint-10` written by the stock Trainer or by hand (no manifest of this library): re-saving step 10
    exchanges the folders and deletes the old one (`LocalStore.publish` -> `_replace_checkpoint`)."""
    run = tmp_path / "run"
    before = _users_folder(run / "checkpoint-10")
    with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
        raised = _save(str(run), 10)
    found = [p for p in run.iterdir() if p.is_dir() and tree_digest(p) == before]
    assert found, f"the foreign checkpoint-10 ({sorted(before)}) was deleted by a save of step 10 (raised: {raised!r})"
    assert found[0].name == "checkpoint-10", f"the foreign checkpoint-10 was renamed to {found[0].name}"
    said = [str(raised)] if raised is not None else [r.getMessage() for r in caplog.records]
    assert any("checkpoint-10" in text for text in said), "keeping the foreign folder must be reported"


@pytest.mark.parametrize("name", [".staging-notes", ".trash-can", ".staging-checkpoint-7"])
def test_a_users_hidden_folder_named_like_a_leftover_survives_the_next_save(tmp_path: Path, name: str) -> None:
    """`LocalStore.clean_leftovers` deletes every folder of `output_dir` whose name starts with `.staging-` or
    `.trash-`; only names this library makes (`.staging-checkpoint-{step}-{8 hex}`, ...) are its own."""
    run = tmp_path / "run"
    before = _users_folder(run / name)
    assert _save(str(run), 10) is None
    assert (run / name).is_dir() and tree_digest(run / name) == before, f"{name} (a user's folder) was deleted"


def test_a_remote_run_never_deletes_a_checkpoint_prefix_it_did_not_write(tmp_path: Path) -> None:
    """`FsspecStore.clean_leftovers` removes every `checkpoint-*` prefix without a manifest as an interrupted
    upload of its own, such as a stock Trainer checkpoint the user synced to the bucket."""
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/safety-{tmp_path.name}/run"
    fs.pipe(f"{root}/checkpoint-5/model.safetensors", b"a stock Trainer checkpoint, synced by the user\n")
    fs.pipe(f"{root}/checkpoint-5/trainer_state.json", b'{"global_step": 5}')
    try:
        assert _save(f"memory://{root}", 10) is None
        assert fs.exists(f"{root}/checkpoint-5/model.safetensors"), (
            "the user's checkpoint-5 (no manifest of this library) was deleted as an interrupted upload")
        assert fs.cat(f"{root}/checkpoint-5/trainer_state.json") == b'{"global_step": 5}'
    finally:
        fs.rm(f"/safety-{tmp_path.name}", recursive=True)
