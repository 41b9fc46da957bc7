"""The export is byte for byte what `save_pretrained(max_shard_size=...)` writes, and shares the final checkpoint's
committed files where they are verified identical to it, never where they are not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core import export
from ckpt_callbacks.core.export import export_safetensors
from ckpt_callbacks.core.format.manifest import read_manifest_file
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.run import ExportSource, RunController

from ..conftest import assert_same_tensors


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def weight_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


def stock_export(model: GPT2LMHeadModel, folder: Path, shard: str) -> dict[str, bytes]:
    model.save_pretrained(str(folder), max_shard_size=shard)
    return weight_files(folder)


def committed_checkpoint(model: GPT2LMHeadModel, run: Path, step: int = 1) -> Path:
    with CheckpointManager(CheckpointArguments(output_dir=str(run)), engine="hf") as manager:
        manager.save(step, {"model": model})
    return run / f"checkpoint-{step}"


def same_file(a: Path, b: Path) -> bool:
    return os.stat(a).st_ino == os.stat(b).st_ino and os.stat(a).st_dev == os.stat(b).st_dev


def verifies(checkpoint: Path) -> bool:
    return find_problems(checkpoint, read_manifest_file(checkpoint / "manifest.json"), "checksum") == []


@pytest.mark.parametrize("shard", ["5GB", "20KB"])
def test_export_files_are_byte_identical_to_save_pretrained(tmp_path: Path, shard: str) -> None:
    model = tiny_gpt2()
    expected = stock_export(model, tmp_path / "stock", shard)
    export_safetensors(model.state_dict(), tmp_path / "ours", max_shard_size=shard, pretrained_objects=[model.config])
    assert weight_files(tmp_path / "ours") == expected
    assert (len(expected) > 2) == (shard == "20KB")  # several shards and an index, or one file


def test_a_checkpoints_weights_file_is_the_one_save_pretrained_writes(tmp_path: Path) -> None:
    model = tiny_gpt2()
    expected = stock_export(model, tmp_path / "stock", "5GB")
    checkpoint = committed_checkpoint(model, tmp_path / "run")
    assert (checkpoint / "model.safetensors").read_bytes() == expected["model.safetensors"]


def test_export_shares_the_committed_file_holding_the_final_weights(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SHARE_COMMITTED_FILES", "link")  # hard links where the file system has no reflinks
    model = tiny_gpt2()
    checkpoint = committed_checkpoint(model, tmp_path / "run")
    out = tmp_path / "export"
    export_safetensors(model.state_dict(), out, reuse_from=checkpoint, pretrained_objects=[model.config])
    assert same_file(out / "model.safetensors", checkpoint / "model.safetensors")
    assert weight_files(out) == stock_export(model, tmp_path / "stock", "5GB")
    assert_same_tensors(GPT2LMHeadModel.from_pretrained(str(out)).state_dict(), model.state_dict())
    # Replacing the export, then deleting the checkpoint, each leaves the other whole.
    export_safetensors(model.state_dict(), out, reuse_from=None, pretrained_objects=[model.config])
    assert not same_file(out / "model.safetensors", checkpoint / "model.safetensors") and verifies(checkpoint)
    export_safetensors(model.state_dict(), out, reuse_from=checkpoint, pretrained_objects=[model.config])
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "run")), engine="hf") as manager:
        manager.delete(1)
    assert not checkpoint.exists()
    exported = load_file(str(out / "model.safetensors"))
    assert_same_tensors(exported, {name: model.state_dict()[name] for name in exported})


def test_a_checkpoint_of_other_weights_is_not_shared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SHARE_COMMITTED_FILES", "link")
    earlier = tiny_gpt2(seed=0)
    checkpoint = committed_checkpoint(earlier, tmp_path / "run")
    final = tiny_gpt2(seed=1)  # same shapes, so the same header: only the checksum tells them apart
    out = tmp_path / "export"
    export_safetensors(final.state_dict(), out, reuse_from=checkpoint, pretrained_objects=[final.config])
    assert not same_file(out / "model.safetensors", checkpoint / "model.safetensors")
    assert weight_files(out) == stock_export(final, tmp_path / "stock", "5GB")
    assert verifies(checkpoint)


@pytest.mark.parametrize("mtime", ["updated", "restored"])
def test_a_committed_file_changed_after_its_commit_is_not_shared(tmp_path: Path, mtime: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SHARE_COMMITTED_FILES", "link")
    model = tiny_gpt2()
    checkpoint = committed_checkpoint(model, tmp_path / "run")
    weights = checkpoint / "model.safetensors"
    committed = os.stat(weights)
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0x01
    weights.write_bytes(bytes(damaged))
    if mtime == "restored":  # the change hides from the modification time: a sampled block still shows it
        os.utime(weights, ns=(committed.st_atime_ns, committed.st_mtime_ns))
    out = tmp_path / "export"
    export_safetensors(model.state_dict(), out, reuse_from=checkpoint, pretrained_objects=[model.config])
    assert not same_file(out / "model.safetensors", weights)
    assert weight_files(out) == stock_export(model, tmp_path / "stock", "5GB")


def test_shards_no_committed_file_matches_are_written_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SHARE_COMMITTED_FILES", "link")
    model = tiny_gpt2()
    checkpoint = committed_checkpoint(model, tmp_path / "run")
    out = tmp_path / "export"
    export_safetensors(model.state_dict(), out, max_shard_size="20KB", reuse_from=checkpoint,
                       pretrained_objects=[model.config])
    assert weight_files(out) == stock_export(model, tmp_path / "stock", "20KB")
    assert not any(same_file(path, checkpoint / "model.safetensors") for path in out.glob("model*.safetensors"))


def test_sharing_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SHARE_COMMITTED_FILES", "off")
    model = tiny_gpt2()
    checkpoint = committed_checkpoint(model, tmp_path / "run")
    export_safetensors(model.state_dict(), tmp_path / "export", reuse_from=checkpoint)
    assert not same_file(tmp_path / "export" / "model.safetensors", checkpoint / "model.safetensors")


def test_the_end_of_run_export_shares_the_last_checkpoint_when_it_holds_the_final_weights(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "SHARE_COMMITTED_FILES", "link")
    model = tiny_gpt2()
    manager = CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "run")), engine="hf")
    run = RunController(manager)
    run.begin(max_steps=2, step=0, resumed=False, install_signals=False)
    run.save(2, {"model": model.state_dict()}, epoch=1.0)
    run.end(export=ExportSource(state_dict=model.state_dict, pretrained_objects=[model.config]))
    manager.close()
    exported = tmp_path / "run" / "export" / "model.safetensors"
    assert same_file(exported, tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    assert weight_files(exported.parent) == stock_export(model, tmp_path / "stock", "5GB")


def test_by_default_a_write_into_the_export_never_reaches_the_checkpoint(tmp_path: Path) -> None:
    """Default sharing is copy-on-write only: where the file system has no reflinks (ext4), the export is a copy,
    so a user saving another model into the export folder in place leaves the checkpoint intact."""
    model = tiny_gpt2()
    checkpoint = committed_checkpoint(model, tmp_path / "run")
    out = tmp_path / "export"
    export_safetensors(model.state_dict(), out, reuse_from=checkpoint, pretrained_objects=[model.config])
    assert not same_file(out / "model.safetensors", checkpoint / "model.safetensors") or export.SHARE_COMMITTED_FILES == "link"
    tiny_gpt2(seed=1).save_pretrained(str(out))  # opens out/model.safetensors with "wb": in place
    assert verifies(checkpoint)
