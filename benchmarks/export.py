"""(6) Sharded safetensors export vs `save_pretrained(max_shard_size=...)`.

Ours (`ckpt_callbacks.core.export.export_safetensors`, what `export_at_end` and
`ckpt-callbacks export` run) writes the shards under a hidden name, fsyncs them
and renames the folder into place; `save_pretrained` does not fsync, so it is
also shown with an fsync of its files added. Both write the config beside the
weights. Variants alternate within a repeat; the disk is synced before each.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import clear, gb, gpt2, medians, ratio, row, scratch, sync_disk, timed
from ckpt_callbacks.core.export import export_safetensors
from ckpt_callbacks.core.storage.durable import fsync_tree

SHARD = "200MB"
OURS = f"ours, export_safetensors(max_shard_size={SHARD!r})"
STOCK = f"stock save_pretrained(max_shard_size={SHARD!r})"
STOCK_FSYNC = "stock save_pretrained + fsync of its files"


def run(size: str, repeats: int) -> dict[str, Any]:
    model = gpt2(size)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds: dict[str, list[float]] = {OURS: [], STOCK: [], STOCK_FSYNC: []}
    with scratch("export") as root:
        variants = {
            OURS: partial(_ours, model, root / "ours"),
            STOCK: partial(model.save_pretrained, str(root / "stock"), max_shard_size=SHARD),
            STOCK_FSYNC: partial(_stock_durable, model, root / "stock-fsync"),
        }
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            for name, export in variants.items():
                sync_disk()
                value = timed(export)
                clear(root)
                if repeat:
                    seconds[name].append(value)
    rows = [row(name, values) for name, values in seconds.items()]
    rows += [row(f"{name}: throughput", [gb(nbytes) / s for s in values], unit="GB/s") for name, values in seconds.items()]
    m = medians(rows)
    return {
        "scenario": "export", "title": "(6) sharded safetensors export of the weights", "size": size, "bytes": nbytes,
        "rows": rows,
        "ratios": [
            ratio("ours (durable) / save_pretrained (not durable)", m[OURS], m[STOCK]),
            ratio("ours / save_pretrained + fsync", m[OURS], m[STOCK_FSYNC], target=1.0),
        ],
    }


def _ours(model: Any, folder: Path) -> None:
    export_safetensors(model.state_dict(), folder, max_shard_size=SHARD, pretrained_objects=[model.config])


def _stock_durable(model: Any, folder: Path) -> None:
    model.save_pretrained(str(folder), max_shard_size=SHARD)
    fsync_tree(folder)
