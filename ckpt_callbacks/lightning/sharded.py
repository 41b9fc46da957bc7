"""Lightning strategies that save or load checkpoints themselves, served through the core.

`ModelParallelStrategy` (FSDP2 `fully_shard`, tensor parallelism) and `FSDPStrategy` never call `CheckpointIO`
to load a checkpoint, and in their sharded mode (`save_distributed_checkpoint=True`, the default, and
`state_dict_type="sharded"`) not to save one either: each rank writes its shard into a DCP folder. What this
module does for them:

- `strategy_support(strategy)` says which kind a strategy is: one that writes through `CheckpointIO` on global
  rank 0 (single device, DDP: the plugin serves it), one that loads itself (full state saved through the plugin,
  loaded by the strategy), one that also saves itself (sharded). Any other strategy that writes its own files
  (DeepSpeed, XLA) is refused, naming it and what to use instead.
- `ShardedSave` describes Lightning's own sharded layout (`checkpoint.ckpt/` with one `__{rank}_0.distcp` per rank,
  the DCP `.metadata`, and Lightning's `meta.pt` with everything but the model and optimizer), so Lightning's
  own loader reads it, into the run's staging folder; the run controller commits it collectively
  (`RunController.save_written`): manifest of every shard with checksums, atomic publish, retention. With
  `async_save` the shards are first copied to host memory (the training thread waits only for that copy), then
  written and committed on the writer thread, whose collectives use the manager's own gloo group.
- `verify_before_loading(strategy, verify)` makes the strategy's `load_checkpoint` resolve and verify the path
  first (rank 0 checksums every file and shares its verdict), so a damaged shard is named, never loaded.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.core.distributed.collective import Collective, SingleProcess, TorchDistributed
from ckpt_callbacks.core.distributed.dcp_folder import HostCopy, dcp_folder_writer
from ckpt_callbacks.core.format import layout

__all__ = ["ShardedSave", "StrategySupport", "collective_of", "strategy_support", "verify_before_loading"]

CHECKPOINT_FILE = layout.LIGHTNING_CHECKPOINT_FILE
SHARDED_ENGINE = "dcp"  # the core engine that reads the DCP folder back (CLI, export)

# Strategy classes that load every checkpoint themselves (and save the sharded ones), by the class that defines
# `save_checkpoint`: {class name: (flag attribute of the sharded mode, DCP key of the model's state)}.
_LOADS_ITSELF = {
    "ModelParallelStrategy": ("_save_distributed_checkpoint", "state_dict"),
    "FSDPStrategy": ("_state_dict_type", "model"),
}
_LIGHTNING_PACKAGES = ("lightning.pytorch.", "pytorch_lightning.")
_ALTERNATIVE = ("Use ModelParallelStrategy (FSDP2 `fully_shard`, tensor parallelism), FSDPStrategy or DDP with "
                "ckpt_callbacks, or remove CheckpointCallback and CheckpointIOPlugin to keep {name}'s own "
                "checkpointing.")


@dataclass(frozen=True)
class StrategySupport:
    """How the adapter serves a strategy.

    `loads_itself`: the strategy's `load_checkpoint` reads the files (not `CheckpointIO`), so the adapter verifies
    the path first. `sharded`: the strategy writes a DCP folder on every rank (not through `CheckpointIO`), so the
    adapter writes that folder itself and the core commits it. `model_key`: the model's key in that folder."""

    name: str
    loads_itself: bool = False
    sharded: bool = False
    model_key: str = "state_dict"
    metadata_file: str = "meta.pt"


def strategy_support(strategy: Any) -> StrategySupport:
    """The way `strategy` is served, or a `ValueError` naming a strategy that writes its own checkpoints in a
    way the adapter cannot commit or verify (DeepSpeed, XLA, a custom `save_checkpoint`)."""
    name = type(strategy).__name__
    saver = _defining_class(type(strategy), "save_checkpoint")
    loader = _defining_class(type(strategy), "load_checkpoint")
    if _is_lightning_class(saver, "Strategy") and _is_lightning_class(loader, "Strategy"):
        return StrategySupport(name)  # writes through CheckpointIO on global rank 0: the plugin serves it
    known = saver.__name__ if _is_lightning_class(saver, *_LOADS_ITSELF) else None
    if known is None or loader is not saver:
        raise ValueError(
            f"CheckpointCallback cannot serve {name}: it writes its checkpoints itself "
            f"({saver.__qualname__}.save_checkpoint), not through CheckpointIO, so they could be neither committed "
            f"atomically nor verified. " + _ALTERNATIVE.format(name=name))
    flag, model_key = _LOADS_ITSELF[known]
    value = getattr(strategy, flag, None)
    sharded = value is True or value == "sharded"
    module = sys.modules.get(saver.__module__)
    metadata_file = str(getattr(module, "_METADATA_FILENAME", "meta.pt"))
    return StrategySupport(name, loads_itself=True, sharded=sharded, model_key=model_key, metadata_file=metadata_file)


def _defining_class(cls: type, attribute: str) -> type:
    return next(klass for klass in cls.__mro__ if attribute in klass.__dict__)


def _is_lightning_class(cls: type, *names: str) -> bool:
    return cls.__name__ in names and cls.__module__.startswith(_LIGHTNING_PACKAGES)


def collective_of(trainer: Any) -> Collective:
    """The checkpoint collective of the Trainer's processes: a gloo group of its own (collective to create, so
    every rank calls this at the same point), or `SingleProcess` in one process."""
    import torch.distributed as dist

    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        return TorchDistributed()
    return SingleProcess()


class ShardedSave:
    """Describes one sharded checkpoint the way the strategy's own `save_checkpoint` lays it out (which keys go to
    DCP, which to `meta.pt`); the core writes it (`core/distributed/dcp_folder.py`) into the folder the commit
    hands it, from live state (sync) or from a host copy (`stage=True`)."""

    def __init__(self, support: StrategySupport, collective: Collective) -> None:
        self.support = support
        self.collective = collective
        self._host_copy = HostCopy()  # reused between saves: no fresh pages for each copy

    def files_writer(self, checkpoint: dict[str, Any], *, stage: bool) -> Callable[[Path], None]:
        """`write_files(folder)` for Lightning's checkpoint dict `checkpoint` (`dump_checkpoint()`, taken on every
        rank): the model and optimizer states go to DCP, every rank its shard; the rest to `meta.pt` (rank 0).
        With `stage`, the shards are copied to host memory now, so the writer reads nothing live."""
        shards = {self.support.model_key: checkpoint.pop("state_dict")}
        shards.update({f"optimizer_{index}": state for index, state in enumerate(checkpoint.pop("optimizer_states", []))})
        if stage:
            shards = self._host_copy.copy(shards)
        side_file = (self.support.metadata_file, _serialized(checkpoint)) if self.collective.rank == 0 else None
        return dcp_folder_writer(CHECKPOINT_FILE, shards, self.collective, side_file=side_file)


def _serialized(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def verify_before_loading(strategy: Any, verify: Callable[[str], str]) -> None:
    """Make `strategy.load_checkpoint(path, ...)` load `verify(path)` (which raises for a damaged checkpoint) instead
    of `path`. The strategy's own method, shadowed on this instance only; `stop_verifying` puts it back."""
    original = type(strategy).load_checkpoint.__get__(strategy)

    def load_checkpoint(checkpoint_path: Any, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
        return original(verify(os.fspath(checkpoint_path)), *args, **kwargs)

    load_checkpoint.verified_by_ckpt_callbacks = True  # type: ignore[attr-defined]
    strategy.load_checkpoint = load_checkpoint


def stop_verifying(strategy: Any) -> None:
    shadow = strategy.__dict__.get("load_checkpoint")
    if getattr(shadow, "verified_by_ckpt_callbacks", False):
        del strategy.__dict__["load_checkpoint"]
