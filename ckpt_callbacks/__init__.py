"""ckpt_callbacks: exact, crash-safe, non-blocking checkpoints for transformers.Trainer, Lightning and plain PyTorch."""

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.format.engines import CheckpointEngine, EngineConfig, registered_engines
from ckpt_callbacks.core.manager import CheckpointInfo, CheckpointManager, Transaction
from ckpt_callbacks.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWriteError,
    InvalidOperationError,
)

__version__ = "0.1.0"

__all__ = [
    "CheckpointArguments",
    "CheckpointCorruptError",
    "CheckpointEngine",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "EngineConfig",
    "InvalidOperationError",
    "Transaction",
    "registered_engines",
]
