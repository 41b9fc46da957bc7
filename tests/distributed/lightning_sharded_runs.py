"""Lightning `ModelParallelStrategy` runs (FSDP2 `fully_shard`, gloo, CPU) for test_lightning_sharded.py.

A driver imports torch and Lightning once, then runs a list of orders in turn; for each it forks the ranks of a
real multi-process training run (LOCAL_RANK/WORLD_SIZE in their environment, so Lightning launches nothing
itself, as under torchrun), waits for them, and may SIGKILL their process group at a random instant. Each rank
writes what it ended with to `ROOT/{name}-rank{rank}.pt`; the driver writes each run's exit statuses to
`ROOT/{name}.json`.

    python -m tests.distributed.lightning_sharded_runs ROOT ORDERS_JSON

An order: {"name", "world_size", "output_dir", "seed", "flags": CheckpointArguments fields, "ckpt_path",
"kill_at_step" (rank 0 SIGKILLs every rank right after that optimizer step), "kill_after" (seconds after
training started, the driver SIGKILLs every rank), "signal_at_step" ([rank, step]: that rank gets SIGTERM),
"max_steps", "distributed_checkpoint" (False: full state through the plugin), "lightning_save" (a path: after
fit, also `trainer.save_checkpoint` there, Lightning's own save for comparison)}.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
import warnings
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint  # noqa: F401  (imported once, before forking)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from tests.distributed.launch import free_port
from tests.lightning.ddp_resume import rng_states, seed_per_rank
from tests.lightning.helpers import namespace, seed_everything, tiny_module_class, train_loader, val_loader

warnings.filterwarnings("ignore")
NAMESPACE = "lightning.pytorch"
TIMEOUT = 240.0


@cache
def sharded_tiny_class() -> Any:
    """The tests' `Tiny` module (dropout, Adam, per-step StepLR), its layers sharded with FSDP2 over the data-parallel
    mesh of `ModelParallelStrategy`."""

    class ShardedTiny(tiny_module_class(NAMESPACE)):  # type: ignore[misc]
        def configure_model(self) -> None:
            mesh = self.device_mesh["data_parallel"]
            for layer in (self.net[0], self.net[3]):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    return ShardedTiny


def local_values(trainer: Any) -> dict[str, Any]:
    """This rank's own slices of the weights and optimizer state, and the scheduler state: what must be bitwise
    equal per rank after an exact resume."""
    module = trainer.lightning_module
    values: dict[str, Any] = {f"param.{name}": _local(p) for name, p in module.named_parameters()}
    for index, state in trainer.optimizers[0].state_dict()["state"].items():
        for key, value in state.items():
            values[f"optim.{index}.{key}"] = _local(value)
    values["scheduler"] = trainer.lr_scheduler_configs[0].scheduler.state_dict()
    return values


def full_values(trainer: Any) -> dict[str, torch.Tensor]:
    """Whole weights and optimizer state (every rank calls it; rank 0 gets them), comparable across world sizes."""
    root = trainer.strategy.model  # FSDP1 wraps the LightningModule from outside; FSDP2 shards it in place
    model_state, optimizer_state = get_state_dict(root, trainer.optimizers[0],
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    values = {f"model.{name}": value for name, value in model_state.items()}
    for fqn, state in optimizer_state.get("state", {}).items():
        for key, value in state.items():
            values[f"optim.{fqn}.{key}"] = value
    return values


def _local(value: Any) -> Any:
    local = value.to_local() if hasattr(value, "to_local") else value
    return local.detach().cpu().clone() if isinstance(local, torch.Tensor) else local


def killer(ns: Any, at_step: int, rank: int) -> Any:
    class KillAt(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == at_step and trainer.global_rank == rank:
                os.killpg(os.getpgrp(), signal.SIGKILL)

    return KillAt()


def signaller(ns: Any, at_step: int, rank: int) -> Any:
    class SignalAt(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == at_step and trainer.global_rank == rank:
                os.kill(os.getpid(), signal.SIGTERM)

    return SignalAt()


def started_marker(ns: Any, path: Path) -> Any:
    """Rank 0 writes the step training starts at (after a resume) to `path`."""

    class Started(ns.pl.Callback):  # type: ignore[name-defined,misc]
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.global_rank == 0:
                path.write_text(str(trainer.global_step))

    return Started()


def make_strategy(order: dict[str, Any], world_size: int) -> Any:
    """`ModelParallelStrategy` (FSDP2 in `configure_model`; `"distributed_checkpoint": False` for full state), or
    `FSDPStrategy` (`"strategy": "fsdp"`, with `"state_dict_type"`; Lightning runs it on CUDA only)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    if order.get("strategy", "model_parallel") == "fsdp":
        return FSDPStrategy(state_dict_type=order.get("state_dict_type", "sharded"))
    return ModelParallelStrategy(data_parallel_size=world_size, tensor_parallel_size=1,
                                 save_distributed_checkpoint=order.get("distributed_checkpoint", True))


def train(order: dict[str, Any], root: Path, rank: int) -> None:
    from ckpt_callbacks import CheckpointArguments

    ns = namespace(NAMESPACE)
    world_size = int(order["world_size"])
    seed = int(order.get("seed", 0))
    seed_everything(seed)
    val_losses = tuple(order["val_losses_per_rank"][rank]) if order.get("val_losses_per_rank") else ()
    module_class = sharded_tiny_class() if order.get("strategy", "model_parallel") == "model_parallel" else ns.Tiny
    module = module_class(val_losses=val_losses)
    flags = {"output_dir": order["output_dir"], "export_at_end": False, **order.get("flags", {})}
    arguments = CheckpointArguments(**flags)
    callback = ns.adapter.CheckpointCallback(arguments)
    callbacks = [seed_per_rank(ns, seed), started_marker(ns, root / f"{order['name']}.started"), callback]
    if order.get("kill_at_step") is not None:
        callbacks.insert(0, killer(ns, int(order["kill_at_step"]), 0))
    if order.get("signal_at_step") is not None:
        signalled_rank, step = order["signal_at_step"]
        callbacks.insert(0, signaller(ns, int(step), int(signalled_rank)))
    strategy = make_strategy(order, world_size)
    trainer = ns.pl.Trainer(default_root_dir=str(root), accelerator=order.get("accelerator", "cpu"), devices=world_size,
                            strategy=strategy,
                            callbacks=callbacks, plugins=[ns.adapter.CheckpointIOPlugin(arguments)], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            max_epochs=int(order.get("max_epochs", 2)), max_steps=int(order.get("max_steps", -1)))
    result: dict[str, Any] = {}
    try:
        trainer.fit(module, train_loader(), val_loader(), ckpt_path=order.get("ckpt_path"))
    except Exception as exc:  # the ranks' view of a refused resume is part of the result
        result["error"] = f"{type(exc).__name__}: {exc}"
        torch.save(result, root / f"{order['name']}-rank{rank}.pt")
        raise
    result.update(global_step=trainer.global_step, resumed_from=callback.manager.resumed_from_step,
                  exit_code=callback.exit_code, rng=rng_states(), seen=module.seen, local=local_values(trainer),
                  full=full_values(trainer))
    if order.get("lightning_save"):
        trainer.save_checkpoint(order["lightning_save"])
    torch.save(result, root / f"{order['name']}-rank{rank}.pt")


def run_rank(order: dict[str, Any], root: Path, rank: int, port: int) -> None:
    """The body of one forked rank; never returns into the driver."""
    code = 0
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(order["world_size"]),
                          RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", OMP_NUM_THREADS="1")
        train(order, root, rank)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        from ckpt_callbacks.core.save.writer import flush_pending_writes

        flush_pending_writes()
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def prepare(order: dict[str, Any]) -> None:
    """Before the ranks start: copy a run folder (`"copy": [source, target]`) and flip one byte in the middle of a
    file (`"flip": path`), keeping its size (only a checksum tells)."""
    import shutil

    if order.get("copy"):
        source, target = order["copy"]
        shutil.copytree(source, target)
    if order.get("flip"):
        path = Path(order["flip"])
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def inspect(run: Path) -> dict[str, Any]:
    """What a reader of `run` sees now: every `checkpoint-*` name, the ones without a manifest, the problems a
    checksum verification finds in the others, the newest committed step, and the leftovers of interrupted writes."""
    from ckpt_callbacks.core.format import layout
    from ckpt_callbacks.core.read.catalog import read_checkpoint_info
    from ckpt_callbacks.core.read.verify import find_problems

    names = sorted(os.listdir(run)) if run.is_dir() else []
    visible = [name for name in names if layout.parse_checkpoint_step(name) is not None]
    without_manifest = [name for name in visible if not (run / name / layout.MANIFEST_NAME).is_file()]
    problems = {name: [str(problem) for problem in find_problems(run / name, read_checkpoint_info(run / name).manifest,
                                                                 "checksum")]
                for name in visible if name not in without_manifest}
    steps = [layout.parse_checkpoint_step(name) for name in visible if name not in without_manifest]
    return {"visible": visible, "without_manifest": without_manifest, "problems": problems,
            "newest": max((step for step in steps if step is not None), default=0),
            "leftovers": [name for name in names if layout.is_leftover(name)]}


def run_order(order: dict[str, Any], root: Path, rng: Any) -> dict[str, Any]:
    prepare(order)
    if order.get("steps_after_last") is not None:  # train this many steps past the newest committed checkpoint
        order = {**order, "max_steps": inspect(Path(order["output_dir"]))["newest"] + int(order["steps_after_last"])}
    port = free_port()
    pids: list[int] = []
    for rank in range(int(order["world_size"])):
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, pids[0] if pids else 0)  # every rank in one process group: one SIGKILL ends them all
            run_rank(order, root, rank, port)
        try:
            os.setpgid(pid, pids[0] if pids else pid)
        except (PermissionError, ProcessLookupError):
            pass  # the child did it first
        pids.append(pid)
    killed_after = None
    started = root / f"{order['name']}.started"
    deadline = time.monotonic() + float(order.get("timeout", TIMEOUT))
    if order.get("kill_after") is not None:
        while not started.exists() and time.monotonic() < deadline and not _any_exited(pids):
            time.sleep(0.01)
        low, high = order["kill_after"]
        killed_after = rng.uniform(low, high)
        time.sleep(killed_after)
        _kill_group(pids[0])
    statuses = [_wait(pid, deadline) for pid in pids]
    start = started.read_text() if started.exists() else None
    report = {"statuses": statuses, "killed_after": killed_after, "start_step": None if start is None else int(start)}
    if order.get("inspect"):
        report["after"] = inspect(Path(order["output_dir"]))
    return report


def _any_exited(pids: list[int]) -> bool:
    """Whether a rank has exited, without reaping it (its status is read by `_wait`)."""
    return any(os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None for pid in pids)


def _kill_group(leader: int) -> None:
    try:
        os.killpg(leader, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(pid: int, deadline: float) -> int:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            _kill_group(pid)
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


def main(root: str, orders_json: str) -> None:
    import random

    import lightning.pytorch  # noqa: F401  (imported once, before forking)

    import ckpt_callbacks.lightning.adapter  # noqa: F401

    sharded_tiny_class()
    folder = Path(root)
    rng = random.Random(orders_json)
    for order in json.loads(orders_json):
        report = run_order(order, folder, rng)
        (folder / f"{order['name']}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:3])
