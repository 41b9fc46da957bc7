"""Parity of configuration: command lines parsed with `HfArgumentParser`, and flag mistakes reported as the
stock Trainer reports them (same exception type, the flag or metric named)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import TRAIN, tiny_gpt2
from tests.parity.hf.differential import Run, assert_same_observations, both


@dataclass
class ScriptArguments:
    """A user's own dataclass, parsed along with the Trainer's and the callback's."""

    model_name: str = field(default="tiny-gpt2", metadata={"help": "Which model to fine-tune."})
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank."})


def command_line(output_dir: Path) -> list[str]:
    return ["--output_dir", str(output_dir), "--save_steps", "7", "--save_total_limit", "2", "--max_steps", "15",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--report_to", "none",
            "--use_cpu", "--disable_tqdm", "true", "--seed", "42", "--model_name", "gpt2-small", "--lora_rank", "4"]


def train_with(training_args: TrainingArguments, callbacks: list[Any]) -> Trainer:
    trainer = Trainer(model=tiny_gpt2(0), args=training_args, train_dataset=TRAIN,
                      data_collator=default_data_collator, callbacks=callbacks)
    trainer.train()
    return trainer


def test_hf_argument_parser_parses_training_checkpoint_and_user_arguments_together(tmp_path: Path) -> None:
    stock_args, stock_script = HfArgumentParser((TrainingArguments, ScriptArguments)).parse_args_into_dataclasses(
        command_line(tmp_path / "stock"))
    parser = HfArgumentParser((TrainingArguments, CheckpointArguments, ScriptArguments))  # the issue: raised here
    ours_args, checkpoint_args, ours_script = parser.parse_args_into_dataclasses(
        [*command_line(tmp_path / "ours"), "--async_save", "false", "--max_shard_size", "1MB"])

    # Adding CheckpointArguments changes nothing in how the Trainer's and the user's flags are parsed ...
    ours_fields = {k: v for k, v in ours_args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    assert ours_fields == {k: v for k, v in stock_args.to_dict().items() if k not in ("output_dir", "logging_dir")}
    assert ours_script == stock_script == ScriptArguments("gpt2-small", 4)
    # ... the callback's own flags reach it ...
    assert checkpoint_args.async_save is False and checkpoint_args.max_shard_size == "1MB"
    # ... and the shared flags (--save_steps 7 --save_total_limit 2) mean for the callback what they mean for stock.
    train_with(stock_args, [])
    train_with(ours_args, [CheckpointCallback(checkpoint_args)])
    stock_steps = sorted(p.name for p in (tmp_path / "stock").glob("checkpoint-*"))
    assert stock_steps == ["checkpoint-14", "checkpoint-15"]
    assert sorted(p.name for p in (tmp_path / "ours").glob("checkpoint-*")) == stock_steps


HELP_SCRIPT = textwrap.dedent("""
    import sys
    from dataclasses import dataclass
    from transformers import HfArgumentParser, TrainingArguments

    @dataclass
    class ScriptArguments:
        model_name: str = "tiny-gpt2"

    classes = [TrainingArguments, ScriptArguments]
    if sys.argv[1] == "ours":
        from ckpt_callbacks import CheckpointArguments
        classes.insert(1, CheckpointArguments)
    HfArgumentParser(classes).parse_args_into_dataclasses(["--help"])
""")


@pytest.mark.parametrize("half", ["stock", "ours"])
def test_help_of_the_combined_parser_lists_every_flag(half: str) -> None:
    proc = subprocess.run([sys.executable, "-c", HELP_SCRIPT, half], capture_output=True, text=True, timeout=120)

    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--output_dir", "--save_steps", "--model_name", *(("--async_save", "--max_shard_size") if half == "ours" else ())):
        assert flag in proc.stdout, flag


EVALUATE_EVERY_4 = dict(eval_strategy="steps", eval_steps=4, save_steps=4)


@pytest.mark.parametrize("given_to", ["callback", "both"])
def test_a_best_metric_that_is_never_logged_raises_at_the_first_evaluation_as_stock(tmp_path: Path, given_to: str) -> None:
    """Stock: `save_strategy="best", metric_for_best_model="bleu"` raises a KeyError at the first evaluation,
    naming `eval_bleu` and the metrics there are. Given to the callback only, the same must happen."""
    def scenario(run: Run) -> None:
        if run.with_callback and given_to == "callback":
            run.train(save_strategy="no", eval_strategy="steps", eval_steps=4,
                      callback_flags=dict(save_strategy="best", metric_for_best_model="bleu"))
        else:
            run.train(save_strategy="best", metric_for_best_model="bleu", **EVALUATE_EVERY_4)

    stock, ours = both(tmp_path, scenario)

    assert isinstance(stock.error, KeyError) and stock.state is not None and stock.state["global_step"] == 4
    assert "eval_bleu" in str(stock.error) and "eval_loss" in str(stock.error)
    assert_same_observations(stock, ours)
    assert "eval_bleu" in str(ours.error) and "eval_loss" in str(ours.error)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (dict(save_strategy="best"), "metric_for_best_model"),
        (dict(load_best_model_at_end=True, save_strategy="epoch", eval_strategy="steps"), "load_best_model_at_end"),
    ],
    ids=["best-without-metric", "load-best-with-mismatched-strategies"],
)
def test_flag_mistakes_raise_the_stock_exception_naming_the_flag(
    tmp_path: Path, flags: dict[str, Any], named: str,
) -> None:
    """Stock refuses these in `TrainingArguments`; given to the callback instead, they are refused as well,
    before training starts, with the same exception type and the flag named."""
    eval_strategy = flags.get("eval_strategy", "no")
    callback_flags = {k: v for k, v in flags.items() if k != "eval_strategy"}

    def scenario(run: Run) -> None:
        if run.with_callback:
            run.train(save_strategy="no", eval_strategy=eval_strategy, callback_flags=callback_flags)
        else:
            run.train(**flags)

    stock, ours = both(tmp_path, scenario)

    assert isinstance(stock.error, ValueError) and named in str(stock.error)
    assert isinstance(ours.error, ValueError), f"stock raised {stock.error!r}; ours raised {ours.error!r}"
    assert named in str(ours.error)
    assert not ours.checkpoints and (ours.state is None or ours.state["global_step"] == 0)
