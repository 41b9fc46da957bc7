"""SIGTERM/SIGUSR1 at a random moment of a real training process, in each front end.

The HF Trainer (with `CheckpointCallback`), Lightning (with `CheckpointIOPlugin` + `CheckpointCallback`)
and a plain loop (with `manager.handle_signals()`) each train in their own process, saving asynchronously
every 10 steps to a deliberately slow disk. The test signals the process at a random moment; then:

- the save happens at the next step boundary: the checkpoint's step is the step being computed when the
  signal arrived (or the one just finished, if it arrived between the optimizer step and the check), and
  training stops there;
- pending asynchronous writes are flushed: the checkpoint is committed the instant `train()`/`fit()`/the
  loop returns, with nothing left in flight, and its manifest verifies;
- `train()`/`fit()` return normally, nothing is exported, and the script, ending with
  `sys.exit(callback.exit_code)`, exits with 128 + signum (143, 138); a run that finishes exits with 0;
- a fresh process (other initial weights) resumes from that checkpoint and ends with the weights of an
  uninterrupted run, bit for bit.
"""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.read.verify import find_problems
from tests.conftest import assert_same_tensors
from tests.faults.training_processes import TrainingProcesses

SLOW_DISK_SECONDS = 0.15  # every async write takes at least this long to commit


@dataclass(frozen=True)
class Setting:
    max_steps: int
    flags: dict[str, Any] = field(default_factory=dict)
    checkpoint_subdir: str = ""  # Lightning's run folder keeps checkpoints under checkpoints/


SETTINGS = {
    "hf": Setting(max_steps=40),
    "lightning": Setting(max_steps=60, checkpoint_subdir="checkpoints"),
    "plain": Setting(max_steps=300),
}
COMMON_FLAGS = dict(save_steps=10, async_save=True, save_total_limit=2, export_at_end=True)


@dataclass(frozen=True)
class Reference:
    weights: dict[str, torch.Tensor]
    train_seconds: float


def slowest_possible_finish(setting: Setting) -> float:
    """A lower bound of the time the preempted run trains, whatever the machine's load: one async write at a
    time, each at least SLOW_DISK_SECONDS, and training returns after the last one (the signal must come
    before, or the run finishes unpreempted)."""
    return (setting.max_steps // COMMON_FLAGS["save_steps"] - 1) * SLOW_DISK_SECONDS


def train(processes: TrainingProcesses, framework: str, output_dir: Path, *, seed: int, **order: Any) -> Any:
    setting = SETTINGS[framework]
    return processes.start(framework=framework, output_dir=str(output_dir), flags=COMMON_FLAGS, seed=seed,
                           max_steps=setting.max_steps, **order)


@pytest.fixture(scope="module")
def reference(training_processes: TrainingProcesses, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Reference]:
    """The uninterrupted run of each front end (computed once): its final weights and training time."""
    cache: dict[str, Reference] = {}

    def get(framework: str) -> Reference:
        if framework not in cache:
            folder = tmp_path_factory.mktemp(f"uninterrupted-{framework}")
            run = train(training_processes, framework, folder / "run", seed=0, weights=str(folder / "weights.pt"))
            run.wait_for("training")
            started = time.monotonic()
            returned = run.wait_for("returned")
            train_seconds = time.monotonic() - started
            run.expect_exit(0)  # a finished run exits 0
            assert returned["final_step"] == SETTINGS[framework].max_steps and not returned["preempted"]
            assert returned["exported"] == (framework != "plain"), "a finished run is exported"
            cache[framework] = Reference(torch.load(folder / "weights.pt", weights_only=True), train_seconds)
        return cache[framework]

    return get


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
@pytest.mark.parametrize("framework", ["hf", "lightning", "plain"])
def test_signal_saves_at_the_next_step_flushes_exits_128_plus_signum_and_resumes_exactly(
    training_processes: TrainingProcesses, reference: Callable[[str], Reference], tmp_path: Path,
    framework: str, signum: int,
) -> None:
    uninterrupted = reference(framework)
    setting = SETTINGS[framework]
    checkpoint_dir = tmp_path / "run" / setting.checkpoint_subdir
    rng = random.Random(f"{framework}-{signum}")

    run = train(training_processes, framework, tmp_path / "run", seed=0, slow_publish=SLOW_DISK_SECONDS)
    run.wait_for("training")
    time.sleep(rng.uniform(0.1, 0.6) * min(uninterrupted.train_seconds, slowest_possible_finish(setting)))
    run.send(signum)
    returned = run.wait_for("returned")  # train()/fit()/the loop returned normally
    run.expect_exit(128 + signum)

    step, received_at = returned["final_step"], returned["received_at"]
    assert returned["preempted"] and received_at is not None
    assert step in (received_at, received_at + 1), f"signal at step {received_at}, stopped and saved at {step}"
    assert step < setting.max_steps, "the signal should have arrived during training"
    listing = returned["listing"]
    assert layout.checkpoint_name(step) in listing, f"checkpoint-{step} not committed when training returned: {listing}"
    assert not [name for name in listing if layout.is_leftover(name)], f"writes still in flight: {listing}"
    assert not returned["exported"], "an unfinished run must not be exported"

    latest = CheckpointManager(CheckpointArguments(output_dir=str(checkpoint_dir))).latest()
    assert latest is not None and latest.step == step and latest.manifest.step == step
    assert find_problems(Path(latest.path), latest.manifest, "checksum") == []

    resumed = train(training_processes, framework, tmp_path / "run", seed=123, weights=str(tmp_path / "resumed.pt"))
    assert resumed.wait_for("training")["step"] == step
    resumed.expect_exit(0)
    assert_same_tensors(torch.load(tmp_path / "resumed.pt", weights_only=True), uninterrupted.weights)
