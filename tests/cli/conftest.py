"""Fixtures for the `ckpt-callbacks` tests: real checkpoints of every kind, and a runner for the real command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager

HERE = Path(__file__).resolve().parent
STEPS_AND_LOSSES = ((10, 0.5), (20, 0.3), (30, 0.4))  # step 20 is the best, step 30 the latest
LEFTOVER = ".staging-checkpoint-40-0badc0de"


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def cli_command() -> list[str]:
    """The installed console script next to this interpreter (`.venv/bin/ckpt-callbacks`)."""
    script = Path(sys.executable).with_name("ckpt-callbacks")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckpt_callbacks.cli"]


def run_cli(*args: object, cwd: Path | None = None) -> CliResult:
    proc = subprocess.run([*cli_command(), *map(str, args)], capture_output=True, text=True, timeout=180, cwd=cwd)
    return CliResult(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class ManagerRuns:
    """Run folders written by `CheckpointManager`, one per engine, and the weights saved at each step."""

    root: Path
    weights: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def run(self, engine: str) -> Path:
        return self.root / engine


def _write_manager_run(folder: Path, engine: str, weights: dict[int, dict[str, torch.Tensor]]) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with CheckpointManager(CheckpointArguments(output_dir=str(folder), engine=engine, async_save=False)) as manager:
        for step, loss in STEPS_AND_LOSSES:
            model(torch.randn(4, 6)).sum().backward()
            optimizer.step()
            manager.save(step, {"model": model, "optimizer": optimizer}, metrics={"eval_loss": loss}, epoch=step / 20)
            weights[step] = {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def manager_runs(tmp_path_factory: pytest.TempPathFactory) -> ManagerRuns:
    runs = ManagerRuns(tmp_path_factory.mktemp("manager-runs"))
    for engine in ("safetensors", "torch", "hf", "dcp"):
        _write_manager_run(runs.run(engine), engine, runs.weights)
    (runs.run("safetensors") / LEFTOVER).mkdir()  # what a save killed before its rename leaves
    return runs


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real trainer runs (see make_checkpoints.py): hf-stock, hf-callback, lightning-stock, lightning-plugin."""
    out = tmp_path_factory.mktemp("trained")
    proc = subprocess.run([sys.executable, str(HERE / "make_checkpoints.py"), str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture
def copy_of(tmp_path: Path) -> Callable[[Path], Path]:
    """A private copy of a run folder or checkpoint, for tests that damage or delete."""

    def copy(source: Path) -> Path:
        target = tmp_path / "copies" / source.name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        return target

    return copy
