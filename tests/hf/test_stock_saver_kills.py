"""SIGKILL a real HF Trainer at random instants while the stock saver writes a checkpoint at every step.

The path FSDP and DeepSpeed take (`CheckpointCallback.stock_saver = True` here, on CPU): the stock
`_save_checkpoint` writes into the core's hidden staging folder, which the core then seals and publishes. After
every kill, what tests/faults/test_kill_frameworks.py requires of every front end: every `checkpoint-*` a stock tool
can see has a complete manifest whose files verify (so `get_last_checkpoint` only names one that loads), the next
process resumes from exactly it, and the next run removes what the kills left behind.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt_callbacks.core.format import layout
from tests.faults.conftest import KillDelays
from tests.faults.test_kill_frameworks import KILLS, hf_resume_point
from tests.hf.stock_saver_processes import FRAMEWORK, StockSaverProcesses

FLAGS = dict(save_steps=1, save_total_limit=2, export_at_end=False)


@pytest.fixture(scope="module")
def processes() -> Iterator[StockSaverProcesses]:
    server = StockSaverProcesses()
    yield server
    server.close()


def test_a_kill_during_a_stock_saver_write_leaves_no_half_visible_checkpoint(
    processes: StockSaverProcesses, tmp_path: Path,
) -> None:
    delays = KillDelays(FRAMEWORK, 0.1, 0.5)
    expected_start = 0
    kills_mid_write = 0
    for kill in range(KILLS):
        run = processes.start(framework=FRAMEWORK, output_dir=str(tmp_path), flags=FLAGS, seed=kill, max_steps=100_000)
        assert run.wait_for("training")["step"] == expected_start, "did not resume from the newest checkpoint"
        time.sleep(delays.next())
        run.send(signal.SIGKILL)
        run.expect_exit(-signal.SIGKILL)
        leftovers = [name for name in os.listdir(tmp_path) if layout.is_leftover(name)]
        kills_mid_write += bool(leftovers)
        step = hf_resume_point(tmp_path)  # only complete checkpoints are visible, and the newest verifies
        assert step >= expected_start, "a kill lost a checkpoint that was already committed"
        delays.after_kill(bool(leftovers) or step > expected_start)
        expected_start = step
    assert expected_start > 0, "no process lived long enough to commit a checkpoint"
    assert kills_mid_write >= 1, "no kill interrupted a write: the test would prove nothing"

    run = processes.start(framework=FRAMEWORK, output_dir=str(tmp_path), flags=FLAGS, seed=KILLS,
                          max_steps=expected_start + 3)
    assert run.wait_for("training")["step"] == expected_start
    run.expect_exit(0)
    assert [name for name in os.listdir(tmp_path) if layout.is_leftover(name)] == []
    assert hf_resume_point(tmp_path) == expected_start + 3
