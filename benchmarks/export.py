"""(6) Sharded safetensors export vs `save_pretrained(max_shard_size=...)`.

Ours (`ckpt_callbacks.core.export.export_safetensors`, what `export_at_end` and
`ckpt-callbacks export` run) writes the shards under a hidden name, fsyncs them
and renames the folder into place; `save_pretrained` does not fsync, so it is
also shown with an fsync of its files added. Both write the config beside the
weights. Variants alternate within a repeat; the disk is synced before each.

At the end of training the final weights are usually those of the last
checkpoint, already committed (the HF callback's `model.safetensors`, the
stock file's bytes): `export_at_end` then passes that checkpoint
(`reuse_from`), and every shard byte-identical to a committed file shares it
(reflink, else hard link) after checking it against the manifest's checksum.
That is the default export (one shard up to 5 GB). With 200 MB shards no
committed file matches a shard, so they are written afresh. Every run also
checks that our files are byte-identical to `save_pretrained`'s.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.common import clear, gb, gpt2, medians, ratio, row, scratch, sync_disk, timed
from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.export import export_safetensors
from ckpt_callbacks.core.storage.durable import fsync_tree

SHARDS = ("5GB", "200MB")


def names(shard: str) -> dict[str, str]:
    return {
        "reuse": f"ours, end of training: export_safetensors(max_shard_size={shard!r}, reuse_from=last checkpoint)",
        "fresh": f"ours, export_safetensors(max_shard_size={shard!r}) from memory",
        "stock": f"stock save_pretrained(max_shard_size={shard!r})",
        "stock_fsync": f"stock save_pretrained(max_shard_size={shard!r}) + fsync of its files",
    }


def run(size: str, repeats: int) -> dict[str, Any]:
    model = gpt2(size)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    seconds: dict[str, list[float]] = {}
    identical: dict[str, list[float]] = {}
    with scratch("export") as root:
        run_dir = root / "run"
        with CheckpointManager(CheckpointArguments(output_dir=str(run_dir), async_save=False), engine="hf") as manager:
            manager.save(1, {"model": model})  # the final checkpoint of a run (untimed)
        checkpoint = run_dir / "checkpoint-1"
        out = root / "out"
        out.mkdir()
        for repeat in range(repeats + 1):  # the first round warms up and is dropped
            for shard in SHARDS:
                variant = names(shard)
                exports = {
                    variant["reuse"]: partial(_ours, model, out / "reuse", shard, checkpoint),
                    variant["fresh"]: partial(_ours, model, out / "fresh", shard, None),
                    variant["stock"]: partial(model.save_pretrained, str(out / "stock"), max_shard_size=shard),
                    variant["stock_fsync"]: partial(_stock_durable, model, out / "stock-fsync", shard),
                }
                for name, export in exports.items():
                    sync_disk()
                    value = timed(export)
                    if repeat:
                        seconds.setdefault(name, []).append(value)
                if repeat:
                    for kind in ("reuse", "fresh"):
                        identical.setdefault(f"{variant[kind]}: weights byte-identical to save_pretrained's", []).append(
                            float(_weights(out / kind) == _weights(out / "stock")))
                clear(out)
    rows = [row(name, values) for name, values in seconds.items()]
    rows += [row(f"{name}: throughput", [gb(nbytes) / s for s in values], unit="GB/s") for name, values in seconds.items()]
    rows += [row(name, values, unit="of 1") for name, values in identical.items()]
    m = medians(rows)
    single, sharded = names(SHARDS[0]), names(SHARDS[1])
    return {
        "scenario": "export", "title": "(6) sharded safetensors export of the weights", "size": size, "bytes": nbytes,
        "rows": rows,
        "ratios": [
            ratio("end of training, one shard: ours / save_pretrained + fsync", m[single["reuse"]], m[single["stock_fsync"]],
                  target=0.5),
            ratio("end of training, one shard: ours / save_pretrained (not durable)", m[single["reuse"]], m[single["stock"]],
                  target=0.5),
            ratio("from memory, one shard: ours / save_pretrained + fsync", m[single["fresh"]], m[single["stock_fsync"]],
                  target=1.0),
            ratio("200 MB shards: ours (end of training) / save_pretrained + fsync", m[sharded["reuse"]],
                  m[sharded["stock_fsync"]], target=1.0),
            ratio("200 MB shards: ours (durable) / save_pretrained (not durable)", m[sharded["reuse"]], m[sharded["stock"]]),
        ],
    }


def _ours(model: Any, folder: Path, shard: str, checkpoint: Path | None) -> None:
    export_safetensors(model.state_dict(), folder, max_shard_size=shard, pretrained_objects=[model.config],
                       reuse_from=checkpoint)


def _stock_durable(model: Any, folder: Path, shard: str) -> None:
    model.save_pretrained(str(folder), max_shard_size=shard)
    fsync_tree(folder)


def _weights(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}
