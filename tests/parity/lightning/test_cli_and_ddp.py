"""Parity beyond a single in-process Trainer: a real `LightningCLI` run from a YAML config, and DDP on 2 CPU
processes (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.lightning.helpers import Namespace, namespace
from tests.parity.lightning.differential import (
    Outcome,
    Run,
    assert_callback_parity,
    assert_plugin_parity,
    data_module_class,
    net_class,
    saved_steps,
)

REPO = Path(__file__).resolve().parents[3]
ADAPTER = {"lightning.pytorch": "ckpt_callbacks.lightning", "pytorch_lightning": "ckpt_callbacks.pytorch_lightning"}


def cli_config(ns: Namespace, root: Path, flavor: str) -> str:
    """The YAML a LightningCLI user writes: the flat `init_args` form jsonargparse documents."""
    lines = [
        "seed_everything: 0",
        "trainer:",
        f"  default_root_dir: {root}",
        "  max_epochs: 1",
        "  limit_train_batches: 9",
        "  logger: false",
        "  enable_progress_bar: false",
        "  enable_model_summary: false",
        "  num_sanity_val_steps: 0",
        "  accelerator: cpu",
        "  devices: 1",
        "  callbacks:",
    ]
    if flavor == "ours":
        lines += [f"    - class_path: {ADAPTER[ns.name]}.CheckpointCallback",
                  f"      init_args: {{save_steps: 3, output_dir: {root}/checkpoints, export_at_end: false}}"]
    else:
        lines += [f"    - class_path: {ns.name}.callbacks.ModelCheckpoint",
                  f"      init_args: {{dirpath: {root}/checkpoints, every_n_train_steps: 3, save_top_k: -1, save_last: true}}"]
    if flavor != "stock":
        lines += ["  plugins:",
                  f"    - class_path: {ADAPTER[ns.name]}.CheckpointIOPlugin",
                  "      init_args: {async_save: false}"]
    return "\n".join(lines) + "\n"


def run_cli(ns: Namespace, root: Path, flavor: str) -> Outcome:
    cli_module = __import__(f"{ns.name}.cli", fromlist=["LightningCLI"])
    run = Run(ns, root, flavor)
    config = root.parent / f"{flavor}.yaml"
    config.write_text(cli_config(ns, root, flavor))
    cli = None
    error: BaseException | None = None
    try:
        cli = cli_module.LightningCLI(net_class(ns.name), data_module_class(ns.name), save_config_callback=None,
                                      args=["fit", "--config", str(config)])
    except (Exception, SystemExit) as exc:  # jsonargparse reports a bad config with SystemExit
        error = exc
    if cli is None:
        run.extra["error"] = repr(error)
        return run.outcome()
    run.record(cli.trainer, cli.model, error)
    return run.outcome()


def test_lightning_cli_yaml_with_the_flat_init_args_form(ns: Namespace, tmp_path: Path) -> None:
    """Issue 15, defect 11: `init_args: {save_steps: 3}` for the callback and `{async_save: false}` for the plugin,
    in a real LightningCLI run."""
    stock, plugin, ours = (run_cli(ns, tmp_path / flavor, flavor) for flavor in ("stock", "plugin", "ours"))
    assert "error" not in stock.extra and saved_steps(stock) == [3, 6, 9]
    assert "error" not in plugin.extra, plugin.extra["error"]
    assert_plugin_parity(stock, plugin)
    assert "error" not in ours.extra, ours.extra["error"]
    assert_callback_parity(stock, ours, best=False)


# --------------------------------------------------------------------------- DDP


def run_ddp(ns: Namespace, root: Path, flavor: str) -> Outcome:
    """`ddp_scenario.py` on 2 CPU processes; what rank 0 recorded, plus the files, as an Outcome."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.parity.lightning.ddp_scenario", ns.name, flavor, str(root)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = torch.load(root.parent / f"{flavor}-result.pt", weights_only=False)
    run = Run(ns, root, flavor)
    outcome = run.outcome()
    outcome.fits = recorded["fits"]
    outcome.callbacks = recorded["callbacks"]
    return outcome


@pytest.fixture(scope="module")
def ddp_outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    ns = namespace("lightning.pytorch")
    base = tmp_path_factory.mktemp("ddp")
    return {flavor: run_ddp(ns, base / flavor, flavor) for flavor in ("stock", "plugin", "ours")}


def test_ddp_plugin_is_a_drop_in(ddp_outcomes: dict[str, Outcome]) -> None:
    stock = ddp_outcomes["stock"]
    assert all(fit.error is None for fit in stock.fits) and saved_steps(stock) == [5, 10, 15]
    assert [fit.start_step for fit in stock.fits] == [0, 5]
    assert_plugin_parity(stock, ddp_outcomes["plugin"])


def test_ddp_callback_saves_and_resumes_like_model_checkpoint(ddp_outcomes: dict[str, Outcome]) -> None:
    assert_callback_parity(ddp_outcomes["stock"], ddp_outcomes["ours"], best=False)
