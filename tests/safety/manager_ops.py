"""Child process: the manager operations a run goes through, each reported as one JSON line as it ends.

    python manager_ops.py RUN_DIR

list(), load_last() without and with fallback_to_verified, and a further save under save_total_limit=2
(retention). A child process, so that an operation that never ends (a huge manifest) can be killed, and the
lines printed before it still tell which operations finished and how.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from ckpt_callbacks import CheckpointArguments, CheckpointCorruptError, CheckpointError, CheckpointManager


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:2000])


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def report(op: str, action: Callable[[], Any]) -> None:
    handler = Collect()
    logging.getLogger("ckpt_callbacks").addHandler(handler)
    started = time.monotonic()
    line: dict[str, Any] = {"op": op}
    try:
        line.update(ok=True, value=action())
    except BaseException as exc:  # noqa: BLE001 - the point is to see what escapes
        line.update(ok=False, error_type=type(exc).__name__, error=str(exc)[:3000],
                    is_checkpoint_error=isinstance(exc, CheckpointError),
                    is_corrupt_error=isinstance(exc, CheckpointCorruptError))
    finally:
        logging.getLogger("ckpt_callbacks").removeHandler(handler)
    line.update(logs=handler.messages, seconds=round(time.monotonic() - started, 2))
    print(json.dumps(line), flush=True)


def main(run_dir: str) -> None:
    logging.getLogger("ckpt_callbacks").setLevel(logging.INFO)

    def listed() -> list[int]:
        return [info.step for info in CheckpointManager(CheckpointArguments(output_dir=run_dir)).list()]

    def load_last(fallback: bool) -> int:
        args = CheckpointArguments(output_dir=run_dir, fallback_to_verified=fallback)
        step, _ = CheckpointManager(args).load_last({"model": model()})
        return step

    def save_with_retention() -> list[int]:
        args = CheckpointArguments(output_dir=run_dir, save_total_limit=2, async_save=False)
        with CheckpointManager(args) as manager:
            manager.save(50, {"model": model()})
            return [info.step for info in manager.list()]

    report("list", listed)
    report("load_last", lambda: load_last(False))
    report("load_last_fallback", lambda: load_last(True))
    report("save_with_retention", save_with_retention)


if __name__ == "__main__":
    main(sys.argv[1])
