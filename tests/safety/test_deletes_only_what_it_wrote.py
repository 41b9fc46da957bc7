"""Issue 16's audit of every delete and rename: the same class of bug outside the export.

SPEC: "The library never deletes, renames or overwrites a file or folder it did not write." Each test puts
something the library did not write where one of its deletes or renames can reach it, and checks that it
survives byte-identical (the library may refuse with an error or a warning instead of saving, but never
remove it).
"""

from __future__ import annotations

import logging
import os
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


def test_a_remote_remove_deletes_one_checkpoint_object_never_a_prefix_of_other_objects(tmp_path: Path) -> None:
    """`remove_file` (Lightning's `remove_checkpoint` through the plugin) on an fsspec URL: stock
    `TorchCheckpointIO` removes recursively; here only a single object goes, and a prefix is refused."""
    import fsspec

    from ckpt_callbacks.core.format.single_file import remove_file

    fs = fsspec.filesystem("memory")
    root = f"/safety-remove-{tmp_path.name}"
    fs.pipe(f"{root}/epoch=0.ckpt", b"a checkpoint file")
    fs.pipe(f"{root}/mine/notes.txt", b"the user's notes")
    try:
        with pytest.raises(CheckpointError, match=r"is a folder, not a checkpoint file: not deleted"):
            remove_file(f"memory://{root}/mine")
        assert fs.cat(f"{root}/mine/notes.txt") == b"the user's notes"
        remove_file(f"memory://{root}/epoch=0.ckpt")
        assert not fs.exists(f"{root}/epoch=0.ckpt")
        remove_file(f"memory://{root}/epoch=0.ckpt")  # already gone: fine, as stock
    finally:
        fs.rm(root, recursive=True)


def test_moving_a_framework_savers_folder_up_never_overwrites_and_never_follows_a_link(tmp_path: Path) -> None:
    """`move_entries_up` (the HF stock saver's `checkpoint-N/` flattened into the staging folder)."""
    from ckpt_callbacks.core.storage.durable import move_entries_up

    staging = tmp_path / "staging"
    (staging / "checkpoint-4").mkdir(parents=True)
    (staging / "checkpoint-4" / "model.safetensors").write_bytes(b"new")
    (staging / "model.safetensors").write_bytes(b"already here")
    with pytest.raises(FileExistsError, match=r"already holds \['model.safetensors'\]"):
        move_entries_up(staging / "checkpoint-4")
    assert (staging / "model.safetensors").read_bytes() == b"already here"
    assert (staging / "checkpoint-4" / "model.safetensors").read_bytes() == b"new"

    before = _users_folder(tmp_path / "users")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "checkpoint-4").symlink_to(tmp_path / "users", target_is_directory=True)
    with pytest.raises(NotADirectoryError, match=r"a link or a file"):
        move_entries_up(tmp_path / "linked" / "checkpoint-4")
    assert tree_digest(tmp_path / "users") == before and sorted(os.listdir(tmp_path / "linked")) == ["checkpoint-4"]

    (staging / "model.safetensors").unlink()
    move_entries_up(staging / "checkpoint-4")
    assert sorted(os.listdir(staging)) == ["model.safetensors"]


def test_a_failed_clone_removes_only_the_file_it_created(tmp_path: Path) -> None:
    """The export's copy-on-write attempt creates its target exclusively, so the `unlink` after a failed clone can
    only remove that new file, never one that was there."""
    from ckpt_callbacks.core.export import _clone

    source, target = tmp_path / "source.safetensors", tmp_path / "target.safetensors"
    source.write_bytes(b"committed bytes")
    target.write_bytes(b"a file that was already there")
    assert _clone(source, target) is False
    assert target.read_bytes() == b"a file that was already there"
    fresh = tmp_path / "fresh.safetensors"
    cloned = _clone(source, fresh)
    assert fresh.read_bytes() == b"committed bytes" if cloned else not fresh.exists()


def test_a_link_named_like_a_stale_leftover_is_removed_as_a_link_and_its_target_kept(tmp_path: Path) -> None:
    """`remove_leftover` deletes a dead writer's staging entry; one that is a link to a user's folder loses the
    link only."""
    import subprocess
    import sys

    from ckpt_callbacks.core.format import layout
    from ckpt_callbacks.core.storage.durable import remove_stale_leftovers

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    name = f".staging-{layout._host()}-{int(dead.stdout)}-0123abcd"
    assert layout.is_stale_leftover(name)
    before = _users_folder(tmp_path / "users")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / name).symlink_to(tmp_path / "users", target_is_directory=True)
    assert remove_stale_leftovers(tmp_path / "run") == [name]
    assert not os.path.lexists(tmp_path / "run" / name)
    assert tree_digest(tmp_path / "users") == before


def test_a_local_remove_takes_a_link_not_its_target_and_refuses_a_folder(tmp_path: Path) -> None:
    """`remove_file` on a local path: a link named like the checkpoint loses the link only (the user's file it points
    to stays), and a folder at that path is refused with its contents kept (stock removes it recursively)."""
    from ckpt_callbacks.core.format.single_file import remove_file

    users = tmp_path / "users-weights.pt"
    users.write_bytes(b"the user's weights")
    link = tmp_path / "epoch=0.ckpt"
    link.symlink_to(users)
    remove_file(link)
    assert not os.path.lexists(link)
    assert users.read_bytes() == b"the user's weights"

    folder = tmp_path / "epoch=1.ckpt"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(b"the user's notes")
    with pytest.raises(CheckpointError):
        remove_file(folder)
    assert (folder / "notes.txt").read_bytes() == b"the user's notes"
