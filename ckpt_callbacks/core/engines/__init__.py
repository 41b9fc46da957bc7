"""Built-in engines; importing this package registers them."""

from ckpt_callbacks.core.engines.base import (
    CheckpointEngine,
    EngineConfig,
    get_engine_class,
    registered_engines,
)
from ckpt_callbacks.core.engines.dcp_engine import DCPEngine
from ckpt_callbacks.core.engines.hf_engine import HFEngine
from ckpt_callbacks.core.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.engines.torch_engine import TorchEngine

__all__ = [
    "CheckpointEngine", "DCPEngine", "EngineConfig", "HFEngine", "SafetensorsEngine", "TorchEngine",
    "get_engine_class", "registered_engines",
]
