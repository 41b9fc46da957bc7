"""Two CPU processes with DDP: only rank 0 writes, every rank's RNG is saved, and resume is still exact."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lightning.helpers import NAMESPACES, Namespace, namespace, tensors_equal

REPO = Path(__file__).resolve().parents[2]
RANKS = (0, 1)


def run_ddp(ns: Namespace, root: Path, mode: str) -> list[dict[str, Any]]:
    """What each rank ended with (weights, RNG state, steps) after `tests/lightning/ddp_resume.py`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.lightning.ddp_resume", ns.name, str(root), mode],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [torch.load(root / f"final-{mode}-rank{rank}.pt", weights_only=True) for rank in RANKS]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    # The same training under either namespace (the adapters share their code): one uninterrupted run serves both.
    return run_ddp(namespace("lightning.pytorch"), tmp_path_factory.mktemp("reference"), "reference")


@pytest.mark.parametrize("ns", [namespace(name) for name in NAMESPACES], ids=NAMESPACES)
def test_ddp_crash_and_resume_is_bitwise_exact_on_every_rank(
    ns: Namespace, reference: list[dict[str, Any]], tmp_path: Path,
) -> None:
    crashed = run_ddp(ns, tmp_path, "crash")
    resumed = run_ddp(ns, tmp_path, "resume")  # other seeds: only the checkpoint can make it match
    for rank in RANKS:
        assert crashed[rank]["global_step"] == 7 and resumed[rank]["resumed_from"] == 6
        assert resumed[rank]["global_step"] == reference[rank]["global_step"] == 10
        assert tensors_equal(resumed[rank]["weights"], reference[rank]["weights"]), f"rank {rank} weights"
        assert tensors_equal(resumed[rank]["rng"], reference[rank]["rng"]), f"rank {rank}: RNG stream did not continue"
    assert not torch.equal(reference[0]["rng"]["cpu"], reference[1]["rng"]["cpu"])  # per-rank streams, really
