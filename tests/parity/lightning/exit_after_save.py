"""Run by test_plugin_drop_in.py: fit one epoch, `trainer.save_checkpoint(PATH)`, then `os._exit(0)` at once (as
forked workers and some launchers end), so nothing flushes a write still in flight.

    python -m tests.parity.lightning.exit_after_save NAMESPACE {stock,plugin} PATH
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

from tests.lightning.helpers import namespace, seed_everything
from tests.parity.lightning.differential import Run

warnings.filterwarnings("ignore")


def main(namespace_name: str, flavor: str, path: str) -> None:
    seed_everything(0)
    run = Run(namespace(namespace_name), Path(path).parent, flavor)
    trainer = run.trainer([], max_epochs=1, enable_checkpointing=False)
    fit = run.fit(trainer, run.module(ballast_mb=16))
    assert fit.error is None, fit.error
    trainer.save_checkpoint(path)
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:4])
