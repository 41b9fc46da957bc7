"""Typed keyword parameters for the adapter classes, from `CheckpointArguments` (the one list of flags).

`CheckpointCallback(save_steps=3)` always worked through `**overrides`; tools that read a signature to build a
configuration (jsonargparse, hence `LightningCLI`'s `init_args: {save_steps: 3}`) need each flag as a parameter
of its own, with its type and default. `with_flag_parameters(cls)` gives `cls.__init__` that signature, made from
the dataclass's fields, so the list is never copied by hand:

    CheckpointCallback(*, output_dir: str | None = None, save_strategy: str = 'steps', save_steps: float = 500, ...)

The `args` parameter (a whole `CheckpointArguments`) stays for Python callers; it is not part of the published
signature, so a configuration tool fills the flat flags only and never also a nested copy that the flat defaults
would overwrite.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, TypeVar

from ckpt_callbacks.config import CheckpointArguments

__all__ = ["adapter_classes", "missing_framework", "with_flag_parameters"]

T = TypeVar("T", bound=type)


def flag_parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(CheckpointArguments)
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
            for f in dataclasses.fields(CheckpointArguments) if f.default is not dataclasses.MISSING]


def with_flag_parameters(cls: T) -> T:
    """Publish `cls.__init__(self, *, <every CheckpointArguments flag>)` as its signature."""
    original: Any = cls.__init__  # type: ignore[misc]

    def __init__(self: Any, args: CheckpointArguments | None = None, **overrides: Any) -> None:
        original(self, args, **overrides)

    __init__.__doc__ = original.__doc__
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    __init__.__signature__ = inspect.Signature([self_parameter, *flag_parameters()])  # type: ignore[attr-defined]
    cls.__init__ = __init__  # type: ignore[misc]
    return cls


def missing_framework(package: str, adapter: str, other_import: str, other_adapter: str) -> ImportError:
    """The error of an adapter module imported without its framework, naming the install and the sibling
    adapter (`lightning.pytorch` and `pytorch_lightning` have different classes)."""
    return ImportError(
        f"{adapter} needs the `{package}` package: pip install '{package}'. With `import {other_import}`, use "
        f"{other_adapter} instead.")


def adapter_classes(module: str, model_checkpoint: type, checkpoint_io: type) -> tuple[type, type]:
    """`CheckpointIOPlugin` and `CheckpointCallback` on one Lightning package's base classes (`lightning.pytorch`
    and `pytorch_lightning` have distinct ones, and each Trainer accepts only its own), defined as top-level
    names of `module` so that pickling and LightningCLI's `class_path` find them."""
    from ckpt_callbacks.lightning.callback import CheckpointCallbackLogic
    from ckpt_callbacks.lightning.plugin import CheckpointIOLogic

    made = []
    for name, logic, base in (("CheckpointIOPlugin", CheckpointIOLogic, checkpoint_io),
                              ("CheckpointCallback", CheckpointCallbackLogic, model_checkpoint)):
        cls = type(name, (logic, base), {"__module__": module, "__qualname__": name, "__doc__": logic.__doc__})
        made.append(with_flag_parameters(cls))
    return made[0], made[1]
