"""Atomic commits, leftovers, and corruption detection that names the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import (
    CheckpointArguments,
    CheckpointCorruptError,
    CheckpointManager,
    CheckpointNotFoundError,
)
from ckpt_callbacks.core.storage.checksums import checksum_file

from ..conftest import TinyNet


def saved_manager(tmp_path: Path, engine: str = "safetensors", **kwargs: object) -> tuple[CheckpointManager, TinyNet]:
    model = TinyNet()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine=engine, **kwargs))
    manager.save(5, {"model": model, "extra": {"note": "hello", "values": torch.arange(4)}}, metrics={"eval_loss": 0.5}, epoch=1.0)
    manager.wait()
    return manager, model


def test_manifest_lists_every_file_with_size_and_checksum(tmp_path: Path) -> None:
    manager, _ = saved_manager(tmp_path)
    folder = tmp_path / "checkpoint-5"
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert [f["path"] for f in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        assert entry["size"] == (folder / entry["path"]).stat().st_size
        assert entry["checksum"] == checksum_file(folder / entry["path"])
    assert manifest["step"] == 5 and manifest["epoch"] == 1.0 and manifest["metrics"] == {"eval_loss": 0.5}
    assert manifest["engine"] == "safetensors" and manifest["world_size"] == 1 and "torch" in manifest["versions"]
    assert manifest["format_version"] == 1 and manifest["save_time"] >= manifest["start_time"]


def test_staging_leftover_is_ignored_by_list_and_cleaned_on_next_save(tmp_path: Path) -> None:
    manager, _ = saved_manager(tmp_path)
    leftover = tmp_path / ".staging-checkpoint-9-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half written")
    half_named = tmp_path / "checkpoint-7"  # a folder with the final name but no manifest (e.g. another tool)
    half_named.mkdir()
    assert [info.step for info in manager.list()] == [5]
    manager.close()  # the killed writer is gone; a new run starts
    fresh = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path)))
    assert [info.step for info in fresh.list()] == [5]
    fresh.save(6, {})
    fresh.wait()
    assert not leftover.exists()
    assert half_named.exists()  # not ours to delete: only staging and trash names are cleaned
    assert [info.step for info in fresh.list()] == [5, 6]


def corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "append":
        path.write_bytes(bytes(data) + b"junk")
    elif how == "bitflip":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    elif how == "delete":
        path.unlink()


@pytest.mark.parametrize("how", ["truncate", "append", "bitflip", "delete"])
@pytest.mark.parametrize("engine", ["safetensors", "torch", "hf"])
def test_damaged_file_is_reported_naming_the_file(tmp_path: Path, how: str, engine: str) -> None:
    manager, _ = saved_manager(tmp_path, engine=engine, async_save=False)
    folder = tmp_path / "checkpoint-5"
    for entry in json.loads((folder / "manifest.json").read_text())["files"]:
        target = folder / entry["path"]
        backup = target.read_bytes()
        corrupt(target, how)
        with pytest.raises(CheckpointCorruptError) as info:
            manager.load(5, {"model": TinyNet()})
        assert entry["path"] in str(info.value), str(info.value)
        assert info.value.path is not None and info.value.path.endswith(entry["path"])
        target.write_bytes(backup)
    manager.load(5, {"model": TinyNet()})  # intact again


def test_size_mode_skips_checksums_and_none_mode_skips_everything(tmp_path: Path) -> None:
    _, _ = saved_manager(tmp_path, async_save=False)
    target = tmp_path / "checkpoint-5" / "extra.json"
    corrupt(target, "bitflip")
    size_only = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), verify_on_load="size"))
    size_only.load(5, {"model": TinyNet()})  # the flipped bit is in a piece we did not... still verified by size only
    with pytest.raises(CheckpointCorruptError):
        CheckpointManager(CheckpointArguments(output_dir=str(tmp_path))).load(5, {"model": TinyNet()})


def test_fallback_to_newest_verified_checkpoint_is_opt_in_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = TinyNet()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False))
    manager.save(1, {"model": model})
    manager.save(2, {"model": model})
    corrupt(tmp_path / "checkpoint-2" / "model.safetensors", "bitflip")
    with pytest.raises(CheckpointCorruptError, match="checkpoint-2/model.safetensors"):
        manager.load_last({"model": TinyNet()})
    fallback = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), fallback_to_verified=True))
    step, _ = fallback.load_last({"model": TinyNet()})
    assert step == 1
    assert "checkpoint-2 failed verification" in caplog.text


@pytest.mark.parametrize("bad_path", ["../outside.bin", "/etc/passwd", "sub/../../x"])
def test_manifest_naming_files_outside_the_checkpoint_is_rejected(tmp_path: Path, bad_path: str) -> None:
    manager, _ = saved_manager(tmp_path, async_save=False)
    manifest_path = tmp_path / "checkpoint-5" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"].append({"path": bad_path, "size": 1, "checksum": "0"})
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorruptError, match="outside the checkpoint"):
        manager.load(str(tmp_path / "checkpoint-5"), {"model": TinyNet()})
    assert manager.list() == []  # not listed either


def test_symlink_out_of_the_checkpoint_is_rejected(tmp_path: Path) -> None:
    manager, _ = saved_manager(tmp_path, async_save=False)
    folder = tmp_path / "checkpoint-5"
    outside = tmp_path / "outside.safetensors"
    os.replace(folder / "model.safetensors", outside)
    os.symlink(outside, folder / "model.safetensors")
    with pytest.raises(CheckpointCorruptError, match="link"):
        manager.load(5, {"model": TinyNet()})


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: "not json {",
        lambda m: json.dumps({**m, "step": "five"}),
        lambda m: json.dumps({**m, "format_version": 99}),
        lambda m: json.dumps({**m, "files": "nope"}),
    ],
    ids=["malformed", "wrong-type", "future-version", "files-not-a-list"],
)
def test_bad_manifests_raise_checkpoint_errors_not_tracebacks(tmp_path: Path, edit: object) -> None:
    from ckpt_callbacks import CheckpointError

    manager, _ = saved_manager(tmp_path, async_save=False)
    manifest_path = tmp_path / "checkpoint-5" / "manifest.json"
    manifest_path.write_text(edit(json.loads(manifest_path.read_text())))  # type: ignore[operator]
    with pytest.raises(CheckpointError, match="manifest"):
        manager.load(str(tmp_path / "checkpoint-5"), {"model": TinyNet()})
    assert manager.list() == []


def test_mismatched_shapes_raise_a_checkpoint_error(tmp_path: Path) -> None:
    from ckpt_callbacks import CheckpointError

    manager, _ = saved_manager(tmp_path, async_save=False)
    with pytest.raises(CheckpointError, match="different model"):
        manager.load(5, {"model": torch.nn.Linear(6, 8)})


def test_missing_piece_and_missing_checkpoint_errors(tmp_path: Path) -> None:
    manager, _ = saved_manager(tmp_path, async_save=False)
    from ckpt_callbacks import CheckpointError

    with pytest.raises(CheckpointError, match="holds no 'optimizer' state"):
        manager.load(5, {"optimizer": torch.optim.SGD(TinyNet().parameters(), lr=0.1)})
    with pytest.raises(CheckpointNotFoundError):
        manager.load(99, {})
    empty = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "empty")))
    with pytest.raises(CheckpointNotFoundError, match="No committed checkpoint"):
        empty.load_last({})


def test_resaving_a_step_replaces_it_atomically(tmp_path: Path) -> None:
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False))
    manager.save(3, {"extra": {"v": torch.zeros(2)}})
    manager.save(3, {"extra": {"v": torch.ones(2)}})
    meta = manager.load(3, {"extra": None})
    assert torch.equal(meta["state"]["extra"]["v"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ckpt")) == ["checkpoint-3"]


def test_second_writer_on_the_same_folder_gets_a_clear_error(tmp_path: Path) -> None:
    from ckpt_callbacks import CheckpointError

    first = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False))
    first.save(1, {})
    second = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), async_save=False))
    with pytest.raises(CheckpointError, match="another process is writing checkpoints here"):
        second.save(2, {})
    first.close()
    second.save(2, {})
    assert [info.step for info in second.list()] == [1, 2]


@pytest.mark.parametrize("engine", ["safetensors", "torch"])
def test_a_damaged_checkpoint_leaves_the_live_objects_untouched(tmp_path: Path, engine: str) -> None:
    """The optimizer state is read ahead while the files are verified; nothing is restored before the verdict."""
    saved = TinyNet()
    saved_optimizer = torch.optim.AdamW(saved.parameters())
    saved(torch.randn(2, 6)).sum().backward()
    saved_optimizer.step()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine=engine, async_save=False))
    manager.save(1, {"model": saved, "optimizer": saved_optimizer})
    live = TinyNet()
    live_optimizer = torch.optim.AdamW(live.parameters())
    before = {k: v.clone() for k, v in live.state_dict().items()}
    folder = tmp_path / "checkpoint-1"
    damaged = max((p for p in folder.iterdir() if p.name != "manifest.json"), key=lambda p: p.stat().st_size)
    corrupt(damaged, "bitflip")
    with pytest.raises(CheckpointCorruptError, match=damaged.name):
        manager.load(1, {"model": live, "optimizer": live_optimizer})
    assert all(torch.equal(live.state_dict()[k], before[k]) for k in before)
    assert not live_optimizer.state  # no state adopted from a checkpoint that failed verification
