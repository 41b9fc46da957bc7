"""The fork server of test_stock_saver_kills.py: tests/faults/training_processes.py's, with one more kind of child,
an HF Trainer whose checkpoints the stock saver writes into the core's staging folder
(`CheckpointCallback.stock_saver = True`, the path FSDP and DeepSpeed take). Same protocol, same children otherwise.

    python -m tests.hf.stock_saver_processes      # started by StockSaverProcesses()
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
from typing import Any

from tests.faults import training_processes
from tests.faults.training_processes import REPO, TrainingProcesses

FRAMEWORK = "hf-stock-saver"


def run_hf_stock_saver(order: dict[str, Any]) -> int:
    from ckpt_callbacks.hf import CheckpointCallback

    CheckpointCallback.stock_saver = True  # in this forked child only
    return training_processes.run_hf(order)


training_processes.FRAMEWORKS[FRAMEWORK] = run_hf_stock_saver


class StockSaverProcesses(TrainingProcesses):
    """`TrainingProcesses` served by this module (which knows `framework="hf-stock-saver"`)."""

    def __init__(self) -> None:  # the parent's, with this module as the server
        self.server = subprocess.Popen([sys.executable, "-m", __name__], cwd=REPO, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True)
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._current = None
        threading.Thread(target=self._read_events, daemon=True).start()
        first = self._events.get(timeout=180)
        assert first is not None and first["event"] == "serving", f"fork server did not start: {first}"


if __name__ == "__main__":
    training_processes.serve()
