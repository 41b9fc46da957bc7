"""Reading and writing safetensors files.

Writing is our own: `safetensors.torch.save_file` first converts every tensor
to a Python `bytes` object (a full extra copy, ~2x peak memory, safetensors
issues #415/#458). Here the header is built from shapes and each tensor's bytes
go straight from its memory to the file through a zero-copy uint8 view: one
large sequential write per tensor and a single fsync. The format is the
standard one, so every safetensors reader (`safe_open`, `load_file`,
`from_pretrained`, vLLM) reads it, and the bytes are those `safetensors`
itself writes (tensors ordered by dtype, then name): a file written here is
byte-identical to `save_file`'s, or to the shard `save_pretrained` writes, of
the same tensors, so an export can reuse a checkpoint's file as it is.
Reading uses the library (mmap).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckpt_callbacks.core.format.mapped_tensors import copy_out_of_map
from ckpt_callbacks.core.storage.written_files import write_buffers
from ckpt_callbacks.errors import CheckpointCorruptError

__all__ = [
    "DTYPE_NAMES",
    "WRITE_THREADS",
    "TensorSpec",
    "byte_view",
    "file_prefix",
    "read_safetensors",
    "read_safetensors_metadata",
    "read_tensor_specs",
    "unique_tensors",
    "view_key",
    "write_safetensors",
]

_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("uint16", "U16"), ("uint32", "U32"), ("uint64", "U64"),
                     ("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPE_CODES[getattr(torch, _name)] = _code
DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODES.items()}
# The order `safetensors` writes tensors in: by dtype, in this order, then by name.
_DTYPE_ORDER = {code: rank for rank, code in enumerate(
    ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"))}
_ALIGNMENT = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024
# Threads writing one safetensors file when it goes through the page cache (`direct_io.ENABLED = False`), where
# copying into the page cache limits a write: on the project machine (2 cores) a durable sync save of 1.49 GB ran
# at 2.08 GB/s with two threads, 1.29 GB/s with one (medians of three, benchmarks/disk.py). O_DIRECT writes (the
# default) need no page cache and use one thread.
WRITE_THREADS = 2


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      *, fsync: bool = True) -> None:
    """Write `tensors` to `path` in the safetensors format, streaming each tensor's bytes.

    The file is written by `written_files.write_buffers`: few system calls for all tensors, and when the
    core records a checkpoint, a checksum hashed on the way out instead of read back from disk.

    Example:
        >>> write_safetensors(Path("model.safetensors"), {"w": torch.zeros(2, 2)}, {"format": "pt"})
    """
    header_bytes, ordered = _safetensors_header(path, tensors, metadata)
    views = [byte_view(tensor) for tensor in ordered if tensor.numel()]
    write_buffers(path, [struct.pack("<Q", len(header_bytes)) + header_bytes, *views], fsync=fsync,
                  threads=WRITE_THREADS)


def file_prefix(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> tuple[bytes, list[torch.Tensor]]:
    """The first bytes of the file `write_safetensors` writes for `tensors` (header length and header), and the
    tensors in the order their bytes follow it."""
    header_bytes, ordered = _safetensors_header(Path("tensors"), tensors, metadata)
    return struct.pack("<Q", len(header_bytes)) + header_bytes, ordered


def _safetensors_header(path: Path, tensors: Mapping[str, torch.Tensor],
                        metadata: Mapping[str, str] | None) -> tuple[bytes, list[torch.Tensor]]:
    """The padded JSON header of a safetensors file, and the tensors in the order their bytes follow it."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    ordered = []
    for name, tensor in tensors.items():
        if tensor.dtype not in _DTYPE_CODES:
            raise TypeError(f"{path.name}: tensor '{name}' has dtype {tensor.dtype}, which safetensors cannot store.")
    for name, tensor in sorted(tensors.items(), key=lambda item: (_DTYPE_ORDER[_DTYPE_CODES[item[1].dtype]], item[0])):
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _DTYPE_CODES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        ordered.append(tensor)
        offset += nbytes
    header_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return header_bytes + b" " * (-len(header_bytes) % _ALIGNMENT), ordered


def byte_view(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes without copying when it is a contiguous CPU tensor.

    Only calls that keep the GIL: `detach()` releases and retakes it, and retaking it costs a background
    writer up to a switch interval (5 ms) per tensor while training holds it."""
    cpu = tensor.detach() if tensor.requires_grad else tensor
    if cpu.device.type != "cpu":
        cpu = cpu.cpu()
    if not cpu.is_contiguous():
        cpu = cpu.contiguous()
    return memoryview(cpu.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def read_safetensors(path: Path, map_location: Any = None, *, copy: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; `CheckpointCorruptError` naming the file if it is not one.

    `copy=False` returns views of a copy-on-write map of the file, for callers that copy them at once."""
    device = _device_string(map_location)
    try:
        with open(path, "rb"):  # the safetensors reader reports a permission problem as a missing file
            pass
    except PermissionError:
        raise CheckpointCorruptError(
            f"{path}: cannot be read (permission denied). Make it readable by the user this process runs as (chmod "
            "u+r, or change its owner), then retry.", path=str(path), reason="unreadable") from None
    except OSError:
        pass  # the reader below names what is wrong
    try:
        tensors = load_file(str(path), device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError variants
        raise CheckpointCorruptError(
            f"{path}: not a readable safetensors file ({exc}). Re-save, or resume from an earlier checkpoint.",
            path=str(path), reason="unreadable",
        ) from None
    if device != "cpu" or not copy:
        return tensors
    # on CPU, load_file returns views of a copy-on-write map (see there why not)
    return cast(dict[str, torch.Tensor], copy_out_of_map(tensors))


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and size of a tensor that was not read (what `ckpt-callbacks inspect` shows)."""

    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), tensor.numel() * tensor.element_size())


def read_tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Name, shape, dtype and size of every tensor of a safetensors file, from its header alone.

    Example:
        >>> read_tensor_specs(Path("run/checkpoint-8/model.safetensors"))["lm_head.weight"]
        TensorSpec(shape=(64, 32), dtype='float32', nbytes=8192)
    """
    try:
        with open(path, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            if header_size > _MAX_HEADER_BYTES:
                raise ValueError(f"a header of {header_size} bytes")
            header = json.loads(f.read(header_size))
        return {
            name: TensorSpec(tuple(entry["shape"]), DTYPE_NAMES.get(entry["dtype"], entry["dtype"]),
                             entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items() if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error, RecursionError) as exc:
        raise CheckpointCorruptError(f"{path}: not a readable safetensors file ({exc}). Re-save, or resume from an "
                                     "earlier checkpoint.", path=str(path), reason="unreadable") from None


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _device_string(map_location: Any) -> str:
    if map_location is None or callable(map_location) or isinstance(map_location, dict):
        return "cpu"
    return str(map_location)


def view_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype] | None:
    """Identity of the memory a tensor views; equal keys mean the same values (e.g. tied weights).

    `state_dict()` returns a fresh detached tensor per name, so object identity cannot detect ties.
    """
    if hasattr(tensor, "to_local"):  # a DTensor: its identity is that of its local shard
        tensor = tensor.to_local()
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return None
    try:
        pointer = tensor.untyped_storage().data_ptr()
    except RuntimeError:  # tensor subclasses without a plain storage
        return None
    return (pointer, int(tensor.storage_offset()), tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)


def unique_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one name per shared tensor (tied weights), the first in state-dict order, as `save_pretrained` does.

    Loading with `strict=False` (the stock Trainer) or `from_pretrained` re-ties the dropped names. Distinct
    views that overlap one storage are cloned, since safetensors files cannot express sharing.
    """
    kept: dict[str, torch.Tensor] = {}
    seen_views: set[Any] = set()
    seen_storages: set[int] = set()
    for name, tensor in state.items():
        view = view_key(tensor)
        if view is None:
            kept[name] = tensor
            continue
        storage = view[0]
        if view in seen_views:
            continue
        elif storage in seen_storages:
            kept[name] = tensor.clone()
        else:
            kept[name] = tensor
        seen_views.add(view)
        seen_storages.add(storage)
    return kept
