"""Issue 16: `load_last` never silently loads an older checkpoint, and a refusal says why.

With the default `fallback_to_verified=False`, a newest checkpoint with any file truncated by one byte (or
a manifest that cannot be parsed) is refused with `CheckpointCorruptError` naming the file, exactly as a
flipped byte is. With `fallback_to_verified=True` the previous checkpoint is loaded, and the log says which
one was taken and why. When the only checkpoint is refused, the error says why, not "No committed checkpoint".
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import (
    CheckpointArguments,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointNotFoundError,
)
from tests.safety.helpers import manifest_files, tiny_model, truncate_by_one, write_run

ENGINES = ("safetensors", "torch", "hf")


def _load_last(run: Path, *, fallback: bool = False) -> tuple[int, torch.nn.Module]:
    model = tiny_model(seed=99)
    step, _ = CheckpointManager(CheckpointArguments(output_dir=str(run), fallback_to_verified=fallback)).load_last(
        {"model": model})
    return step, model


def _warnings(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records
                     if r.levelno >= logging.WARNING and r.name.startswith("ckpt_callbacks"))


def _original_files(checkpoint: Path) -> dict[str, bytes]:
    """The bytes of every file the manifest lists, to put each back after damaging it."""
    return {rel: (checkpoint / rel).read_bytes() for rel in manifest_files(checkpoint)}


@pytest.mark.parametrize("engine", ENGINES)
def test_load_last_refuses_a_newest_checkpoint_with_any_file_truncated_by_one_byte(tmp_path: Path,
                                                                                    engine: str) -> None:
    run = tmp_path / "run"
    write_run(run, steps=(10, 20), engine=engine)
    newest = run / "checkpoint-20"
    failures = []
    for rel, original in _original_files(newest).items():
        truncate_by_one(newest / rel)
        try:
            step, _ = _load_last(run)
            failures.append(f"{rel} truncated: load_last() silently loaded checkpoint-{step}")
        except CheckpointCorruptError as exc:
            if rel not in str(exc):
                failures.append(f"{rel} truncated: the refusal does not name the file: {exc}")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{rel} truncated: {type(exc).__name__}: {exc}")
        finally:
            (newest / rel).write_bytes(original)
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("damage", ["truncated_to_half", "not_json", "empty"])
def test_load_last_refuses_a_newest_checkpoint_whose_manifest_cannot_be_parsed(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    write_run(run, steps=(10, 20))
    manifest = run / "checkpoint-20" / "manifest.json"
    data = manifest.read_bytes()
    manifest.write_bytes({"truncated_to_half": data[: len(data) // 2], "not_json": b"\x00\xffgarbage",
                          "empty": b""}[damage])
    with pytest.raises(CheckpointCorruptError) as info:
        step, _ = _load_last(run)
        pytest.fail(f"load_last() silently loaded checkpoint-{step} past a damaged checkpoint-20/manifest.json")
    assert "checkpoint-20" in str(info.value) and "manifest.json" in str(info.value), str(info.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_load_last_with_fallback_takes_the_previous_checkpoint_and_logs_which(tmp_path: Path, engine: str,
                                                                              caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    saved = write_run(run, steps=(10, 20), engine=engine)
    newest = run / "checkpoint-20"
    failures = []
    for rel, original in _original_files(newest).items():
        truncate_by_one(newest / rel)
        caplog.clear()
        try:
            with caplog.at_level(logging.WARNING, logger="ckpt_callbacks"):
                step, model = _load_last(run, fallback=True)
            said = _warnings(caplog)
            if step != 10 or any(not torch.equal(v, saved[10][k]) for k, v in model.state_dict().items()):
                failures.append(f"{rel} truncated: loaded checkpoint-{step}, not checkpoint-10's weights")
            elif "checkpoint-20" not in said or "checkpoint-10" not in said or rel not in said:
                failures.append(f"{rel} truncated: the fallback to checkpoint-10 was not logged with why "
                                f"(checkpoint-20, {rel}) and which checkpoint was taken; logged: {said!r}")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{rel} truncated: {type(exc).__name__}: {exc}")
        finally:
            (newest / rel).write_bytes(original)
    assert not failures, "\n".join(failures)


def _unsafe_path(checkpoint: Path) -> None:
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][0]["path"] = "../../outside.bin"
    manifest_path.write_text(json.dumps(manifest))


def _link_outside(checkpoint: Path) -> None:
    outside = checkpoint.parent.parent / "outside.safetensors"
    victim = checkpoint / "model.safetensors"
    outside.write_bytes(victim.read_bytes())
    victim.unlink()
    victim.symlink_to(outside)


def _damaged_manifest(checkpoint: Path) -> None:
    manifest = checkpoint / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])


REFUSALS = {
    "unsafe_path_in_manifest": (_unsafe_path, r"(?i)outside|unsafe"),
    "file_is_a_link_outside": (_link_outside, r"(?i)outside|link|unsafe"),
    "damaged_manifest": (_damaged_manifest, r"(?i)manifest\.json"),
}


@pytest.mark.parametrize("fallback", [False, True], ids=["strict", "fallback"])
@pytest.mark.parametrize("case", list(REFUSALS))
def test_when_the_only_checkpoint_is_refused_the_error_says_why(tmp_path: Path, case: str, fallback: bool) -> None:
    run = tmp_path / "run"
    write_run(run, steps=(10,))
    damage, reason = REFUSALS[case]
    damage(run / "checkpoint-10")
    with pytest.raises(CheckpointError) as info:
        _load_last(run, fallback=fallback)
    message = str(info.value)
    assert not isinstance(info.value, CheckpointNotFoundError) and "No committed checkpoint" not in message, (
        f"the refusal of checkpoint-10 reads as if the run had no checkpoint: {type(info.value).__name__}: {message}")
    assert "checkpoint-10" in message and re.search(reason, message), message
