"""Parity of what lands next to the checkpoints and in `trainer_state.json`, and the export (a documented addition,
`export_at_end=True` by default) compared with what a stock user writes with `trainer.save_model(dir)`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM

from tests.parity.hf.differential import (
    ADDED_RUN_ENTRIES,
    Run,
    Scripted,
    assert_same_tensors,
    both,
)


@pytest.mark.parametrize("ending", ["finished", "interrupted"])
def test_output_dir_holds_only_what_stock_leaves_plus_the_export(tmp_path: Path, ending: str) -> None:
    """No `.ckpt_callbacks.lock` (or anything else of ours but the export) once `train()` has returned or raised."""
    stock, ours = both(tmp_path, lambda run: run.train(crash_at=10 if ending == "interrupted" else None))

    assert ours.entries - ADDED_RUN_ENTRIES == stock.entries


def test_save_timings_stay_out_of_trainer_state(tmp_path: Path) -> None:
    """The callback's wall-clock `ckpt_save_*` timings must not land in `log_history` (in `trainer.state` or
    any `trainer_state.json`): a resumed run's state would differ from the uninterrupted run's by them."""
    _, ours = both(tmp_path, lambda run: run.train(save_steps=4))

    assert ours.state is not None
    states = {"trainer.state": ours.state} | {name: ours.checkpoint_state(name) for name in sorted(ours.checkpoints)}
    for where, state in states.items():
        timing_keys = sorted({key for entry in state["log_history"] for key in entry if key.startswith("ckpt_save")})
        assert not timing_keys, f"{where}: {timing_keys}"


def loaded_with_from_pretrained(folder: Path) -> dict[str, Any]:
    model = AutoModelForCausalLM.from_pretrained(folder)
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.mark.parametrize(
    ("flags", "sharded"),
    [({}, False), ({"max_shard_size": "100KB"}, True)],
    ids=["one-file", "sharded"],
)
def test_export_loads_with_from_pretrained_as_the_stock_saved_model(
    tmp_path: Path, flags: dict[str, Any], sharded: bool,
) -> None:
    def scenario(run: Run) -> None:
        trainer = run.train()
        if not run.with_callback:
            trainer.save_model(str(run.output_dir / "export"))  # what a stock user does for serving

    stock, ours = both(tmp_path, scenario, **flags)

    export = ours.output_dir / "export"
    assert (export / "model.safetensors.index.json").is_file() == sharded
    assert len(list(export.glob("model*.safetensors"))) > 1 if sharded else (export / "model.safetensors").is_file()
    assert_same_tensors(loaded_with_from_pretrained(export), loaded_with_from_pretrained(stock.output_dir / "export"),
                        "export")


def test_export_after_load_best_model_at_end_holds_the_best_model(tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        trainer = run.train(compute_metrics=Scripted("scripted_loss", {4: 3.0, 8: 1.0, 12: 2.0, 15: 2.5}),
                            metric_for_best_model="scripted_loss", load_best_model_at_end=True,
                            eval_strategy="steps", eval_steps=4, save_steps=4)
        if not run.with_callback:
            trainer.save_model(str(run.output_dir / "export"))

    stock, ours = both(tmp_path, scenario)

    assert json.loads((stock.checkpoint(15) / "trainer_state.json").read_text())["best_global_step"] == 8
    assert_same_tensors(loaded_with_from_pretrained(ours.output_dir / "export"),
                        loaded_with_from_pretrained(stock.checkpoint(8)), "export vs the best checkpoint")
