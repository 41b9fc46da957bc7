"""Lightning adapter for `import pytorch_lightning`: the same `CheckpointIOPlugin` and `CheckpointCallback`
as `ckpt_callbacks.lightning`, built on `pytorch_lightning`'s base classes (which `pytorch_lightning.Trainer`
requires; the `lightning.pytorch` ones are different classes)."""

from __future__ import annotations

try:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpt_callbacks.pytorch_lightning needs the `pytorch_lightning` package: pip install pytorch-lightning. "
        "With `import lightning.pytorch`, use ckpt_callbacks.lightning instead."
    ) from exc

from ckpt_callbacks.lightning.arguments import with_flag_parameters
from ckpt_callbacks.lightning.callback import CheckpointCallbackLogic
from ckpt_callbacks.lightning.plugin import CheckpointIOLogic


@with_flag_parameters
class CheckpointIOPlugin(CheckpointIOLogic, CheckpointIO):
    __doc__ = CheckpointIOLogic.__doc__


@with_flag_parameters
class CheckpointCallback(CheckpointCallbackLogic, ModelCheckpoint):
    __doc__ = CheckpointCallbackLogic.__doc__


__all__ = ["CheckpointCallback", "CheckpointIOPlugin"]
