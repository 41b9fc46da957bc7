"""Built-in engines; importing this package registers them."""

from ckpt_callbacks.core.format.engines.base import (
    CheckpointEngine,
    EngineConfig,
    get_engine_class,
    registered_engines,
)
from ckpt_callbacks.core.format.engines.dcp_engine import DCPEngine
from ckpt_callbacks.core.format.engines.hf_engine import HFEngine
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine
from ckpt_callbacks.core.format.engines.torch_engine import TorchEngine

__all__ = [
    "CheckpointEngine", "DCPEngine", "EngineConfig", "HFEngine", "SafetensorsEngine", "TorchEngine",
    "get_engine_class", "registered_engines",
]
