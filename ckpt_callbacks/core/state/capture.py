"""What a checkpoint holds: turning live objects into plain state and back.

Anything with `state_dict()`/`load_state_dict()` (modules, optimizers,
schedulers, grad scalers, data positions, user objects) is captured through
those methods; plain dicts, tensors and numbers are stored as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ckpt_callbacks.core.format.safetensors_io import view_key
from ckpt_callbacks.errors import CheckpointError

__all__ = ["RNG_STATE", "Stateful", "capture", "is_module", "restore_into"]

RNG_STATE = "rng"


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any) -> Any: ...


def capture(objects: Mapping[str, Any]) -> dict[str, Any]:
    """The state of each named object: `state_dict()` where it has one, the value itself otherwise."""
    return {name: obj.state_dict() if isinstance(obj, Stateful) else obj for name, obj in objects.items()}


def restore_into(name: str, target: Any, state: Any) -> Any:
    """Load `state` into `target` in place when it is `Stateful`; return the state either way."""
    if not isinstance(target, Stateful):
        return state
    try:
        if is_module(target):
            _load_module_state(target, state)
        else:
            target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(
            f"Could not load the saved '{name}' state into {type(target).__name__}: {exc}. "
            "The checkpoint was written for a different model or optimizer configuration; "
            "build the same objects as the run that saved it, or load a matching checkpoint.",
        ) from exc
    return state


def is_module(target: Any) -> bool:
    return callable(getattr(target, "named_parameters", None))


def _load_module_state(module: Any, state: Mapping[str, Any]) -> None:
    """`load_state_dict` that accepts checkpoints storing tied weights once (as safetensors and the stock
    Trainer do): a missing key is fine when it shares memory with a key that was loaded."""
    result = module.load_state_dict(state, strict=False)
    own = module.state_dict()
    loaded_views = {view_key(own[name]) for name in state if name in own}
    missing = [name for name in result.missing_keys if view_key(own[name]) not in loaded_views]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {list(result.unexpected_keys)[:5]}"
        )
