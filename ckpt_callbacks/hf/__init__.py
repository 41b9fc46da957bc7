"""transformers.Trainer adapter: `CheckpointCallback` maps Trainer events onto the core (no file I/O here)."""

try:
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ckpt_callbacks.hf needs transformers and accelerate: pip install 'ckpt-callbacks[hf]'."
    ) from exc

from ckpt_callbacks.hf.callback import CheckpointCallback

__all__ = ["CheckpointCallback"]
