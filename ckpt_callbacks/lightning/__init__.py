"""Lightning adapter for `import lightning.pytorch`: `CheckpointIOPlugin` and `CheckpointCallback`.

    from ckpt_callbacks import CheckpointArguments
    from ckpt_callbacks.lightning import CheckpointCallback, CheckpointIOPlugin
    trainer = L.Trainer(plugins=[CheckpointIOPlugin()],
                        callbacks=[CheckpointCallback(CheckpointArguments(save_steps=100))])
    trainer.fit(model, datamodule=dm, ckpt_path="last")

`import pytorch_lightning` users take the same names from `ckpt_callbacks.pytorch_lightning`: Lightning checks
plugins and callbacks against its own namespace's classes, so the two sets are not interchangeable.

The classes load lazily, so `ckpt_callbacks.pytorch_lightning` can share this package's modules in an
environment that has `pytorch_lightning` but not `lightning`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ckpt_callbacks.lightning.adapter import CheckpointCallback, CheckpointIOPlugin

__all__ = ["CheckpointCallback", "CheckpointIOPlugin"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ckpt_callbacks.lightning import adapter

        return getattr(adapter, name)
    raise AttributeError(f"module 'ckpt_callbacks.lightning' has no attribute {name!r}")
