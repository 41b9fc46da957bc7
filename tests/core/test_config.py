"""CheckpointArguments: defaults, validation messages, HfArgumentParser compatibility."""

from __future__ import annotations

import pytest

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.config import parse_size


def test_defaults_match_the_spec() -> None:
    args = CheckpointArguments()
    assert (args.save_strategy, args.save_steps, args.async_save, args.save_on_signal) == ("steps", 500, True, True)
    assert (args.export_at_end, args.max_shard_size, args.verify_on_load, args.engine) == (True, "5GB", "checksum", None)


@pytest.mark.parametrize(
    ("kwargs", "names_in_message"),
    [
        ({"save_strategy": "best"}, ["save_strategy='best'", "metric_for_best_model"]),
        ({"save_strategy": "sometimes"}, ["save_strategy", "steps"]),
        ({"save_steps": 0}, ["save_steps"]),
        ({"save_steps": 2.5}, ["save_steps", "ratio"]),
        ({"save_total_limit": 0}, ["save_total_limit"]),
        ({"save_best_limit": 2}, ["save_best_limit", "metric_for_best_model"]),
        ({"verify_on_load": "md5"}, ["verify_on_load", "checksum"]),
        ({"max_shard_size": "lots"}, ["max_shard_size", "5GB"]),
        ({"engine": "nope"}, ["engine='nope'", "safetensors"]),
        ({"save_time_interval": -1}, ["save_time_interval"]),
    ],
)
def test_invalid_combinations_name_the_flag_and_the_fix(kwargs: dict, names_in_message: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        CheckpointArguments(**kwargs)
    for fragment in names_in_message:
        assert fragment in str(info.value)


def test_metric_rules_follow_the_stock_trainer() -> None:
    loss = CheckpointArguments(metric_for_best_model="loss")
    assert loss.metric_key == "eval_loss" and loss.metric_greater_is_better is False
    accuracy = CheckpointArguments(metric_for_best_model="eval_accuracy")
    assert accuracy.metric_key == "eval_accuracy" and accuracy.metric_greater_is_better is True
    explicit = CheckpointArguments(metric_for_best_model="loss", greater_is_better=True)
    assert explicit.metric_greater_is_better is True
    assert CheckpointArguments(load_best_model_at_end=True).metric_for_best_model == "loss"


def test_sizes_use_hugging_face_units() -> None:
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1MiB") == 2**20
    assert parse_size(1234) == 1234


def test_hf_argument_parser_reads_every_flag() -> None:
    transformers = pytest.importorskip("transformers")
    parser = transformers.HfArgumentParser(CheckpointArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "runs/x", "--save_strategy", "best", "--metric_for_best_model", "accuracy",
         "--save_steps", "0.25", "--save_total_limit", "3", "--async_save", "false", "--max_shard_size", "200MB",
         "--engine", "torch"]
    )
    assert args.output_dir == "runs/x" and args.save_strategy == "best" and args.save_steps == 0.25
    assert args.save_total_limit == 3 and args.async_save is False and args.max_shard_bytes == 200 * 10**6
    assert args.engine == "torch" and args.metric_key == "eval_accuracy"
    with pytest.raises(ValueError, match="metric_for_best_model"):
        parser.parse_args_into_dataclasses(["--save_strategy", "best"])
