"""`CheckpointArguments`: every flag the library understands, its default and its validation.

Flag names follow `transformers.TrainingArguments` wherever it has one, so that
`HfArgumentParser` users and Trainer users find what they already know.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

SAVE_STRATEGIES = ("no", "steps", "epoch", "best")
VERIFY_MODES = ("checksum", "size", "none")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    None: 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
}


def parse_size(value: int | str) -> int:
    """Parse a size in Hugging Face syntax ("5GB" = 5*10**9, "500MiB", 1024) into bytes.

    Example:
        >>> parse_size("500MB")
        500000000
    """
    if isinstance(value, int):
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(
            f"max_shard_size={value!r} is not a size. Use an int of bytes or a string such as '500MB' or '5GB'."
        )
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.upper() if unit else None])


def _help(text: str, **metadata: Any) -> dict[str, Any]:
    return {"help": text, **metadata}


if TYPE_CHECKING:
    _Field = dataclasses.Field[Any]
else:
    _Field = dataclasses.Field  # not subscriptable at run time on every supported Python


class _FlagOfTrainingArguments(_Field):
    """A field `TrainingArguments` also has (`output_dir`, `save_steps`, ...), as `HfArgumentParser` sees it.

    `HfArgumentParser((TrainingArguments, CheckpointArguments))` turns every init field of both into an option,
    and two options of one name are an argparse error. Parsed beside another dataclass that has the same field,
    this field does not count as an init field (the parser neither adds an option for it nor passes it in), so the
    flag is parsed once, into `TrainingArguments`, whose values the HF callback reads. Everywhere else (the
    generated `__init__`, `dataclasses.replace`, `HfArgumentParser(CheckpointArguments)` alone) it is a plain
    field.
    """

    __slots__ = ()

    @property
    def init(self) -> bool:
        return bool(_FIELD_INIT.__get__(self)) and not _parsed_beside_a_dataclass_with(self.name)

    @init.setter
    def init(self, value: bool) -> None:
        _FIELD_INIT.__set__(self, value)


_FIELD_INIT = dataclasses.Field.__dict__["init"]  # the slot that holds a field's own `init`


def _parsed_beside_a_dataclass_with(name: str) -> bool:
    """Whether an `HfArgumentParser` up the call stack also parses another dataclass with a field `name`."""
    frame: FrameType | None = sys._getframe(2)
    for _ in range(6):
        if frame is None:
            return False
        parser = frame.f_locals.get("self")
        if any(cls.__name__ == "HfArgumentParser" for cls in type(parser).__mro__):
            others = [t for t in getattr(parser, "dataclass_types", ()) if t is not CheckpointArguments]
            return any(name in getattr(t, "__dataclass_fields__", {}) for t in others)
        frame = frame.f_back
    return False


def normalize_metric_name(name: str) -> str:
    """Apply the stock Trainer's rule: metric names get an `eval_` prefix if they lack one."""
    return name if name.startswith("eval_") else f"eval_{name}"


def infer_greater_is_better(metric: str) -> bool:
    """The stock Trainer's inference: lower is better exactly when the name ends in `loss`."""
    return not metric.endswith("loss")


@dataclass
class CheckpointArguments:
    """When to save, what to keep and how to write. Parseable by `transformers.HfArgumentParser`."""

    output_dir: str | None = field(
        default=None, metadata=_help("Where checkpoint-{step} folders go (HF: the Trainer's output_dir).")
    )
    save_strategy: str = field(
        default="steps", metadata=_help("When to save: 'no', 'steps', 'epoch' or 'best'.", choices=list(SAVE_STRATEGIES))
    )
    save_steps: float = field(
        default=500, metadata=_help("Save every N optimizer steps; a float in (0, 1) is a ratio of the total steps.")
    )
    save_total_limit: int | None = field(
        default=None, metadata=_help("Keep at most N checkpoints, the newest; a tracked best is always kept and counts toward N.")
    )
    save_best_limit: int | None = field(
        default=None, metadata={"help": "Also keep the N best checkpoints by metric_for_best_model."}
    )
    metric_for_best_model: str | None = field(
        default=None, metadata=_help("Metric that ranks checkpoints; the 'eval_' prefix is optional.")
    )
    greater_is_better: bool | None = field(
        default=None, metadata=_help("Whether a larger metric is better; inferred (False for names ending in 'loss').")
    )
    load_best_model_at_end: bool = field(
        default=False, metadata=_help("Restore the best weights when training ends.")
    )
    save_only_model: bool = field(
        default=False, metadata=_help("Save weights only (no optimizer, scheduler or RNG): such checkpoints cannot resume.")
    )
    save_time_interval: float | None = field(
        default=None, metadata={"help": "Also save every N seconds of training."}
    )
    save_on_signal: bool = field(
        default=True, metadata={"help": "On SIGTERM/SIGUSR1 save at the next step boundary, then stop cleanly."}
    )
    async_save: bool = field(
        default=True, metadata={"help": "Keep training while the checkpoint is written in the background."}
    )
    export_at_end: bool = field(
        default=True, metadata={"help": "Write a sharded safetensors export of the final (or best) model at train end."}
    )
    export_dir: str | None = field(default=None, metadata={"help": "Export folder; default {output_dir}/export."})
    max_shard_size: str = field(
        default="5GB", metadata={"help": "Shard size of the export, HF syntax ('500MB', or bytes)."}
    )
    verify_on_load: str = field(
        default="checksum", metadata={"help": "Check on load: 'checksum', 'size' or 'none'.", "choices": list(VERIFY_MODES)}
    )
    engine: str | None = field(
        default=None, metadata={"help": "Registered CheckpointEngine name: 'hf', 'torch', 'safetensors', 'dcp', or your own."}
    )
    max_in_flight: int = field(
        default=1, metadata={"help": "Async saves allowed in flight at once (each holds one staged copy in host memory)."}
    )
    on_save_error: str = field(
        default="raise",
        metadata={"help": "A failed save: 'raise' stops training with the error; 'warn' logs it and training goes on.",
                  "choices": ["raise", "warn"]},
    )
    fallback_to_verified: bool = field(
        default=False,
        metadata={"help": "When the newest checkpoint fails verification, resume from the newest one that verifies (logged)."},
    )

    def __post_init__(self) -> None:
        self.max_shard_size = str(self.max_shard_size)
        self._validate()

    def _validate(self) -> None:
        if self.save_strategy not in SAVE_STRATEGIES:
            raise ValueError(
                f"save_strategy={self.save_strategy!r} is not supported. Use one of {', '.join(SAVE_STRATEGIES)}."
            )
        if self.save_steps <= 0:
            raise ValueError(f"save_steps={self.save_steps} must be > 0: an int number of steps or a ratio in (0, 1).")
        if self.save_steps > 1 and self.save_steps != int(self.save_steps):
            raise ValueError(
                f"save_steps={self.save_steps}: a value above 1 must be a whole number of steps; "
                "use a float in (0, 1) for a ratio of the total steps."
            )
        for name in ("save_total_limit", "save_best_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1, or None to keep every checkpoint.")
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            # The stock Trainer's default when best-model loading is on.
            self.metric_for_best_model = "loss"
        if self.save_strategy == "best" and self.metric_for_best_model is None:
            raise ValueError(
                "save_strategy='best' needs metric_for_best_model: set it, e.g. metric_for_best_model='eval_loss'."
            )
        if self.save_best_limit is not None and self.metric_for_best_model is None:
            raise ValueError(
                "save_best_limit needs metric_for_best_model to rank checkpoints: set it, or drop save_best_limit."
            )
        if self.save_time_interval is not None and self.save_time_interval <= 0:
            raise ValueError(f"save_time_interval={self.save_time_interval} must be a positive number of seconds.")
        if self.verify_on_load not in VERIFY_MODES:
            raise ValueError(
                f"verify_on_load={self.verify_on_load!r} is not supported. Use one of {', '.join(VERIFY_MODES)}."
            )
        if self.on_save_error not in ("raise", "warn"):
            raise ValueError(f"on_save_error={self.on_save_error!r} is not supported. Use 'raise' or 'warn'.")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight={self.max_in_flight} must be >= 1.")
        parse_size(self.max_shard_size)
        self._validate_export_dir()
        if self.engine is not None:
            # Imported here: the registry imports engines, which import this module's helpers.
            from ckpt_callbacks.core.format.engines import get_engine_class

            get_engine_class(self.engine)

    def _validate_export_dir(self) -> None:
        if self.export_dir is None:
            return
        if "://" in self.export_dir:
            raise ValueError(f"export_dir={self.export_dir!r}: the export is written to a local folder. Give a local "
                             "path (and copy it to remote storage afterwards), or set export_at_end=False.")
        if self.output_dir is not None and "://" not in self.output_dir:
            # Imported here: the export module imports this one.
            from ckpt_callbacks.core.export import export_path_problem

            problem = export_path_problem(self.output_dir, self.export_dir)
            if problem is not None:
                raise ValueError(f"export_dir={self.export_dir!r} {problem}. Choose a folder of its own, e.g. "
                                 f"export_dir={str(Path(self.output_dir) / 'export')!r} (the default).")

    @property
    def metric_key(self) -> str | None:
        """The metric name as it appears in evaluation results (`eval_` prefixed)."""
        return normalize_metric_name(self.metric_for_best_model) if self.metric_for_best_model else None

    @property
    def metric_greater_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return infer_greater_is_better(self.metric_key or "loss")

    @property
    def max_shard_bytes(self) -> int:
        return parse_size(self.max_shard_size)

    def replace(self, **changes: Any) -> CheckpointArguments:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def non_default_fields(self) -> dict[str, Any]:
        """The fields whose value differs from the class default: what a user set explicitly."""
        defaults = CheckpointArguments()
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(defaults, f.name)
        }


# The save flags TrainingArguments has under the same name and meaning (see `_FlagOfTrainingArguments`).
TRAINING_ARGUMENTS_FLAGS = ("output_dir", "save_strategy", "save_steps", "save_total_limit", "metric_for_best_model",
                            "greater_is_better", "load_best_model_at_end", "save_only_model")
for _name in TRAINING_ARGUMENTS_FLAGS:
    CheckpointArguments.__dataclass_fields__[_name].__class__ = _FlagOfTrainingArguments
