"""`ckpt-callbacks list` and `inspect`, driven through the installed console script."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from .conftest import LEFTOVER, ManagerRuns, run_cli


def _rows(output: str) -> dict[str, str]:
    return {line.split()[0]: line for line in output.splitlines() if line.startswith(("checkpoint-", "epoch="))}


def test_list_shows_step_epoch_metrics_size_and_best_latest_marks(manager_runs: ManagerRuns) -> None:
    result = run_cli("list", manager_runs.run("safetensors"))
    assert result.code == 0, result.err
    rows = _rows(result.out)
    assert set(rows) == {"checkpoint-10", "checkpoint-20", "checkpoint-30"}
    assert rows["checkpoint-20"].split()[:4] == ["checkpoint-20", "20", "1", "0.3"]
    assert rows["checkpoint-20"].endswith("best") and rows["checkpoint-30"].endswith("latest")
    assert not rows["checkpoint-10"].endswith(("best", "latest"))
    assert re.search(r"\d+\.\d kB\s+ckpt_callbacks/safetensors", rows["checkpoint-10"])
    assert "best by eval_loss (lower is better)" in result.out
    assert f"uncommitted: {LEFTOVER} (an interrupted save" in result.out


def test_list_json_is_for_scripts(manager_runs: ManagerRuns) -> None:
    run = manager_runs.run("safetensors")
    data = run_cli("list", run, "--json").json()
    by_step = {c["step"]: c for c in data["checkpoints"]}
    assert list(by_step) == [10, 20, 30]
    assert [(c["best"], c["latest"]) for c in data["checkpoints"]] == [(False, False), (True, False), (False, True)]
    assert by_step[20]["metrics"] == {"eval_loss": 0.3} and by_step[20]["epoch"] == 1.0
    on_disk = sum(f.stat().st_size for f in (run / "checkpoint-20").iterdir() if f.name != "manifest.json")
    assert by_step[20]["size"] == on_disk
    assert data["metric"] == {"name": "eval_loss", "greater_is_better": False}
    assert data["uncommitted"] == [LEFTOVER] and data["unreadable"] == []


def test_list_metric_options_choose_what_best_means(manager_runs: ManagerRuns) -> None:
    data = run_cli("list", manager_runs.run("safetensors"), "--json", "--metric", "loss", "--greater-is-better").json()
    assert [c["step"] for c in data["checkpoints"] if c["best"]] == [10]
    assert data["metric"] == {"name": "eval_loss", "greater_is_better": True}


def test_list_reads_stock_trainer_and_lightning_runs(trained: Path) -> None:
    hf = run_cli("list", trained / "hf-stock", "--json").json()
    assert [(c["step"], c["epoch"], c["format"]) for c in hf["checkpoints"]] == [(2, 0.5, "hf-trainer"), (4, 1.0, "hf-trainer")]
    assert all("eval_loss" in c["metrics"] for c in hf["checkpoints"])
    assert hf["checkpoints"][-1]["latest"]
    lightning = run_cli("list", trained / "lightning-stock")
    assert lightning.code == 0
    rows = _rows(lightning.out)
    assert list(rows) == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    assert rows["epoch=0-step=4.ckpt"].split()[1:2] == ["4"] and rows["epoch=0-step=4.ckpt"].endswith("lightning  latest")


def test_list_marks_an_incomplete_checkpoint_and_never_calls_it_latest(
    manager_runs: ManagerRuns, copy_of: Callable[[Path], Path]
) -> None:
    run = copy_of(manager_runs.run("safetensors"))
    (run / "checkpoint-30" / "model.safetensors").unlink()
    result = run_cli("list", run)
    rows = _rows(result.out)
    assert rows["checkpoint-30"].endswith("INCOMPLETE (run verify)")
    assert rows["checkpoint-20"].endswith("best, latest")
    assert "incomplete: checkpoint-30: checkpoint-30/model.safetensors: missing" in result.out


def test_inspect_shows_tensors_optimizer_rng_and_manifest(manager_runs: ManagerRuns) -> None:
    result = run_cli("inspect", manager_runs.run("safetensors") / "checkpoint-20")
    assert result.code == 0, result.err
    assert result.out.startswith("checkpoint-20 (ckpt_callbacks/safetensors)")
    assert re.search(r"^  metrics\s+eval_loss=0.3$", result.out, re.M)
    assert re.search(r"^  files\s+6, xxh3_128 checksums in manifest format 1$", result.out, re.M)
    assert "model: 4 tensors, 83 elements, 332 B" in result.out
    assert re.search(r"^  0\.weight\s+8x6\s+float32$", result.out, re.M)
    assert ("optimizer: optimizer state, 1 param group(s), 4 parameters, 4 with state "
            "(exp_avg, exp_avg_sq, step)") in result.out
    assert re.search(r"group 0: lr=0.01, betas=\[0.9, 0.999\]", result.out)
    assert "rng: RNG state of python, numpy, cpu" in result.out


def test_inspect_json_is_the_same_for_every_engine(manager_runs: ManagerRuns) -> None:
    reports = {engine: run_cli("inspect", manager_runs.run(engine) / "checkpoint-20", "--json").json()
               for engine in ("safetensors", "torch", "hf", "dcp")}
    for engine, data in reports.items():
        assert data["format"] == f"ckpt_callbacks/{engine}" and data["manifest"]["engine"] == engine
        assert data["manifest"]["step"] == 20 and data["step"] == 20
        tensors = {t["name"]: t for t in data["states"]["model"]["tensors"]}  # safetensors files sort them by name
        assert [tensors["0.weight"], tensors["0.bias"]] == [
            {"name": "0.weight", "shape": [8, 6], "dtype": "float32", "bytes": 192},
            {"name": "0.bias", "shape": [8], "dtype": "float32", "bytes": 32},
        ]
        optimizer = data["states"]["optimizer"]
        assert optimizer["type"] == "optimizer" and optimizer["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]
        assert optimizer["param_groups"][0]["lr"] == 0.01
        assert data["states"]["rng"]["generators"][:3] == ["python", "numpy", "cpu"]
        assert data["errors"] == {}


def test_inspect_reads_a_stock_trainer_checkpoint(trained: Path) -> None:
    data = run_cli("inspect", trained / "hf-stock" / "checkpoint-4", "--json").json()
    assert data["format"] == "hf-trainer" and data["manifest"] is None and data["step"] == 4
    tensors = {t["name"]: t for t in data["states"]["model"]["tensors"]}
    assert tensors["transformer.wte.weight"]["shape"] == [64, 16]
    assert len(data["states"]["optimizer"]["param_groups"]) == 2
    assert data["states"]["rng"]["generators"][:3] == ["python", "numpy", "cpu"]
    assert data["states"]["trainer_state"]["value"]["global_step"] == 4
    assert "never loaded" in data["states"]["training_args"]["value"]
    text = run_cli("inspect", trained / "hf-stock" / "checkpoint-4", "--state", "model")
    assert "manifest  none (written by the stock Trainer): `verify` checks its structure only" in text.out
    assert "optimizer" not in text.out and "model: 16 tensors" in text.out


def test_inspect_reads_lightning_checkpoints(trained: Path) -> None:
    stock = run_cli("inspect", trained / "lightning-stock" / "epoch=0-step=4.ckpt")
    assert stock.code == 0, stock.err
    assert "state_dict: 4 tensors, 58 elements, 232 B" in stock.out
    assert re.search(r"^  model\.0\.weight\s+8x4\s+float32$", stock.out, re.M)
    assert "optimizer_states[0]: optimizer state, 1 param group(s), 4 parameters" in stock.out
    assert re.search(r"^hyper_parameters:\n  hidden: 8$", stock.out, re.M)
    plugin = run_cli("inspect", trained / "lightning-plugin" / "checkpoint-4", "--json").json()
    lightning_dict = plugin["states"]["checkpoint.ckpt"]
    assert lightning_dict["type"] == "lightning"
    assert [t["name"] for t in lightning_dict["parts"]["state_dict"]["tensors"]][0] == "model.0.weight"
    assert plugin["format"] == "ckpt_callbacks/torch"
