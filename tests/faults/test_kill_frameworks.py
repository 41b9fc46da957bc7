"""SIGKILL a real HF Trainer / Lightning training process at random instants while it saves every step.

Each process resumes the way a user's would (`trainer.train(resume_from_checkpoint=get_last_checkpoint(dir))`,
`trainer.fit(..., ckpt_path="last")`), trains while saving asynchronously every step with rotation
(`save_total_limit=2`), and is killed with SIGKILL at a random instant. After every kill:

- every `checkpoint-*` folder a stock tool can see has a complete manifest whose files verify, so
  `transformers.trainer_utils.get_last_checkpoint` and Lightning's `ckpt_path="last"` (resolved by our
  `CheckpointCallback`) only ever name a checkpoint that loads and verifies;
- the next process resumes from exactly that checkpoint;
- what the kills left behind (staging and trash folders) is removed by the next run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from tests.faults.training_processes import TrainingProcesses

from .conftest import KillDelays

KILLS = 5
FLAGS = dict(save_steps=1, async_save=True, save_total_limit=2, export_at_end=False)


def only_complete_checkpoints_are_visible(checkpoint_dir: Path) -> None:
    for name in os.listdir(checkpoint_dir):
        if layout.parse_checkpoint_step(name) is not None:  # what the stock regex and glob `checkpoint-*` see
            assert (checkpoint_dir / name / layout.MANIFEST_NAME).is_file(), f"{name} visible without a manifest"


def assert_verifies(checkpoint: Path) -> int:
    info = read_checkpoint_info(checkpoint)
    assert find_problems(checkpoint, info.manifest, "checksum") == [], f"{checkpoint} does not verify"
    return info.step


def hf_resume_point(checkpoint_dir: Path) -> int:
    """What the stock `get_last_checkpoint` picks: a complete, verified checkpoint (0 when none)."""
    from transformers.trainer_utils import get_last_checkpoint

    only_complete_checkpoints_are_visible(checkpoint_dir)
    last = get_last_checkpoint(str(checkpoint_dir))
    return 0 if last is None else assert_verifies(Path(last))


def lightning_resume_point(checkpoint_dir: Path) -> int:
    """What `fit(ckpt_path="last")` resolves to through our callback: a checkpoint that verifies and loads."""
    from ckpt_callbacks.lightning import CheckpointCallback

    only_complete_checkpoints_are_visible(checkpoint_dir)
    last = CheckpointCallback(CheckpointArguments(output_dir=str(checkpoint_dir))).ckpt_path
    if not last:
        assert not any(layout.parse_checkpoint_step(name) is not None for name in os.listdir(checkpoint_dir))
        return 0
    step = assert_verifies(Path(last).parent)
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == step and checkpoint["state_dict"]
    return step


FRAMEWORKS: dict[str, tuple[str, Callable[[Path], int]]] = {
    "hf": ("", hf_resume_point),
    "lightning": ("checkpoints", lightning_resume_point),
}


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_kill_at_random_instants_leaves_only_checkpoints_that_resume(
    training_processes: TrainingProcesses, tmp_path: Path, framework: str,
) -> None:
    subdir, resume_point = FRAMEWORKS[framework]
    checkpoint_dir = tmp_path / subdir
    delays = KillDelays(framework, 0.1, 0.5)
    expected_start = 0
    kills_mid_write = 0
    for kill in range(KILLS):
        run = training_processes.start(framework=framework, output_dir=str(tmp_path), flags=FLAGS, seed=kill,
                                       max_steps=100_000)
        assert run.wait_for("training")["step"] == expected_start, "did not resume from the newest checkpoint"
        time.sleep(delays.next())
        run.send(signal.SIGKILL)
        run.expect_exit(-signal.SIGKILL)
        mid_write = any(layout.is_leftover(name) for name in os.listdir(checkpoint_dir))
        kills_mid_write += mid_write
        step = resume_point(checkpoint_dir)
        assert step >= expected_start, "a kill lost a checkpoint that was already committed"
        delays.after_kill(mid_write or step > expected_start)
        expected_start = step
    assert expected_start > 0, "no process lived long enough to commit a checkpoint"
    assert kills_mid_write >= 1, "no kill interrupted a write: the test would prove nothing"

    # The next run cleans the leftovers up, and finishes from where the last kill left it.
    run = training_processes.start(framework=framework, output_dir=str(tmp_path), flags=FLAGS, seed=KILLS,
                                   max_steps=expected_start + 3)
    assert run.wait_for("training")["step"] == expected_start
    run.expect_exit(0)
    assert [name for name in os.listdir(checkpoint_dir) if layout.is_leftover(name)] == []
    assert resume_point(checkpoint_dir) == expected_start + 3
