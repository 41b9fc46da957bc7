"""Parity of resuming: `trainer.train(resume_from_checkpoint=...)` after an interruption, stock and with the callback.

An interrupted run (`crash_at`: training raises after that optimizer step, before its save) is resumed by a
fresh Trainer whose model starts from another seed, so everything it ends with comes from the checkpoint.
Both halves must end as the other does, and (the stock Trainer of transformers 5 resumes exactly here) as
their uninterrupted run does, except where stock itself differs from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import EarlyStoppingCallback

from ckpt_callbacks import CheckpointCorruptError
from tests.parity.hf.differential import (
    Observation,
    Run,
    Scripted,
    assert_same_observations,
    assert_same_tensors,
    assert_same_values,
    both,
    cli,
    difference_paths,
    frozen_embeddings_and_first_block,
)


def assert_resumed_exactly(resumed: Observation, uninterrupted: Observation) -> None:
    """Bit for bit the uninterrupted run's final weights and optimizer state."""
    assert resumed.weights is not None and uninterrupted.weights is not None
    assert_same_tensors(resumed.weights, uninterrupted.weights, f"{resumed.half}: resumed vs uninterrupted weights")
    assert_same_values(resumed.optimizer, uninterrupted.optimizer, f"{resumed.half}: resumed vs uninterrupted optimizer")


def assert_resume_differs_from_uninterrupted_as_stock(
    stock: Observation, ours: Observation, stock_full: Observation, ours_full: Observation,
) -> None:
    """Where a resumed run's `trainer.state` differs from the uninterrupted run's (stock: the final `train_loss`,
    averaged over the steps of the resumed call only), ours differs in the same places and nowhere else."""
    assert difference_paths(ours.state, ours_full.state) == difference_paths(stock.state, stock_full.state)


@pytest.mark.parametrize(
    ("args", "crash_at", "resumed_from"),
    [
        (dict(save_steps=3), 5, 3),  # mid-epoch 0 (epoch 0.6)
        (dict(save_steps=4), 10, 8),  # mid-epoch 1, the resumed run crosses into epoch 2
        (dict(save_strategy="epoch"), 7, 5),  # at the epoch boundary
        (dict(save_steps=4, gradient_accumulation_steps=4, per_device_train_batch_size=2), 6, 4),
        (dict(save_steps=4, model=frozen_embeddings_and_first_block), 6, 4),
    ],
    ids=["mid-epoch", "mid-epoch-across-epochs", "epoch-boundary", "grad-accumulation-4", "frozen-parameters"],
)
def test_resume_after_an_interruption_ends_as_stock_and_as_uninterrupted(
    tmp_path: Path, args: dict[str, Any], crash_at: int, resumed_from: int,
) -> None:
    def interrupted_then_resumed(run: Run) -> None:
        run.train(crash_at=crash_at, **args)
        run.train(resume_from_checkpoint=True, model_seed=123, **args)

    stock_full, ours_full = both(tmp_path / "full", lambda run: run.train(**args))
    stock, ours = both(tmp_path / "resumed", interrupted_then_resumed)

    assert max(step for step in stock.steps if step < crash_at) == resumed_from  # where the resume started
    assert_resumed_exactly(stock, stock_full)  # the stock half's own expectation
    assert_same_observations(stock, ours)
    assert_resumed_exactly(ours, ours_full)
    assert_resume_differs_from_uninterrupted_as_stock(stock, ours, stock_full, ours_full)


def test_resume_from_a_given_checkpoint_path_ends_as_stock(tmp_path: Path) -> None:
    # checkpoint-8 and checkpoint-12 exist; the user picks checkpoint-4.
    def scenario(run: Run) -> None:
        run.train(crash_at=13, save_steps=4)
        run.train(resume_from_checkpoint=str(run.output_dir / "checkpoint-4"), model_seed=123, save_steps=4)

    stock_full, ours_full = both(tmp_path / "full", lambda run: run.train(save_steps=4))
    stock, ours = both(tmp_path / "resumed", scenario)

    assert_resumed_exactly(stock, stock_full)
    assert_same_observations(stock, ours)
    assert_resumed_exactly(ours, ours_full)


def test_resume_from_checkpoint_false_trains_from_scratch_as_stock(tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        run.train(crash_at=10)
        run.train(resume_from_checkpoint=False)

    stock, ours = both(tmp_path, scenario)

    assert stock.state is not None and stock.state["log_history"][0]["step"] == 1  # the stock half: from step 1
    assert_same_observations(stock, ours)


@pytest.mark.parametrize(
    ("resume_from_checkpoint", "message"),
    [(True, "No valid checkpoint found in output directory"), ("missing", "Can't find a valid checkpoint at")],
    ids=["true-without-checkpoints", "path-that-does-not-exist"],
)
def test_resume_without_a_checkpoint_raises_the_stock_error(
    tmp_path: Path, resume_from_checkpoint: Any, message: str,
) -> None:
    def scenario(run: Run) -> None:
        target = str(run.output_dir / "checkpoint-7") if resume_from_checkpoint == "missing" else True
        run.train(resume_from_checkpoint=target)

    stock, ours = both(tmp_path, scenario)

    assert isinstance(stock.error, ValueError) and message in str(stock.error)
    assert_same_observations(stock, ours)
    assert message in str(ours.error)


def test_early_stopping_state_survives_a_resume_as_stock(tmp_path: Path) -> None:
    # Evaluations every 2 steps; the best is at step 4, then two worse ones: patience 2 stops at step 8.
    # Interrupted at step 7, the resumed run must remember the one worse evaluation (step 6) it already saw.
    metric = {2: 5.0, 4: 3.0, 6: 4.0, 8: 4.5, 10: 1.0}
    args = dict(eval_strategy="steps", eval_steps=2, save_steps=2, metric_for_best_model="scripted_loss",
                restore_callback_states_from_checkpoint=True)

    def train(run: Run, **options: Any) -> None:
        run.train(compute_metrics=Scripted("scripted_loss", metric), callbacks=[EarlyStoppingCallback(2)],
                  **args, **options)

    stock_full, ours_full = both(tmp_path / "full", train)
    stock, ours = both(tmp_path / "resumed", lambda run: (train(run, crash_at=7),
                                                           train(run, resume_from_checkpoint=True, model_seed=123)))

    assert stock_full.state is not None and stock_full.state["global_step"] == 8  # stopped early
    assert stock.state is not None and stock.state["global_step"] == 8
    assert stock.checkpoint_state(8)["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"] == {
        "early_stopping_patience_counter": 2}
    assert_resumed_exactly(stock, stock_full)
    assert_same_observations(stock, ours)
    assert_resumed_exactly(ours, ours_full)


def test_save_only_model_checkpoints_resume_as_stock(tmp_path: Path) -> None:
    # Weights only: the stock resume loads them and starts a fresh optimizer, schedule and RNG.
    def scenario(run: Run) -> None:
        run.train(crash_at=10, save_only_model=True)
        run.train(resume_from_checkpoint=True, model_seed=123, save_only_model=True)

    stock, ours = both(tmp_path, scenario)

    assert_same_observations(stock, ours)


def test_a_damaged_weights_file_is_refused_where_stock_trains_on_from_it(tmp_path: Path) -> None:
    """Deliberately better: a flipped bit in checkpoint-8's weights. Stock resumes from the damaged weights and
    ends elsewhere than the uninterrupted run; ours refuses with `CheckpointCorruptError` naming the file."""
    def scenario(run: Run) -> None:
        run.train(crash_at=10)
        weights = run.output_dir / "checkpoint-8" / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-4] ^= 0x01  # the lowest mantissa bit of the last float: a tiny, silent change of one weight
        weights.write_bytes(bytes(data))
        run.train(resume_from_checkpoint=True, model_seed=123)

    stock_full, _ = both(tmp_path / "full", lambda run: run.train())
    stock, ours = both(tmp_path / "resumed", scenario)

    assert stock.error is None and stock.weights is not None and stock_full.weights is not None
    assert any(not torch.equal(stock.weights[k], stock_full.weights[k]) for k in stock.weights)
    assert isinstance(ours.error, CheckpointCorruptError)
    assert "model.safetensors" in str(ours.error)


def reshard_weights(checkpoint: Path) -> None:
    """Replace `model.safetensors` by two shards and their index, as transformers' own checkpoint tests do."""
    weights = load_file(checkpoint / "model.safetensors")
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({key: weights[key] for key in keys}, checkpoint / shard, metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())},
             "weight_map": {key: shard for shard, keys in shards.items() for key in keys}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (checkpoint / "model.safetensors").unlink()


def test_resharded_weights_are_refused_with_the_way_out_named(tmp_path: Path) -> None:
    """Stock resumes from a checkpoint whose weights the user re-sharded; ours keeps refusing a checkpoint that
    no longer matches its manifest (deliberately), and the error names the fix: `ckpt-callbacks reseal`."""
    def scenario(run: Run) -> None:
        run.train(crash_at=10)
        reshard_weights(run.output_dir / "checkpoint-8")
        run.train(resume_from_checkpoint=True, model_seed=123)

    stock_full, _ = both(tmp_path / "full", lambda run: run.train())
    stock, ours = both(tmp_path / "resumed", scenario)

    assert_resumed_exactly(stock, stock_full)
    assert isinstance(ours.error, CheckpointCorruptError)
    assert "checkpoint-8" in str(ours.error) and "ckpt-callbacks reseal" in str(ours.error)


def test_resharded_weights_resume_as_stock_after_reseal(tmp_path: Path) -> None:
    def scenario(run: Run) -> None:
        run.train(crash_at=10)
        checkpoint = run.output_dir / "checkpoint-8"
        reshard_weights(checkpoint)
        if run.with_callback:  # the documented way to accept a deliberately changed checkpoint
            resealed = cli("reseal", checkpoint)
            assert resealed.returncode == 0, resealed.stderr
        run.train(resume_from_checkpoint=True, model_seed=123)

    stock_full, ours_full = both(tmp_path / "full", lambda run: run.train())
    stock, ours = both(tmp_path / "resumed", scenario)

    assert_resumed_exactly(stock, stock_full)
    assert_same_observations(stock, ours)
    assert_resumed_exactly(ours, ours_full)
