"""The stock-saver path (how FSDP and DeepSpeed checkpoints are kept), proven on CPU with a plain Trainer.

Under FSDP or DeepSpeed the callback lets the stock `Trainer._save_checkpoint` write into the core's staging folder
(`ckpt_callbacks/hf/stock_saver.py`); those strategies need CUDA. `CheckpointCallback.stock_saver = True` routes a
plain one-process Trainer through the very same path, so here: the stock file set plus `manifest.json`, written by
the stock saver; retention, best tracking, `save_only_model` and `load_best_model_at_end` as stock; a bitwise-exact
resume through the stock loader; a damaged file named on resume; the export of gathered weights; and the refusals
that do not need a sharded Trainer. The atomicity under SIGKILL is in test_stock_saver_kills.py, the 2-process
run (every rank's files in the manifest) in test_ddp.py, FSDP and DeepSpeed in test_sharded_gpu.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from ckpt_callbacks import CheckpointCorruptError
from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.hf import CheckpointCallback, capture
from ckpt_callbacks.hf.capture import model_state_dict
from ckpt_callbacks.hf.stock_saver import weights_as_saved
from tests.conftest import assert_same_tensors
from tests.hf.conftest import (
    CrashAtStep,
    Interrupted,
    ScriptedMetric,
    assert_same_state_dicts,
    checkpoint_steps,
    losses,
    make_trainer,
    tiny_gpt2,
    weights,
)
from tests.hf.test_layout import without_save_stats

SCORES = [5, 3, 4, 1, 2.5, 2, 1.5, 1.8]  # evaluations every 2 steps; the best (lowest) at step 8
EVALUATE = dict(eval_strategy="steps", eval_steps=2, metric_for_best_model="score", greater_is_better=False)


def stock_saving(**flags: Any) -> CheckpointCallback:
    callback = CheckpointCallback(**flags)
    callback.stock_saver = True
    return callback


def train(output_dir: Path, callbacks: list[Any], *, scores: bool = False, **flags: Any) -> Trainer:
    trainer = make_trainer(output_dir, callbacks, **flags)
    if scores:
        trainer.compute_metrics = ScriptedMetric(SCORES)
    trainer.train()
    return trainer


def no_leftovers(folder: Path) -> bool:
    return not [name for name in os.listdir(folder) if name.startswith(".staging") or name.startswith(".trash")]


def test_the_stock_saver_writes_the_stock_files_and_the_core_seals_them(tmp_path: Path,
                                                                       stock_save_calls: list[int]) -> None:
    stock = train(tmp_path / "stock", [], max_steps=8)
    stock_save_calls.clear()
    ours = train(tmp_path / "ours", [stock_saving(export_at_end=False)], max_steps=8)

    assert stock_save_calls == [4, 8]  # the stock saver wrote them (the engine path never calls it)
    assert checkpoint_steps(tmp_path / "ours") == checkpoint_steps(tmp_path / "stock") == [4, 8]
    assert no_leftovers(tmp_path / "ours")
    for step in (4, 8):
        stock_dir, our_dir = tmp_path / "stock" / f"checkpoint-{step}", tmp_path / "ours" / f"checkpoint-{step}"
        assert sorted(os.listdir(our_dir)) == sorted([*os.listdir(stock_dir), "manifest.json"])
        assert (our_dir / "model.safetensors").read_bytes() == (stock_dir / "model.safetensors").read_bytes()
        for name in ("optimizer.pt", "scheduler.pt"):
            assert_same_state_dicts(torch.load(our_dir / name, weights_only=True),
                                    torch.load(stock_dir / name, weights_only=True))
        assert without_save_stats(json.loads((our_dir / "trainer_state.json").read_text())) == json.loads(
            (stock_dir / "trainer_state.json").read_text())
        info = read_checkpoint_info(our_dir)
        assert {entry.path for entry in info.manifest.files} == set(os.listdir(our_dir)) - {"manifest.json"}
        assert find_problems(our_dir, info.manifest, "checksum") == []
        assert info.manifest.engine == "hf" and info.manifest.world_size == 1
        assert info.manifest.states == ["model", "optimizer", "pretrained", "rng", "scheduler", "trainer_state",
                                        "training_args"]
    assert get_last_checkpoint(str(tmp_path / "ours")) == str(tmp_path / "ours" / "checkpoint-8")
    assert_same_tensors(weights(ours.model), weights(stock.model))


@pytest.mark.parametrize(
    ("flags", "expected_steps"),
    [
        (dict(save_strategy="steps", save_steps=4, save_total_limit=2), [8, 15]),  # the best and the newest
        (dict(save_strategy="steps", save_steps=4, save_total_limit=1), [8]),  # the stock end-of-training cleanup
        (dict(save_strategy="best", save_total_limit=2), [4, 8]),
    ],
    ids=["steps-limit2", "steps-limit1", "best-limit2"],
)
def test_retention_and_best_are_the_stock_trainers(tmp_path: Path, flags: dict[str, Any],
                                                   expected_steps: list[int]) -> None:
    stock = train(tmp_path / "stock", [], scores=True, **EVALUATE, **flags)
    ours = train(tmp_path / "ours", [stock_saving(export_at_end=False)], scores=True, **EVALUATE, **flags)

    assert checkpoint_steps(tmp_path / "ours") == checkpoint_steps(tmp_path / "stock") == expected_steps
    assert no_leftovers(tmp_path / "ours")
    # The real folder, never the staging folder the stock saver wrote into.
    best = str(tmp_path / "ours" / "checkpoint-8")
    stock_best = stock.state.best_model_checkpoint
    # transformers < 5.4 records no best under save_strategy="best" (docs/support.md): the installed Trainer's rule.
    if stock_best is not None or flags["save_strategy"] != "best":
        assert stock_best == best.replace("/ours/", "/stock/")
    assert ours.state.best_model_checkpoint == (best if stock_best is not None else None)
    newest = tmp_path / "ours" / f"checkpoint-{expected_steps[-1]}"
    recorded = json.loads((newest / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert recorded == ours.state.best_model_checkpoint
    assert read_checkpoint_info(tmp_path / "ours" / "checkpoint-8").metrics["eval_score"] == 1.0


@pytest.mark.parametrize("flag_source", ["TrainingArguments", "CheckpointCallback"])
def test_load_best_model_at_end_restores_the_best_checkpoint_and_exports_it(tmp_path: Path, flag_source: str) -> None:
    if flag_source == "TrainingArguments":  # the Trainer's own _load_best_model reads our committed folder
        trainer = train(tmp_path, [stock_saving()], scores=True, load_best_model_at_end=True, **EVALUATE)
    else:  # the callback's flag alone: the stock loader, from the verified best folder
        trainer = train(tmp_path, [stock_saving(load_best_model_at_end=True)], scores=True, **EVALUATE)

    best = load_file(tmp_path / "checkpoint-8" / "model.safetensors")
    last = load_file(tmp_path / "checkpoint-15" / "model.safetensors")
    trainer.model.save_pretrained(tmp_path / "live")  # the live weights as the installed transformers writes them
    live = load_file(tmp_path / "live" / "model.safetensors")
    assert_same_tensors(live, best)
    assert not all(torch.equal(live[name], tensor) for name, tensor in last.items())
    # The export holds the weights as `save_pretrained` writes them (tied lm_head dropped), from the best.
    assert_same_tensors(load_file(tmp_path / "export" / "model.safetensors"), live)


def test_save_only_model_writes_the_stock_files(tmp_path: Path) -> None:
    train(tmp_path / "stock", [], save_only_model=True, max_steps=4)
    train(tmp_path / "ours", [stock_saving(export_at_end=False)], save_only_model=True, max_steps=4)

    stock_files = sorted(os.listdir(tmp_path / "stock" / "checkpoint-4"))
    assert sorted(os.listdir(tmp_path / "ours" / "checkpoint-4")) == sorted([*stock_files, "manifest.json"])
    assert "optimizer.pt" not in stock_files


def test_a_callback_save_only_model_flag_reaches_the_stock_saver(tmp_path: Path) -> None:
    # The flag is the callback's alone: the stock saver runs with the run's save flags, and records them.
    train(tmp_path, [stock_saving(save_only_model=True, export_at_end=False)], max_steps=4)
    folder = tmp_path / "checkpoint-4"
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"}.isdisjoint(os.listdir(folder))
    assert torch.load(folder / "training_args.bin", weights_only=False).save_only_model is True


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Trainer:
    return train(tmp_path_factory.mktemp("uninterrupted"), [], save_strategy="no")


def test_an_interrupted_run_resumes_bitwise_exact_through_the_stock_loader(tmp_path: Path,
                                                                         uninterrupted: Trainer) -> None:
    flags = dict(save_steps=3, export_at_end=False)
    crashing = make_trainer(tmp_path, [stock_saving(**flags), CrashAtStep(8)])
    with pytest.raises(Interrupted):
        crashing.train()
    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-6")  # mid-epoch (5 steps per epoch)

    resumed = make_trainer(tmp_path, [stock_saving(**flags)], model_seed=123)
    resumed.train(resume_from_checkpoint=True)

    assert_same_tensors(weights(resumed.model), weights(uninterrupted.model))
    assert_same_state_dicts(resumed.optimizer.state_dict(), uninterrupted.optimizer.state_dict())
    assert losses(resumed) == losses(uninterrupted)


def test_a_damaged_file_is_named_before_the_stock_loader_reads_it(tmp_path: Path) -> None:
    train(tmp_path, [stock_saving(export_at_end=False)], max_steps=4)
    scheduler = tmp_path / "checkpoint-4" / "scheduler.pt"
    data = bytearray(scheduler.read_bytes())
    data[len(data) // 2] ^= 0xFF
    scheduler.write_bytes(bytes(data))

    resumed = make_trainer(tmp_path, [stock_saving(export_at_end=False)], max_steps=6)
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-4/scheduler\.pt: checksum mismatch"):
        resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 0  # refused before anything was loaded or trained


def test_gathered_weights_are_saved_as_save_pretrained_saves_the_live_model() -> None:
    # A gather (FSDP, ZeRO-3) gives every name its own tensor: tied weights are no longer one. Made one again,
    # the tied alias is dropped exactly as from the live model.
    model = tiny_gpt2()
    gathered = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert "lm_head.weight" in gathered

    saved = weights_as_saved(model, gathered)

    assert_same_tensors(saved, model_state_dict(model))
    # The tied alias is one tensor again, so it is dropped wherever `save_pretrained` drops it: here by
    # `remove_tied_weights_from_state_dict` (newer transformers), or when written, by shared storage (older).
    if capture.remove_tied_weights_from_state_dict is None:
        assert saved["lm_head.weight"] is saved["transformer.wte.weight"]
    else:
        assert "lm_head.weight" not in saved


def test_what_the_stock_saver_cannot_serve_is_refused_at_attach(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="engine='torch' cannot write FSDP or DeepSpeed state"):
        make_trainer(tmp_path, [stock_saving(engine="torch")])
    with pytest.raises(ValueError, match="needs a local .*'s3://bucket/run' is remote"):
        make_trainer(tmp_path, [stock_saving(output_dir="s3://bucket/run", export_at_end=False)])
