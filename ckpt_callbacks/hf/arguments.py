"""Which flags the HF adapter runs with: the Trainer's `TrainingArguments`, overridden by the user's.

`CheckpointCallback()` with no arguments checkpoints exactly as the Trainer was
configured to; flags given to the callback win. Whether the Trainer's own
schedule or the core's policy then decides when to save is the run
controller's call (`core/run.py`), from both sets of flags.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

from ckpt_callbacks.config import CheckpointArguments, infer_greater_is_better
from ckpt_callbacks.core.save.policy import timing_of

# The save flags TrainingArguments has under the same name and meaning.
TRAINER_FLAGS = (
    "save_strategy",
    "save_steps",
    "save_total_limit",
    "metric_for_best_model",
    "greater_is_better",
    "load_best_model_at_end",
    "save_only_model",
)
_FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(CheckpointArguments))
TRACKED_BY_TRAINER = ("steps", "epoch", "best")  # strategies under which the Trainer sets best_global_step


def check_flag_names(flags: Mapping[str, Any]) -> None:
    """Reject unknown keyword flags at construction, listing the valid ones."""
    unknown = sorted(set(flags) - _FIELD_NAMES)
    if unknown:
        raise TypeError(
            f"CheckpointCallback got unknown flag(s) {', '.join(unknown)}. "
            f"Valid flags are the CheckpointArguments fields: {', '.join(sorted(_FIELD_NAMES))}."
        )


def flags_from_training_args(training_args: Any) -> dict[str, Any]:
    """The save flags of a `TrainingArguments`, in `CheckpointArguments` terms."""
    limit = training_args.save_total_limit
    return {
        "save_strategy": enum_value(training_args.save_strategy),
        "save_steps": training_args.save_steps,
        # TrainingArguments treats None and values <= 0 alike: keep everything.
        "save_total_limit": limit if limit is not None and limit > 0 else None,
        "metric_for_best_model": training_args.metric_for_best_model,
        "greater_is_better": training_args.greater_is_better,
        "load_best_model_at_end": training_args.load_best_model_at_end,
        "save_only_model": training_args.save_only_model,
    }


def resolve_arguments(training_args: Any, overrides: Mapping[str, Any]) -> CheckpointArguments:
    """The flags the callback runs with: the Trainer's, then the user's on top (validated together)."""
    return CheckpointArguments(**{**flags_from_training_args(training_args), **overrides})


def check_schedule_conflict(effective: CheckpointArguments, training_args: Any) -> None:
    """Refuse flags the Trainer's `best` strategy would overrule: the stock loop sets `control.should_save` from its
    own metric after every evaluation, after every callback has run."""
    trainer_flags = CheckpointArguments(**flags_from_training_args(training_args))
    if trainer_flags.save_strategy == "best" and timing_of(effective) != timing_of(trainer_flags):
        raise ValueError(
            f"TrainingArguments(save_strategy='best') decides saves after every evaluation and would overrule "
            f"CheckpointCallback(save_strategy={effective.save_strategy!r}, metric_for_best_model="
            f"{effective.metric_for_best_model!r}). Set TrainingArguments(save_strategy='no') and let the callback "
            "decide, or give both the same strategy and metric."
        )


def check_load_best_strategies(effective: CheckpointArguments, training_args: Any) -> None:
    """The stock `TrainingArguments` rule for `load_best_model_at_end`, applied to the flags the callback runs with
    (the Trainer's evaluation schedule, the callback's save flags): the same `ValueError` where stock raises."""
    if not effective.load_best_model_at_end or effective.save_strategy == "best":
        return
    eval_strategy = enum_value(training_args.eval_strategy)
    if eval_strategy != effective.save_strategy:
        raise ValueError(
            '--load_best_model_at_end requires the save and eval strategy to match, except when --save_strategy="best", '
            f"but found\n- Evaluation strategy: {eval_strategy}\n- Save strategy: {effective.save_strategy}. "
            "(load_best_model_at_end and save_strategy are CheckpointCallback flags here; eval_strategy is the "
            "Trainer's.) Give TrainingArguments(eval_strategy=...) the callback's save_strategy, or set "
            "save_strategy='best'.")
    save_steps, eval_steps = effective.save_steps, training_args.eval_steps
    if eval_strategy != "steps" or eval_steps is None:
        return
    if eval_steps < 1 or save_steps < 1:
        if not (eval_steps < 1 and save_steps < 1):
            raise ValueError(
                "--load_best_model_at_end requires the saving steps to be a multiple of the evaluation steps, which "
                f"cannot get guaranteed when mixing ratio and absolute steps for save_steps {save_steps} and "
                f"eval_steps {eval_steps}.")
        if round(save_steps * 1_000_000) % round(eval_steps * 1_000_000) != 0:
            raise ValueError(
                "--load_best_model_at_end requires the saving steps to be a multiple of the evaluation steps, but "
                f"found {save_steps}, which is not a multiple of {eval_steps}.")
    elif save_steps % eval_steps != 0:
        raise ValueError(
            "--load_best_model_at_end requires the saving steps to be a round multiple of the evaluation steps, but "
            f"found {save_steps}, which is not a round multiple of {eval_steps}.")


def trainer_tracks_best(training_args: Any, effective: CheckpointArguments | None = None) -> bool:
    """Whether the Trainer itself ranks the checkpoints of this run (sets `state.best_global_step`): it does with a
    metric under the strategies that save during training; with `effective`, only when the run ranks them by
    that same metric in the same direction (a metric given to the callback alone is the callback's to track)."""
    if training_args.metric_for_best_model is None or enum_value(training_args.save_strategy) not in TRACKED_BY_TRAINER:
        return False
    if effective is None:
        return True
    trainer_flags = CheckpointArguments(**flags_from_training_args(training_args))
    return (effective.metric_key, effective.metric_greater_is_better) == (
        trainer_flags.metric_key, trainer_flags.metric_greater_is_better)


def training_args_with(training_args: Any, effective: CheckpointArguments) -> Any:
    """What `training_args.bin` records: the Trainer's `TrainingArguments` with the save flags the run saves with
    (a copy, unvalidated; the live arguments are left as they are). The Trainer's own object when they agree."""
    changed = {name: getattr(effective, name) for name in TRAINER_FLAGS
               if getattr(effective, name) != flags_from_training_args(training_args)[name]}
    if not changed:
        return training_args
    recorded = copy.copy(training_args)
    for name, value in changed.items():
        current = getattr(training_args, name)
        if name == "save_strategy" and hasattr(current, "value"):
            value = type(current)(value)  # the SaveStrategy enum, as TrainingArguments holds it
        object.__setattr__(recorded, name, value)
    if recorded.metric_for_best_model is not None and recorded.greater_is_better is None:
        # As TrainingArguments.__post_init__ infers it for a metric given there.
        object.__setattr__(recorded, "greater_is_better", infer_greater_is_better(recorded.metric_for_best_model))
    return recorded


def enum_value(value: Any) -> Any:
    """The string of a transformers enum flag (SaveStrategy.STEPS -> 'steps'); strings pass through."""
    return getattr(value, "value", value)
