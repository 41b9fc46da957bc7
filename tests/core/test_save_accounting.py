"""Every wait the training loop spends on checkpointing is counted in `SaveStats.blocking_seconds`.

A loop saves after every step while the disk (an engine that sleeps before writing) or the deferred host copy is
slower than a step, so most of the loop's time is spent waiting for a free write slot, for the copy, or for the
last write at the end. The reported blocking total must account for the loop's extra wall time: the same loop
without saves, subtracted. Sleeping takes no CPU, so the machine's load barely moves either figure.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.save.saver import SaveStats
from ckpt_callbacks.core.save.staging import StagingPlan

STEPS = 4
WRITE_SECONDS = 0.4


class SlowDiskEngine(SafetensorsEngine):
    """The safetensors engine on a disk that takes WRITE_SECONDS per piece."""

    name = "slow_disk_for_accounting"

    def save(self, state: Any, relpath: str) -> None:
        time.sleep(WRITE_SECONDS)
        super().save(state, relpath)


def wide_net() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.ReLU(), torch.nn.Linear(300, 3))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train(manager: CheckpointManager | None, *, defer: bool) -> tuple[float, list[SaveStats]]:
    """Wall seconds of STEPS steps saving after each one (when `manager`), ending with the last save durable."""
    model, optimizer = wide_net()
    stats = []
    started = time.perf_counter()
    for step in range(1, STEPS + 1):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        if manager is not None:
            manager.wait_for_staging()
        optimizer.step()
        optimizer.zero_grad()
        if manager is not None:
            manager.save(step, {"model": model, "optimizer": optimizer}, defer_staging=defer)
            assert manager.last_save is not None
            stats.append(manager.last_save)
    if manager is not None:
        manager.wait()
    return time.perf_counter() - started, stats


@pytest.mark.parametrize("slow", ["disk", "deferred copy"])
def test_reported_blocking_accounts_for_the_time_saving_adds_to_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slow: str) -> None:
    engine = None
    if slow == "disk":
        engine = "slow_disk_for_accounting"
    else:
        real_run = StagingPlan.run

        def slow_run(plan: StagingPlan) -> None:
            time.sleep(WRITE_SECONDS)
            real_run(plan)

        monkeypatch.setattr(StagingPlan, "run", slow_run)
    train(None, defer=False)  # warm-up: the first steps of a process are slower
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path), engine=engine)) as manager:
        without = min(train(None, defer=False)[0] for _ in range(2))
        with_saves, stats = train(manager, defer=slow != "disk")
    added = with_saves - without
    reported = sum(s.blocking_seconds for s in stats)
    assert added > (STEPS - 1) * WRITE_SECONDS  # the loop did wait for the slow part, nearly every step
    # Not quite all of it is waiting: the writer thread also takes the GIL and a core from the loop's own steps.
    assert 0.85 * added - 0.1 <= reported <= with_saves
    assert all(s.total_seconds is not None and 0 <= s.blocking_seconds <= s.total_seconds for s in stats)
