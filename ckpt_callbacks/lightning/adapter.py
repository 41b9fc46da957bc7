"""The adapter's classes on `lightning.pytorch` base classes (behaviour in `plugin.py` and `callback.py`)."""

from __future__ import annotations

try:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpt_callbacks.lightning needs the `lightning` package: pip install 'ckpt-callbacks[lightning]'. "
        "With `import pytorch_lightning`, use ckpt_callbacks.pytorch_lightning instead."
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
