"""`ckpt-callbacks verify`: sizes and checksums from manifests, structure for stock checkpoints, exit codes."""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

from .conftest import LEFTOVER, ManagerRuns, run_cli


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_byte_in_tensor_record(torch_file: Path) -> None:
    """Damage the bytes of the first tensor of a torch zip file, leaving its structure loadable."""
    with zipfile.ZipFile(torch_file) as archive:
        record = next(info for info in archive.infolist() if "/data/" in info.filename)
    with open(torch_file, "rb") as f:
        f.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", f.read(4))
    flip_byte(torch_file, record.header_offset + 30 + name_length + extra_length)


def test_verify_of_an_intact_run_exits_0_and_reports_the_leftover_as_uncommitted(manager_runs: ManagerRuns) -> None:
    result = run_cli("verify", manager_runs.run("safetensors"))
    assert result.code == 0, result.out + result.err
    lines = result.out.splitlines()
    assert [line.split()[:2] for line in lines[:4]] == [
        ["ok", "checkpoint-10"], ["ok", "checkpoint-20"], ["ok", "checkpoint-30"], ["uncommitted", LEFTOVER]]
    assert "sizes and checksums of 6 file(s)" in lines[0]
    assert "an interrupted save, never visible as a checkpoint" in lines[3]
    assert lines[-1] == "3 checkpoint(s) checked: 3 ok, 0 failed; 1 uncommitted leftover(s), not failures"


def test_verify_names_every_bad_file_and_exits_1(manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    flip_byte(run / "checkpoint-20" / "model.safetensors", -3)
    os.truncate(run / "checkpoint-20" / "optimizer.safetensors", 10)
    (run / "checkpoint-30" / "rng.json").unlink()
    result = run_cli("verify", run)
    assert result.code == 1
    assert "checkpoint-20/model.safetensors: checksum mismatch (expected " in result.out
    assert "checkpoint-20/optimizer.safetensors: size mismatch (expected " in result.out
    assert "checkpoint-30/rng.json: missing (listed in the manifest)" in result.out
    assert "FAILED       checkpoint-20  2 bad file(s)" in result.out
    assert "3 checkpoint(s) checked: 1 ok, 2 failed" in result.out
    report = run_cli("verify", run, "--json").json()
    assert report["ok"] is False
    assert {(c["name"], c["status"]) for c in report["checkpoints"]} == {
        ("checkpoint-10", "ok"), ("checkpoint-20", "failed"), ("checkpoint-30", "failed"), (LEFTOVER, "uncommitted")}
    bad = {(p["file"], p["reason"]) for c in report["checkpoints"] for p in c["problems"]}
    assert bad == {("checkpoint-20/model.safetensors", "checksum mismatch"),
                   ("checkpoint-20/optimizer.safetensors", "size mismatch"), ("checkpoint-30/rng.json", "missing")}
    assert run_cli("verify", run / "checkpoint-10").code == 0


def test_verify_size_mode_skips_checksums(manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]) -> None:
    checkpoint = copy_of(manager_runs.run("torch") / "checkpoint-30")
    flip_byte(checkpoint / "model.pt", -30)
    assert run_cli("verify", checkpoint, "--check", "size").code == 0
    assert run_cli("verify", checkpoint).code == 1


def test_a_damaged_manifest_is_a_failure_named_after_it(manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]) -> None:
    checkpoint = copy_of(manager_runs.run("hf") / "checkpoint-30")
    (checkpoint / "manifest.json").write_text("{not json")
    result = run_cli("verify", checkpoint)
    assert result.code == 1
    assert "checkpoint-30/manifest.json: manifest is not valid JSON" in result.out


def test_verify_checks_stock_trainer_checkpoints_by_structure_and_says_so(trained: Path) -> None:
    result = run_cli("verify", trained / "hf-stock")
    assert result.code == 0, result.out
    assert result.out.count("structure only: no manifest (written by the stock Trainer)") == 2
    assert "note: training_args.bin not loaded: a full pickle of TrainingArguments" in result.out


def test_verify_names_what_is_wrong_in_a_stock_trainer_checkpoint(trained: Path, copy_of: Callable[[Path], Path]) -> None:
    run = copy_of(trained / "hf-stock")
    os.truncate(run / "checkpoint-4" / "optimizer.pt", 1000)
    flip_byte_in_tensor_record(run / "checkpoint-4" / "rng_state.pth")
    (run / "checkpoint-2" / "model.safetensors").unlink()
    report = run_cli("verify", run, "--json").json()
    problems = {c["name"]: {p["file"] for p in c["problems"]} for c in report["checkpoints"]}
    assert problems == {
        "checkpoint-2": {"checkpoint-2/model.safetensors, model.safetensors.index.json or pytorch_model.bin"},
        "checkpoint-4": {"checkpoint-4/optimizer.pt", "checkpoint-4/rng_state.pth"},
    }
    assert report["ok"] is False


def test_verify_loads_lightning_ckpt_files_and_checks_their_crcs(trained: Path, copy_of: Callable[[Path], Path]) -> None:
    ckpt = trained / "lightning-stock" / "epoch=0-step=4.ckpt"
    result = run_cli("verify", ckpt)
    assert result.code == 0
    assert "structure only: no manifest (written by Lightning)" in result.out
    damaged = copy_of(ckpt)
    flip_byte_in_tensor_record(damaged)
    result = run_cli("verify", damaged)
    assert result.code == 1
    assert "epoch=0-step=4.ckpt: CRC mismatch in its record" in result.out


def test_verify_checks_adapter_checkpoints_by_checksum(trained: Path) -> None:
    for run in ("hf-callback", "lightning-plugin"):
        result = run_cli("verify", trained / run)
        assert result.code == 0, result.out
        assert result.out.count("sizes and checksums of") == 2


def test_a_single_file_checkpoint_is_verified_against_its_sidecar_manifest(
    trained: Path, copy_of: Callable[[Path], Path]
) -> None:
    run = copy_of(trained / "lightning-files")
    flip_byte_in_tensor_record(run / "epoch=0-step=4.ckpt")
    report = run_cli("verify", run, "--json").json()
    assert [(c["name"], c["status"], c["check"]) for c in report["checkpoints"]] == [
        ("epoch=0-step=2.ckpt", "ok", "checksum"), ("epoch=0-step=4.ckpt", "failed", "checksum")]
    assert report["checkpoints"][1]["problems"][0]["reason"] == "checksum mismatch"


def test_a_trainer_output_dir_with_saved_weights_is_still_a_run_folder(
    trained: Path, copy_of: Callable[[Path], Path]
) -> None:
    run = copy_of(trained / "hf-stock")
    for name in ("model.safetensors", "config.json"):  # what trainer.save_model() leaves beside the checkpoints
        (run / name).write_bytes((run / "checkpoint-4" / name).read_bytes())
    result = run_cli("verify", run)
    assert result.code == 0
    assert result.out.splitlines()[-1] == "2 checkpoint(s) checked: 2 ok, 0 failed"
