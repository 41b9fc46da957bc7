"""What the callback leaves on disk: the stock layout, a verified manifest, complete checkpoints only,
folders `from_pretrained` loads, a sharded export; and the stock writer never running."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from ckpt_callbacks import CheckpointCorruptError
from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.hf import CheckpointCallback
from tests.conftest import assert_same_tensors
from tests.hf.conftest import EVAL, ScriptedMetric, assert_same_state_dicts, checkpoint_steps, make_trainer

SAVE_KEYS_PREFIX = "ckpt_save_"


def without_save_stats(trainer_state: dict) -> dict:
    state = dict(trainer_state)
    state["log_history"] = [{k: v for k, v in entry.items() if not k.startswith(SAVE_KEYS_PREFIX)}
                            for entry in trainer_state["log_history"]]
    return state


def logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=EVAL.tokens).logits


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output_dir = tmp_path_factory.mktemp("stock")
    make_trainer(output_dir).train()
    return output_dir


@pytest.fixture(scope="module")
def our_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, Path]:
    output_dir = tmp_path_factory.mktemp("ours")
    trainer = make_trainer(output_dir, [CheckpointCallback(max_shard_size="40KB")])
    trainer.train()
    return trainer, output_dir


def test_checkpoints_have_the_stock_files_and_contents(stock_run: Path, our_run: tuple[Trainer, Path]) -> None:
    _, ours = our_run
    assert checkpoint_steps(ours) == checkpoint_steps(stock_run) == [4, 8, 12, 15]
    for step in (4, 15):
        stock_dir, our_dir = stock_run / f"checkpoint-{step}", ours / f"checkpoint-{step}"
        assert sorted(p.name for p in our_dir.iterdir()) == sorted([p.name for p in stock_dir.iterdir()] + ["manifest.json"])
        assert_same_tensors(load_file(our_dir / "model.safetensors"), load_file(stock_dir / "model.safetensors"))
        for name in ("optimizer.pt", "scheduler.pt"):
            assert_same_state_dicts(torch.load(our_dir / name, weights_only=True), torch.load(stock_dir / name, weights_only=True))
        stock_rng = torch.load(stock_dir / "rng_state.pth", weights_only=False)
        our_rng = torch.load(our_dir / "rng_state.pth", weights_only=False)
        assert torch.equal(our_rng["cpu"], stock_rng["cpu"]) and our_rng["python"] == stock_rng["python"]
        assert (our_rng["numpy"][1] == stock_rng["numpy"][1]).all()
        stock_state = json.loads((stock_dir / "trainer_state.json").read_text())
        our_state = json.loads((our_dir / "trainer_state.json").read_text())
        assert without_save_stats(our_state) == stock_state
        assert json.loads((our_dir / "config.json").read_text()) == json.loads((stock_dir / "config.json").read_text())


def test_every_checkpoint_has_a_manifest_whose_checksums_verify(our_run: tuple[Trainer, Path]) -> None:
    _, output_dir = our_run
    for step in checkpoint_steps(output_dir):
        folder = output_dir / f"checkpoint-{step}"
        manifest = json.loads((folder / "manifest.json").read_text())
        listed = {entry["path"]: entry for entry in manifest["files"]}
        assert manifest["step"] == step and manifest["engine"] == "hf"
        assert set(listed) == {p.name for p in folder.iterdir()} - {"manifest.json"}
        for name, entry in listed.items():
            data = (folder / name).read_bytes()
            assert entry["size"] == len(data)
            assert entry["checksum"] == xxhash.xxh3_128_hexdigest(data)
        assert find_problems(folder, read_checkpoint_info(folder).manifest, "checksum") == []


def test_checkpoint_and_export_load_with_from_pretrained_and_give_the_trained_logits(
    our_run: tuple[Trainer, Path],
) -> None:
    trainer, output_dir = our_run
    expected = logits(trainer.model)
    export_dir = output_dir / "export"
    for folder in (output_dir / "checkpoint-15", export_dir):
        assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(folder)), expected), folder
    shards = sorted(p.name for p in export_dir.glob("model-*.safetensors"))
    assert len(shards) > 1
    index = json.loads((export_dir / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied to transformer.wte.weight, stored once


def test_save_cost_is_reported_beside_the_trainer_log_not_in_its_state(our_run: tuple[Trainer, Path]) -> None:
    trainer, output_dir = our_run
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, CheckpointCallback))
    assert [report["step"] for report in callback.save_reports] == [4, 8, 12, 15]  # one report per checkpoint
    for report in callback.save_reports:
        assert 0 <= report["ckpt_save_blocking_s"] <= report["ckpt_save_total_s"]
        assert report["ckpt_save_MBps"] > 0
    # trainer_state.json must be what an uninterrupted stock run writes: no wall-clock keys of ours in it.
    assert not any(key.startswith("ckpt_") for entry in trainer.state.log_history for key in entry)
    saved_state = json.loads((output_dir / "checkpoint-15" / "trainer_state.json").read_text())
    assert not any(key.startswith("ckpt_") for entry in saved_state["log_history"] for key in entry)


def test_get_last_checkpoint_and_resume_ignore_an_interrupted_save(tmp_path: Path) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    # What a save killed mid-write leaves: a hidden staging folder with partial files, numbered higher.
    leftover = tmp_path / ".staging-checkpoint-12-0badf00d"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"\0" * 10)

    assert get_last_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-8")
    resumed = make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=10, save_steps=10)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10
    assert not leftover.exists()  # cleaned by the next writer
    assert checkpoint_steps(tmp_path) == [4, 8, 10]


@pytest.mark.parametrize(
    ("flags", "expected_steps"),
    [
        (dict(save_strategy="steps", save_steps=4), [4, 8, 12, 15]),
        (dict(save_strategy="epoch"), [5, 10, 15]),
        (dict(save_strategy="best", eval_strategy="steps", eval_steps=2, metric_for_best_model="score",
              greater_is_better=False), [2, 4, 8, 12]),
    ],
    ids=["steps", "epoch", "best"],
)
@pytest.mark.parametrize("attach", ["constructor", "add_callback"])
def test_stock_save_checkpoint_never_runs(
    tmp_path: Path, stock_save_calls: list[int], flags: dict, expected_steps: list[int], attach: str,
) -> None:
    callback = CheckpointCallback(export_at_end=False)
    trainer = make_trainer(tmp_path, [callback] if attach == "constructor" else [], **flags)
    if attach == "add_callback":
        trainer.add_callback(callback)  # found at on_train_begin instead of on_init_end
    trainer.compute_metrics = ScriptedMetric([5, 3, 4, 2, 2.5, 1, 1.5])  # new bests at steps 2, 4, 8, 12
    trainer.train()

    assert stock_save_calls == []
    assert checkpoint_steps(tmp_path) == expected_steps
    for step in expected_steps:
        assert (tmp_path / f"checkpoint-{step}" / "manifest.json").is_file()


class StartStep(TrainerCallback):
    """Records the step training (re)starts at."""

    step: int | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step = state.global_step


def flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_resume_from_a_corrupted_checkpoint_names_the_bad_file(tmp_path: Path) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    flip_one_byte(tmp_path / "checkpoint-8" / "optimizer.pt")

    resumed = make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=10)
    with pytest.raises(CheckpointCorruptError, match=r"checkpoint-8/optimizer\.pt: checksum mismatch"):
        resumed.train(resume_from_checkpoint=True)


def test_fallback_to_verified_resumes_from_the_newest_intact_checkpoint(tmp_path: Path) -> None:
    make_trainer(tmp_path, [CheckpointCallback(export_at_end=False)], max_steps=8).train()
    flip_one_byte(tmp_path / "checkpoint-8" / "model.safetensors")

    start = StartStep()
    callback = CheckpointCallback(export_at_end=False, fallback_to_verified=True)
    make_trainer(tmp_path, [callback, start], max_steps=10).train(resume_from_checkpoint=True)
    assert start.step == 4
