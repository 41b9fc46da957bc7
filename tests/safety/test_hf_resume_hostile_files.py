"""Issue 16: on the HF resume path, a hostile or unreadable file is a named `CheckpointError`, never a raw one.

`trainer.train(resume_from_checkpoint=True)` with the HF callback verifies the checkpoint and reads the
optimizer ahead. A pickle payload in `optimizer.pt` (manifest re-sealed, so only the payload is wrong) must
surface as the documented `CheckpointError` naming the file, not torch's `UnpicklingError`, and must run
nothing. A file the process may not read must name the file and the fix, not be a bare `PermissionError`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointError
from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import make_trainer
from tests.safety.helpers import (
    child_env,
    hand_over,
    make_unreadable,
    reader_uid,
    reseal,
    run_python,
    shared_scratch,
)


class Payload:
    """Unpickling this (with a full, code-running unpickler) creates the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.sentinel}",))


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-step run with the HF callback: checkpoint-2 in the stock layout, with its manifest."""
    run = tmp_path_factory.mktemp("hf") / "run"
    make_trainer(run, [CheckpointCallback(async_save=False, export_at_end=False)], max_steps=2, save_steps=2).train()
    assert (run / "checkpoint-2" / "optimizer.pt").is_file()
    return run


def test_hf_resume_refuses_a_pickle_payload_in_optimizer_pt_with_a_named_checkpoint_error(
        hf_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(hf_run, run)
    sentinel = tmp_path / "payload-ran"
    torch.save({"state": {0: Payload(sentinel)}, "param_groups": []}, run / "checkpoint-2" / "optimizer.pt")
    reseal(run / "checkpoint-2", "optimizer.pt")

    trainer = make_trainer(run, [CheckpointCallback(async_save=False, export_at_end=False)], max_steps=4, save_steps=2)
    with pytest.raises(Exception) as info:
        trainer.train(resume_from_checkpoint=True)
    assert not sentinel.exists(), "the pickle payload in optimizer.pt ran"
    assert isinstance(info.value, CheckpointError), (
        f"the refusal surfaced as {type(info.value).__module__}.{type(info.value).__name__}, not the documented "
        f"CheckpointError: {info.value}")
    assert "optimizer.pt" in str(info.value), str(info.value)
    assert not (run / "checkpoint-4").exists(), "training went on past the refused optimizer state"


RESUME_AS_READER = """
import json, sys
from pathlib import Path
from ckpt_callbacks import CheckpointError
from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import make_trainer

trainer = make_trainer(Path(sys.argv[1]), [CheckpointCallback(async_save=False, export_at_end=False)],
                       max_steps=4, save_steps=2)
try:
    trainer.train(resume_from_checkpoint=True)
    print(json.dumps({"raised": None}))
except BaseException as exc:
    print(json.dumps({"raised": f"{type(exc).__module__}.{type(exc).__name__}", "message": str(exc),
                      "is_checkpoint_error": isinstance(exc, CheckpointError)}))
"""


def test_hf_resume_with_an_unreadable_optimizer_file_names_the_file_and_the_fix(hf_run: Path) -> None:
    with shared_scratch() as scratch:
        run = scratch / "run"
        shutil.copytree(hf_run, run)
        (scratch / "home").mkdir()
        hand_over(scratch)
        make_unreadable(run / "checkpoint-2" / "optimizer.pt")
        env = child_env({"HOME": str(scratch / "home"), "HF_HOME": str(scratch / "home" / "hf")})
        proc = run_python(RESUME_AS_READER, run, user=reader_uid(), env=env, timeout=300)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        assert lines, f"the resume process printed no verdict (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        verdict = json.loads(lines[-1])
    if verdict["raised"] is None:
        pytest.skip("this process could read a chmod 000 file (root without a privilege drop?)")
    message = verdict["message"]
    assert verdict["is_checkpoint_error"], f"a permission error surfaced as a bare {verdict['raised']}: {message}"
    assert "optimizer.pt" in message, message
    assert re.search(r"(?i)permission|not readable|cannot read|access", message), message
    assert re.search(r"(?i)chmod|make (it|the file|them) readable|readable by|grant|owner", message), (
        f"the error does not say how to fix it: {message}")
