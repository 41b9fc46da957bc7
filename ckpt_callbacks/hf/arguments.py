"""Which flags the HF adapter runs with: the Trainer's `TrainingArguments`, overridden by the user's.

`CheckpointCallback()` with no arguments checkpoints exactly as the Trainer was
configured to; flags given to the callback win. Whether the Trainer's own
schedule or the core's policy then decides when to save is the run
controller's call (`core/run.py`), from both sets of flags.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ckpt_callbacks.config import CheckpointArguments
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


def trainer_tracks_best(training_args: Any) -> bool:
    """Whether the Trainer itself ranks checkpoints (sets `state.best_global_step`): it does with a metric under
    the strategies that save during training."""
    return training_args.metric_for_best_model is not None and enum_value(training_args.save_strategy) in TRACKED_BY_TRAINER


def enum_value(value: Any) -> Any:
    """The string of a transformers enum flag (SaveStrategy.STEPS -> 'steps'); strings pass through."""
    return getattr(value, "value", value)
