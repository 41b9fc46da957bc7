"""(12) Lightning sharded saves: this library vs Lightning's own DCP save, in the same run.

`ModelParallelStrategy` with FSDP2 (`fully_shard` per layer) on 2 CPU processes (gloo), an MLP with Adam. In
one `Trainer.fit`, `CheckpointCallback` saves every K steps (each rank copies its shards to host memory; the
shards are written and committed, with a manifest and fsync, on the writer thread), and at the steps halfway
between, a probe calls Lightning's own `trainer.save_checkpoint` (`torch.distributed.checkpoint` into a folder,
synchronous; DCP fsyncs each file), then fsyncs its files and folder to know when it is durable. Our save in
flight is waited for (untimed) before Lightning's starts, so the two never share the disk. Both keep the last 2
saves (a delete, on a `discard` mount, changes how fast the next write reaches the disk).

- stall: seconds the training loop waits at a save step, beyond a step without a save (the slower rank);
- time to durable: from the start of the save to the checkpoint being on disk (ours: committed and visible;
  Lightning's: `save_checkpoint` plus the fsync of its files).

The first save of each kind (buffers, plans) is left out. On this shared machine the figures are noisy.

    python benchmarks/sharded.py [--quick] [--size 45M] [--saves 5] [--sync] [--phases] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.common import medians, ratio, row, scratch  # noqa: E402
from ckpt_callbacks.core.storage.durable import fsync_dir, fsync_file  # noqa: E402

# MLP shapes (layers, width): parameters ~ layers * width^2; Adam doubles the optimizer state.
SIZES = {"2M": (2, 1024), "45M": (11, 2048), "124M": (30, 2048)}
EVERY = 4  # ours every EVERY steps, Lightning's own halfway between
WORLD = 2

OURS = "ours, CheckpointCallback (async, durable, committed)"
OURS_SYNC = "ours, CheckpointCallback (sync, durable, committed)"
LIGHTNING = "Lightning trainer.save_checkpoint (DCP, files fsynced by DCP)"
LIGHTNING_DURABLE = "Lightning trainer.save_checkpoint + fsync of its folder (durable)"


def run(size: str, repeats: int, *, async_save: bool = True, phases: bool = False) -> dict[str, Any]:
    """The scenario in benchmarks/run.py's result shape: `repeats` measured saves of each kind."""
    import torch.multiprocessing as mp

    from tests.distributed.launch import free_port

    with scratch("sharded") as folder:
        mp.start_processes(_worker, args=(WORLD, free_port(), size, repeats, async_save, str(folder), phases),
                           nprocs=WORLD,
                           start_method="spawn")
        per_rank = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(WORLD)]
    ours_name = OURS if async_save else OURS_SYNC
    slowest = {key: [max(values) for values in zip(*(r[key] for r in per_rank), strict=True)]
               for key in ("ours_stall", "ours_durable", "lightning_stall", "lightning_durable")}
    rows = [row(f"stall: {ours_name}", slowest["ours_stall"]), row(f"stall: {LIGHTNING}", slowest["lightning_stall"]),
            row(f"time to durable: {ours_name}", slowest["ours_durable"]),
            row(f"time to durable: {LIGHTNING_DURABLE}", slowest["lightning_durable"]),
            row("our callback's step hook without a save", [per_rank[0]["step"]])]
    m = medians(rows)
    return {
        "scenario": "sharded", "size": size, "bytes": per_rank[0]["bytes"] + per_rank[1]["bytes"], "rows": rows,
        "title": "(12) Lightning ModelParallelStrategy (FSDP2, 2 processes): sharded save, ours vs Lightning's own",
        "ratios": [
            ratio(f"stall: ours / {LIGHTNING}", m[f"stall: {ours_name}"], m[f"stall: {LIGHTNING}"], target=0.1),
            ratio(f"time to durable: ours / {LIGHTNING_DURABLE}", m[f"time to durable: {ours_name}"],
                  m[f"time to durable: {LIGHTNING_DURABLE}"], target=1.0),
        ],
    }


def _worker(rank: int, world: int, port: int, size: str, saves: int, async_save: bool, folder: str,
            phases: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank), NODE_RANK="0")
    import warnings

    warnings.filterwarnings("ignore")
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from ckpt_callbacks import CheckpointArguments
    from ckpt_callbacks.lightning import CheckpointCallback, CheckpointIOPlugin

    layers, width = SIZES[size]
    if phases:
        _time_phases(rank)
    torch.manual_seed(0)
    steps = EVERY * (saves + 1) + EVERY // 2 + 1  # one unmeasured save of each kind first
    data = TensorDataset(torch.randn(8 * steps * world, width), torch.randn(8 * steps * world, width))
    root = Path(folder)
    callback = CheckpointCallback(CheckpointArguments(output_dir=str(root / "ours"), save_steps=EVERY,
                                                      save_total_limit=2, export_at_end=False, async_save=async_save))
    probe = _Probe(pl, callback, root / "lightning", rank)
    trainer = pl.Trainer(default_root_dir=folder, accelerator="cpu", devices=world, max_steps=steps,
                         strategy=ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1),
                         callbacks=[probe, callback], plugins=[CheckpointIOPlugin()], logger=False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=True)
    trainer.fit(_mlp_module(pl, layers, width), DataLoader(data, batch_size=8))
    callback.manager.wait()
    (root / f"rank{rank}.json").write_text(json.dumps(probe.report()))


def _mlp_module(pl: Any, layers: int, width: int) -> Any:
    import torch

    class MLP(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    return MLP()


def _probe_class(pl: Any) -> Any:
    class Probe(pl.Callback):  # type: ignore[misc,name-defined]
        """Times our callback's step hook and the manager's commit, and runs Lightning's own save halfway between."""

        def __init__(self, ours: Any, lightning_dir: Path, rank: int) -> None:
            self.ours, self.lightning_dir, self.rank = ours, lightning_dir, rank
            self.hook: dict[int, float] = {}
            self.commits: dict[int, tuple[float, Any]] = {}  # step -> (seconds before the commit began, its stats)
            self.lightning: list[tuple[float, float]] = []
            self.state_bytes = 0
            self._hook_started = 0.0
            original = ours.on_train_batch_end

            def timed_hook(trainer: Any, *args: Any) -> None:
                self._hook_started = time.perf_counter()
                original(trainer, *args)
                self.hook[trainer.global_step] = time.perf_counter() - self._hook_started

            ours.on_train_batch_end = timed_hook

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            manager = self.ours.manager
            original = manager.save_written

            def timed_commit(step: int, *args: Any, **kwargs: Any) -> None:
                before = time.perf_counter() - self._hook_started
                original(step, *args, **kwargs)
                self.commits[step] = (before, manager.last_save)

            manager.save_written = timed_commit
            self.state_bytes = sum(p.to_local().nbytes for p in pl_module.parameters()) * 3  # weights, 2 Adam moments

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step % EVERY != EVERY // 2:
                return
            path = self.lightning_dir / f"step-{trainer.global_step}.ckpt"
            self.ours.manager.wait()  # untimed: the two saves never share the disk
            trainer.strategy.barrier("benchmark.before_lightning_save")
            started = time.perf_counter()
            trainer.save_checkpoint(path)
            stall = time.perf_counter() - started
            own = [path / f"__{self.rank}_0.distcp"] + ([path / ".metadata", path / "meta.pt"] if self.rank == 0 else [])
            for file in own:
                fsync_file(file)
            if self.rank == 0:
                fsync_dir(path)
                fsync_dir(path.parent)
            durable = time.perf_counter() - started
            trainer.strategy.barrier("benchmark.lightning_save")
            self.lightning.append((stall, durable))
            # The same retention as ours (save_total_limit=2), untimed: with `discard` mounts a delete changes how
            # fast the next write reaches the disk, so both sides delete alike.
            retired = path.parent / f"step-{trainer.global_step - 2 * EVERY}.ckpt"
            if self.rank == 0 and retired.is_dir():
                shutil.rmtree(retired)

        def report(self) -> dict[str, Any]:
            plain = [seconds for step, seconds in self.hook.items() if step % EVERY]
            baseline = statistics.median(plain)
            saved = sorted(self.commits)[1:]  # the first save allocates the host buffers: left out
            return {
                "step": baseline, "bytes": self.state_bytes,
                "ours_stall": [self.hook[step] - baseline for step in saved],
                "ours_durable": [self.commits[step][0] + self.commits[step][1].total_seconds for step in saved],
                "lightning_stall": [stall for stall, _ in self.lightning[1:]][: len(saved)],
                "lightning_durable": [durable for _, durable in self.lightning[1:]][: len(saved)],
            }

    return Probe


def _Probe(pl: Any, ours: Any, lightning_dir: Path, rank: int) -> Any:  # noqa: N802 (a class made per namespace)
    return _probe_class(pl)(ours, lightning_dir, rank)


def _time_phases(rank: int) -> None:
    """Print (stderr) the seconds each rank spends writing the shards, sealing and publishing each checkpoint."""
    import functools

    from ckpt_callbacks.core.save import commit
    from ckpt_callbacks.core.storage import store
    from ckpt_callbacks.lightning import sharded

    def timed(owner: Any, name: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                print(f"rank {rank} {name}: {time.perf_counter() - started:.3f}", file=sys.stderr, flush=True)

        setattr(owner, name, wrapper)

    timed(commit, "_write_pieces")
    timed(commit, "_seal")
    timed(store.LocalStore, "publish")
    timed(sharded.ShardedSave, "files_writer")
    timed(commit, "commit_checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a smoke run: the 2M model, 2 measured saves of each kind")
    parser.add_argument("--size", default="", help=f"model size: {', '.join(SIZES)} (default 45M, 2M with --quick)")
    parser.add_argument("--saves", type=int, default=0, help="measured saves of each kind (default 5, 2 with --quick)")
    parser.add_argument("--sync", action="store_true", help="our saves synchronous (async_save=False)")
    parser.add_argument("--phases", action="store_true", help="print each rank's time in each phase of our commit")
    parser.add_argument("--out", type=Path, help="write the result as JSON here")
    options = parser.parse_args()
    size = options.size or ("2M" if options.quick else "45M")
    saves = options.saves or (2 if options.quick else 5)
    result = run(size, saves, async_save=not options.sync, phases=options.phases)
    for line in result["rows"]:
        print(f"{line['name']:<80} {line['median']:9.4f} s   runs {line['runs']}")
    for line in result["ratios"]:
        print(f"{line['name']:<80} {line['value']:9.3f}   target {line['target']}   met {line['met']}")
    if options.out:
        options.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
