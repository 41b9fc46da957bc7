"""Lightning adapter for `import pytorch_lightning`: the same `CheckpointIOPlugin` and `CheckpointCallback`
as `ckpt_callbacks.lightning`, built on `pytorch_lightning`'s base classes (which `pytorch_lightning.Trainer`
requires; the `lightning.pytorch` ones are different classes)."""

from __future__ import annotations

try:
    from pytorch_lightning.callbacks import OnExceptionCheckpoint
    from pytorch_lightning.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpt_callbacks.pytorch_lightning needs the `pytorch_lightning` package: pip install pytorch-lightning. "
        "With `import lightning.pytorch`, use ckpt_callbacks.lightning instead."
    ) from exc

from ckpt_callbacks.lightning.callback import CheckpointCallbackLogic
from ckpt_callbacks.lightning.plugin import CheckpointIOLogic


class CheckpointIOPlugin(CheckpointIOLogic, CheckpointIO):
    __doc__ = CheckpointIOLogic.__doc__


class CheckpointCallback(CheckpointCallbackLogic, OnExceptionCheckpoint):
    __doc__ = CheckpointCallbackLogic.__doc__


__all__ = ["CheckpointCallback", "CheckpointIOPlugin"]
