"""The stock Trainer's own saver, writing into the core's staging folder: how FSDP and DeepSpeed checkpoints are kept.

With FSDP (accelerate's FSDP1 and FSDP2, any `state_dict_type`) or DeepSpeed (ZeRO-1/2/3), the model and optimizer
state is sharded across the ranks, and only the framework's own savers write it (DCP folders, DeepSpeed's
`global_step{N}/`, consolidated files on rank 0). So for those runs the callback does not capture pieces: every rank
runs the Trainer class's own `_save_checkpoint` with its output redirected into the hidden staging folder of
`CheckpointManager.save_written`, and the core then fsyncs every file, seals a manifest of every rank's files,
publishes the folder atomically as `checkpoint-{step}` and applies retention. The files are exactly the stock ones,
so the stock `resume_from_checkpoint` (and DeepSpeed's loader under it) reads them after the callback has verified
the folder.

The redirection, for one save (`write_checkpoint`, on every rank):

- the instance's `_get_output_dir` returns the staging folder, so the stock saver writes `{staging}/checkpoint-{N}/`
  (every rank its own files: DCP shards, `rng_state_{rank}.pth`, DeepSpeed's optimizer partitions), and the stock
  rotation looks at that folder only, which holds one checkpoint (nothing is deleted; retention is the core's);
- `_push_from_checkpoint` does nothing (the staging folder is renamed away; the callback never pushes, as with
  every other save of this library);
- `trainer.args` is, for the call, the Trainer's arguments with the run's save flags (`training_args_with`), so the
  stock saver honours the callback's `save_only_model` and `training_args.bin` records what the run saves with;
- afterwards `state.best_model_checkpoint` names the real `checkpoint-{best}` folder (the stock saver would record
  the staging path), the `stateful_callbacks` are refreshed as for every save of the callback, and rank 0 rewrites
  `trainer_state.json` with that state and moves the folder's entries up into the staging folder.

Those last two are the only file operations of the adapter, inside the hidden staging folder before the seal; the
commit, the manifest and retention stay the core's.

The same path runs for a plain (DDP or one-process) Trainer when `CheckpointCallback.stock_saver = True`: that is how
the mechanism is tested on CPU (the FSDP and DeepSpeed tests need CUDA).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.distributed.collective import Collective
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines.hf_engine import HFEngine
from ckpt_callbacks.core.storage.durable import move_entries_up
from ckpt_callbacks.hf.capture import refresh_stateful_callbacks, saved_state_dict

__all__ = [
    "check_supported",
    "full_model_state",
    "load_best_with_stock_loader",
    "pieces_written",
    "sharding_of",
    "weights_as_saved",
    "write_checkpoint",
]

SAVE_METHOD = "_save_checkpoint"
OUTPUT_DIR_METHOD = "_get_output_dir"
PUSH_METHOD = "_push_from_checkpoint"
LOAD_BEST_METHOD = "_load_best_model"
# Wrapper modules FSDP1 (and activation checkpointing) insert: their names are in `named_parameters`, not in the
# keys of a full state dict.
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def sharding_of(trainer: Any) -> str | None:
    """The sharded strategy the Trainer runs, as users name it ("FSDP2 SHARDED_STATE_DICT", "DeepSpeed ZeRO-3"), or
    None for one process and DDP."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return f"DeepSpeed ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = trainer.accelerator.state.fsdp_plugin
        return f"FSDP{getattr(plugin, 'fsdp_version', 1)} {state_dict_type(plugin)}"
    return None


def state_dict_type(fsdp_plugin: Any) -> str:
    """'SHARDED_STATE_DICT', 'FULL_STATE_DICT' or 'LOCAL_STATE_DICT' (accelerate holds torch's enum or a string)."""
    return str(fsdp_plugin.state_dict_type).rsplit(".", 1)[-1]


def check_supported(trainer: Any, effective: CheckpointArguments, strategy: str | None, run_dir: str) -> None:
    """Refuse, at attach, what the stock saver path cannot serve, naming the combination (`strategy`, None for a
    Trainer that is not sharded) and the way out. The combinations the stock Trainer itself refuses under FSDP or
    DeepSpeed are refused alike when they come from the callback's flags."""
    where = f"CheckpointCallback with {strategy or 'the stock saver'}"
    if "://" in run_dir and not run_dir.startswith("file://"):
        raise ValueError(f"{where} needs a local (or shared) output_dir: the stock saver writes files on every rank, "
                         f"and {run_dir!r} is remote. Save to a shared filesystem and copy to object storage after.")
    if effective.engine not in (None, HFEngine.name):
        raise ValueError(f"{where} writes the stock Trainer layout (engine 'hf'); engine={effective.engine!r} cannot "
                         "write FSDP or DeepSpeed state. Remove the engine flag.")
    if trainer.args.save_on_each_node and not _one_node(trainer):
        raise ValueError(f"{where} and save_on_each_node=True on several nodes: this library keeps one copy of each "
                         "checkpoint in one shared folder, and every node would write the same files into it. Set "
                         "save_on_each_node=False (output_dir on a filesystem all nodes share).")
    if strategy is None:
        return
    wrapper = strategy.split()[0] if strategy.startswith("DeepSpeed") else "FSDP"
    if effective.save_only_model and effective.load_best_model_at_end:
        # The stock Trainer's own refusals (of TrainingArguments), here for the callback's flags.
        raise ValueError(f"{wrapper} can't be used with `save_only_model` along with `load_best_model_at_end`.")
    if effective.save_only_model and strategy.endswith("SHARDED_STATE_DICT"):
        raise ValueError("save_only_model option is not compatible with FSDP state dict type 'SHARDED_STATE_DICT'")
    if wrapper == "DeepSpeed" and effective.export_at_end and strategy.endswith("ZeRO-3"):
        config = trainer.accelerator.state.deepspeed_plugin.deepspeed_config
        if not config.get("zero_optimization", {}).get("stage3_gather_16bit_weights_on_model_save", False):
            raise ValueError(
                f"{where} and export_at_end=True: the export needs whole weights, which ZeRO-3 gathers only with "
                "`stage3_gather_16bit_weights_on_model_save: true` in the DeepSpeed config. Set it, or pass "
                "CheckpointCallback(export_at_end=False) (the checkpoints still hold the full DeepSpeed state; "
                "DeepSpeed's zero_to_fp32.py recovers the weights).")


def _one_node(trainer: Any) -> bool:
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    return trainer.args.world_size <= 1 or (local_world_size is not None and int(local_world_size) == trainer.args.world_size)


# ---------------------------------------------------------------------------------------------- saving


def write_checkpoint(trainer: Any, model: Any, trial: Any, staging: Path, *, collective: Collective,
                     training_args: Any, best_checkpoint: str | None) -> None:
    """On every rank: the stock `_save_checkpoint(model, trial)` of the Trainer's class (a subclass's override
    included, never the callback's instance shadow) writes this step's checkpoint into `staging`.

    `training_args`: what the stock saver runs with (the Trainer's arguments with the run's save flags);
    `best_checkpoint`: the real folder `state.best_model_checkpoint` names afterwards (None: keep what it named)."""
    step = trainer.state.global_step
    previous_best = trainer.state.best_model_checkpoint
    stock_save = getattr(type(trainer), SAVE_METHOD)
    with _instance_attributes(trainer, **{OUTPUT_DIR_METHOD: lambda trial=None: str(staging),
                                          PUSH_METHOD: lambda checkpoint_folder: None, "args": training_args}):
        stock_save(trainer, model, trial)
    trainer.state.best_model_checkpoint = best_checkpoint if best_checkpoint is not None else previous_best
    refresh_stateful_callbacks(trainer)
    collective.barrier()  # every rank's files are written
    written = staging / layout.checkpoint_name(step)
    if collective.rank == 0 and written.is_dir():
        trainer_state = written / layout.HF_TRAINER_STATE_FILE
        if trainer_state.is_file():  # the rank that saves the Trainer state wrote it, with the staging path in it
            trainer.state.save_to_json(str(trainer_state))
        move_entries_up(written)


def pieces_written(folder: Path) -> list[str]:
    """The stock pieces the `hf` engine can read back from a folder the stock saver wrote (`manifest.states`): the
    consolidated weights, `optimizer.pt`, the RNG files, ... FSDP's DCP folders and DeepSpeed's `global_step{N}/`
    are in the manifest's files (checksummed) but are not pieces: only the stock loader reads them."""
    engine = HFEngine()
    engine.open(str(folder))
    return engine.pieces()


@contextmanager
def _instance_attributes(obj: Any, **values: Any) -> Iterator[None]:
    """Set attributes on the instance for the block; afterwards each is what it was (or absent again)."""
    missing = object()
    previous = {name: obj.__dict__.get(name, missing) for name in values}
    for name, value in values.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is missing:
                obj.__dict__.pop(name, None)
            else:
                setattr(obj, name, value)


# ---------------------------------------------------------------------------------------------- end of training


def load_best_with_stock_loader(trainer: Any, checkpoint: str) -> None:
    """On every rank: the stock `_load_best_model` restores the weights of `checkpoint` (already verified), as the
    Trainer does with `TrainingArguments(load_best_model_at_end=True)`: DeepSpeed's loader, FSDP's, or the files."""
    trainer.state.best_model_checkpoint = checkpoint
    getattr(type(trainer), LOAD_BEST_METHOD)(trainer)


def full_model_state(trainer: Any) -> dict[str, torch.Tensor]:
    """On every rank (a collective with FSDP and ZeRO-3): the model's whole tensors, as the stock `save_model`
    gathers them (`accelerator.get_state_dict`, on the CPU); complete on process 0, possibly empty elsewhere."""
    wrapped = trainer.deepspeed if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model
    return dict(trainer.accelerator.get_state_dict(wrapped))


def weights_as_saved(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gathered weights `full` under the keys `save_pretrained` writes: names that are one parameter in the live
    model (tied weights) are made one tensor again (a gather copies each), so that the alias is dropped as it is
    from a live state dict; the ignored keys are dropped too."""
    groups: dict[int, list[str]] = {}
    for name, value in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        groups.setdefault(id(value), []).append(_without_wrappers(name))
    state = dict(full)
    for names in groups.values():
        present = [name for name in names if name in state]
        for alias in present[1:]:
            state[alias] = state[present[0]]
    return saved_state_dict(model, state)


def _without_wrappers(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name
