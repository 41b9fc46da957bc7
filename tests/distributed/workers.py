"""Bodies of the multi-process tests; each runs on every rank."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.core.format.engines.safetensors_engine import SafetensorsEngine


def replicated_save_and_load(rank: int, world_size: int, output_dir: str, async_save: bool) -> None:
    """Data-parallel style: same model everywhere, per-rank RNG; each rank's RNG stream continues exactly."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(100 + rank)  # ranks draw different random streams, as with per-rank dropout
    replicated_inputs = torch.Generator().manual_seed(7)  # identical updates everywhere, as after DDP's all-reduce
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, async_save=async_save, save_total_limit=2))
    for step in range(1, 4):
        torch.rand(3)  # each rank consumes its own stream
        model(torch.randn(4, 8, generator=replicated_inputs)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(step, {"model": model, "optimizer": optimizer})
    manager.wait()
    expected = torch.rand(5)
    dist.barrier()
    torch.manual_seed(999)
    fresh = torch.nn.Linear(8, 8)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    step, _ = manager.load_last({"model": fresh, "optimizer": fresh_optimizer})
    assert step == 3
    assert torch.equal(torch.rand(5), expected), f"rank {rank}: RNG stream did not continue"
    assert torch.equal(fresh.weight, model.weight)
    manager.close()


def build_fsdp(world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if world_size > 1:
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, optimizer


def full_values(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer values gathered to full tensors, comparable across world sizes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    values = {f"model.{k}": v for k, v in model_state.items()}
    for fqn, state in optimizer_state.get("state", {}).items():  # full values live on rank 0 only
        for key, value in state.items():
            values[f"optim.{fqn}.{key}"] = value
    return values


def train_and_save_sharded(model: torch.nn.Module, optimizer: torch.optim.Optimizer, output_dir: str) -> CheckpointManager:
    """Two optimizer steps (the same inputs on every rank), each saved with the dcp engine; returns the manager."""
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, engine="dcp"))
    for step in range(1, 3):
        torch.manual_seed(step)
        model(torch.randn(4, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        manager.save(step, {"model": model, "optimizer": optimizer})
    manager.wait()
    return manager


def sharded_save(rank: int, world_size: int, output_dir: str, reference_file: str) -> None:
    model, optimizer = build_fsdp(world_size)
    manager = train_and_save_sharded(model, optimizer, output_dir)
    values = full_values(model, optimizer)
    if rank == 0:
        torch.save(values, reference_file)
    manager.close()


def sharded_resume(rank: int, world_size: int, output_dir: str, reference_file: str) -> None:
    model, optimizer = build_fsdp(world_size)
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, engine="dcp"))
    step, _ = manager.load_last({"model": model, "optimizer": optimizer})
    assert step == 2
    values = full_values(model, optimizer)
    if rank == 0:
        reference = torch.load(reference_file, weights_only=True)
        assert reference.keys() == values.keys(), (sorted(reference), sorted(values))
        for key in reference:
            assert torch.equal(reference[key], values[key]), key
    manager.close()


class DiesOnRankOneEngine(SafetensorsEngine):
    """Rank 1 is SIGKILLed in the middle of writing checkpoint 2."""

    name = "dies-on-rank-one-test"

    def save(self, state: Any, relpath: str) -> None:
        super().save(state, relpath)
        if self.rank == 1 and "checkpoint-2" in str(self.directory):
            os.kill(os.getpid(), signal.SIGKILL)


def killed_rank_mid_save(rank: int, world_size: int, output_dir: str) -> None:
    model = torch.nn.Linear(4, 4)
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, async_save=False), engine=DiesOnRankOneEngine)
    manager.save(1, {"model": model})
    Path(output_dir, f"rank{rank}-saved-1").touch()
    manager.save(2, {"model": model})  # rank 1 dies inside; rank 0 must not commit


def framework_written_sharded_save(rank: int, world_size: int, output_dir: str) -> None:
    """A framework writes its own sharded files (a plain `torch.distributed.checkpoint.save` of an FSDP2 model, as
    Lightning's ModelParallelStrategy does) into the manager's staging folder; the manager commits them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, optimizer = build_fsdp(world_size)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    manager = CheckpointManager(CheckpointArguments(output_dir=output_dir, save_total_limit=1), engine="dcp")

    def write(folder: Path) -> None:
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(folder / "checkpoint.ckpt"))

    for step in (1, 2):
        manager.save_written(step, write, states=["checkpoint.ckpt"], epoch=0.5 * step)
    manager.close()
