"""Host staging: snapshot state into buffers allocated once and reused across saves.

After `stage()` returns, the snapshot is independent of the live tensors, so
training may update weights in place while a background thread writes the
snapshot. Buffers are reused when shapes and dtypes repeat (they do, save after
save), so steady-state saves allocate nothing. With CUDA, buffers are pinned and
device-to-host copies are non-blocking, synchronized once at the end.
"""

from __future__ import annotations

from typing import Any

import torch

from ckpt_callbacks.core.tensor_files import view_key

BufferKey = tuple[str, ...]


class HostStager:
    def __init__(self, pin_memory: bool | None = None) -> None:
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._buffers: dict[BufferKey, torch.Tensor] = {}

    @property
    def staged_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())

    def stage(self, state: Any, prefix: BufferKey = ()) -> Any:
        """A copy of `state` whose tensors live in this stager's host buffers; shared tensors stay shared."""
        copies: dict[Any, torch.Tensor] = {}
        needs_sync = False

        def visit(value: Any, key: BufferKey) -> Any:
            nonlocal needs_sync
            if isinstance(value, torch.Tensor):
                identity = view_key(value) or id(value)
                if identity in copies:
                    return copies[identity]
                buffer = self._buffer_for(key, value)
                non_blocking = value.device.type == "cuda" and self.pin_memory
                buffer.copy_(value.detach(), non_blocking=non_blocking)
                needs_sync = needs_sync or non_blocking
                copies[identity] = buffer
                return buffer
            if isinstance(value, dict):
                return {k: visit(v, (*key, str(k))) for k, v in value.items()}
            if isinstance(value, list):
                return [visit(v, (*key, str(i))) for i, v in enumerate(value)]
            if isinstance(value, tuple):
                return tuple(visit(v, (*key, str(i))) for i, v in enumerate(value))
            return value  # ints, floats, strings, and objects the engine serializes as they are

        staged = visit(state, prefix)
        if needs_sync:
            torch.cuda.synchronize()
        return staged

    def _buffer_for(self, key: BufferKey, like: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.shape != like.shape or buffer.dtype != like.dtype:
            buffer = torch.empty(like.shape, dtype=like.dtype, device="cpu", pin_memory=self.pin_memory)
            self._buffers[key] = buffer
        return buffer
