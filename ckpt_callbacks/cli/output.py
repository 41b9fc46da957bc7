"""How `ckpt-callbacks` shows things: tables, sizes, progress bars, JSON, and summaries of state."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm import tqdm

from ckpt_callbacks.core.format.safetensors_io import TensorSpec

_SIZE_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")
_RNG_KEYS = {"python", "numpy", "cpu"}
_COMPACT_WIDTH = 110


def format_size(nbytes: int) -> str:
    """Decimal units, as Hugging Face sizes are written ("5GB" = 5 * 10**9 bytes)."""
    value = float(nbytes)
    for unit in _SIZE_UNITS:
        if value < 1000 or unit == _SIZE_UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def format_number(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) if len(shape) else "scalar"


def format_metrics(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={format_number(v)}" for k, v in sorted(metrics.items())) or "-"


def format_table(headers: Sequence[str] | None, rows: Sequence[Sequence[str]], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces, under `headers` when given; trailing blanks trimmed."""
    lines = [headers, *rows] if headers is not None else list(rows)
    widths = [max(len(str(cell)) for cell in column) for column in zip(*lines, strict=False)]
    return "\n".join(indent + "  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip()
                     for line in lines)


def print_json(value: Any) -> None:
    print(json.dumps(jsonable(value), indent=2))


def progress_bar(total: int | None, description: str) -> tqdm:
    """A byte progress bar on stderr, shown only when stderr is a terminal (a counter when `total` is None)."""
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1000,
                file=sys.stderr, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)


def jsonable(value: Any) -> Any:
    """`value` with tensors as {"shape", "dtype"}, tuples as lists, non-finite floats as strings."""
    if isinstance(value, (torch.Tensor, TensorSpec)):
        spec = as_spec(value)
        return {"tensor": True, "shape": list(spec.shape), "dtype": spec.dtype}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def as_spec(tensor: torch.Tensor | TensorSpec) -> TensorSpec:
    return tensor if isinstance(tensor, TensorSpec) else TensorSpec.of(tensor)


# ------------------------------------------------------------------------------ summaries of state


def summarize_state(name: str, value: Any) -> dict[str, Any]:
    """What `inspect` reports about one piece: tensors, optimizer state, RNG generators, or plain values."""
    if _is_lightning_checkpoint(value):
        return {"type": "lightning", "parts": {str(k): summarize_state(str(k), v) for k, v in value.items()}}
    if _is_tensor_dict(value):
        return _tensors_summary(value)
    if _is_optimizer_state(value):
        return {"type": "optimizer", **_optimizer_summary(value)}
    if isinstance(value, list) and value and all(_is_optimizer_state(v) for v in value):
        return {"type": "optimizers", "optimizers": [_optimizer_summary(v) for v in value]}
    if isinstance(value, Mapping) and (name.startswith("rng") or _RNG_KEYS <= set(value)):
        return {"type": "rng", "generators": [str(k) for k in value]}
    return {"type": "value", "value": jsonable(value)}


def render_state(name: str, summary: Mapping[str, Any]) -> str:
    """Terminal lines for one `summarize_state` result."""
    kind = summary["type"]
    if kind == "tensors":
        head = (f"{name}: {summary['count']} tensors, {summary['parameters']:,} elements, "
                f"{format_size(summary['bytes'])}")
        rows = [(t["name"], format_shape(t["shape"]), t["dtype"]) for t in summary["tensors"]]
        return head + "\n" + format_table(("name", "shape", "dtype"), rows, indent="  ")
    if kind == "optimizer":
        return _render_optimizer(name, summary)
    if kind == "optimizers":
        return "\n".join(_render_optimizer(f"{name}[{i}]", o) for i, o in enumerate(summary["optimizers"]))
    if kind == "rng":
        return f"{name}: RNG state of {', '.join(summary['generators'])}"
    if kind == "lightning":
        return "\n".join(render_state(f"{name}[{part}]", s) for part, s in summary["parts"].items())
    return _render_value(name, summary["value"])


def _tensors_summary(value: Mapping[str, Any]) -> dict[str, Any]:
    specs = {str(k): as_spec(v) for k, v in value.items()}
    tensors = [{"name": k, "shape": list(s.shape), "dtype": s.dtype, "bytes": s.nbytes} for k, s in specs.items()]
    return {"type": "tensors", "count": len(specs), "parameters": sum(math.prod(s.shape) for s in specs.values()),
            "bytes": sum(s.nbytes for s in specs.values()), "tensors": tensors}


def _optimizer_summary(value: Mapping[str, Any]) -> dict[str, Any]:
    groups = [{k: jsonable(v) for k, v in group.items() if k != "params"} for group in value["param_groups"]]
    per_param = [s for s in value["state"].values() if isinstance(s, Mapping)]
    return {
        "param_groups": groups,
        "parameters": sum(len(group.get("params", [])) for group in value["param_groups"]),
        "parameters_with_state": len(per_param),
        "state_keys": sorted({str(k) for s in per_param for k in s}),
        "bytes": sum(as_spec(v).nbytes for s in per_param for v in s.values() if _is_tensor(v)),
    }


def _render_optimizer(name: str, summary: Mapping[str, Any]) -> str:
    groups = summary["param_groups"]
    keys = ", ".join(summary["state_keys"]) or "none"
    lines = [f"{name}: optimizer state, {len(groups)} param group(s), {summary['parameters']} parameters, "
             f"{summary['parameters_with_state']} with state ({keys}), {format_size(summary['bytes'])}"]
    for index, group in enumerate(groups):
        lines.append(f"  group {index}: " + _compact(group, width=10_000)[1:-1])
    return "\n".join(lines)


def _render_value(name: str, value: Any) -> str:
    if isinstance(value, Mapping) and value:
        return f"{name}:\n" + "\n".join(f"  {k}: {_compact(v)}" for k, v in value.items())
    return f"{name}: {_compact(value)}"


def _compact(value: Any, width: int = _COMPACT_WIDTH) -> str:
    """A one-line rendering of a `jsonable` value, cut at `width` characters."""
    if isinstance(value, Mapping) and value.get("tensor") is True:
        text = f"tensor({format_shape(value['shape'])} {value['dtype']})"
    elif isinstance(value, Mapping):
        text = "{" + ", ".join(f"{k}={_compact(v, width)}" for k, v in value.items()) + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_compact(v, width) for v in value) + "]"
    else:
        text = json.dumps(value) if isinstance(value, str) else str(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_tensor(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, TensorSpec))


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(_is_tensor(v) for v in value.values())


def _is_lightning_checkpoint(value: Any) -> bool:
    """The dict Lightning saves: `state_dict` plus loop, optimizer and callback states."""
    return isinstance(value, Mapping) and isinstance(value.get("state_dict"), Mapping) and "global_step" in value


def _is_optimizer_state(value: Any) -> bool:
    return isinstance(value, Mapping) and isinstance(value.get("state"), Mapping) and isinstance(value.get("param_groups"), list)
