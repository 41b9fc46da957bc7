"""Two CPU processes with DDP: only rank 0 writes, every rank's RNG is saved, and resume is still exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lightning.helpers import Namespace, namespace, tensors_equal

REPO = Path(__file__).resolve().parents[2]


def run_ddp(ns: Namespace, root: Path, mode: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1"}
    done = subprocess.run([sys.executable, "-m", "tests.lightning.ddp_resume", ns.name, str(root), mode],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(root / f"final-{mode}.pt", weights_only=True)


# Three 2-process runs take a while on 2 cores: one namespace suffices, the code paths are shared.
@pytest.mark.parametrize("ns", [namespace("lightning.pytorch")], ids=["lightning.pytorch"])
def test_ddp_crash_and_resume_is_bitwise_exact(ns: Namespace, tmp_path: Path) -> None:
    reference = run_ddp(ns, tmp_path / "reference", "reference")
    crashed = run_ddp(ns, tmp_path / "run", "crash")
    resumed = run_ddp(ns, tmp_path / "run", "resume")
    assert crashed["global_step"] == 7 and resumed["resumed_from"] == 6
    assert resumed["global_step"] == reference["global_step"] == 10
    assert tensors_equal(resumed["weights"], reference["weights"])
