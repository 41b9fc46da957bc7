"""What an HF checkpoint holds: every piece the stock `Trainer._save_checkpoint` writes, built in memory.

The pieces are named as the `hf` engine expects ("model", "optimizer",
"scheduler", "scaler", "trainer_state", "training_args", "pretrained"), so the
core writes them in the exact stock layout. Nothing here touches a file.

Capturing has the stock saver's side effects on `trainer.state` (flops
accounting, `best_model_checkpoint`, the `stateful_callbacks` refresh), because
the Trainer, other callbacks and `trainer_state.json` rely on them.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.trainer_callback import ExportableState

from ckpt_callbacks.core.format.safetensors_io import view_key

try:  # transformers >= 5: the helpers save_pretrained itself uses
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
except ImportError:  # transformers 4.x: the hf engine keeps one name per shared tensor instead
    revert_weight_conversion = None  # type: ignore[assignment]
    remove_tied_weights_from_state_dict = None  # type: ignore[assignment]


def checkpoint_pieces(trainer: Any, trial: Any, *, best_checkpoint: str | None) -> dict[str, Any]:
    """The stock checkpoint of `trainer` at its current step, as named pieces for `CheckpointManager.save`.

    `best_checkpoint` is the path the stock saver would record as `state.best_model_checkpoint` (or None to
    leave it as it is); it is set before `trainer_state` is captured, as the stock saver does.
    """
    args, state = trainer.args, trainer.state
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    model = unwrapped_model(trainer)
    pieces: dict[str, Any] = {"model": model_state_dict(model)}
    pretrained = pretrained_objects(model, processing_class_of(trainer))
    if pretrained:
        pieces["pretrained"] = pretrained
    pieces["training_args"] = args
    if best_checkpoint is not None:
        state.best_model_checkpoint = best_checkpoint
    if not args.save_only_model:
        pieces.update(training_objects(trainer))
    refresh_stateful_callbacks(trainer)
    pieces["trainer_state"] = dataclasses.asdict(state)  # a deep copy, detached from the live state
    return pieces


def unwrapped_model(trainer: Any) -> torch.nn.Module:
    """The user's model without DDP / torch.compile wrappers."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the keys `save_pretrained` writes (live tensors: the core copies them when it stages).

    A `PreTrainedModel` drops tied aliases and ignored keys exactly as `save_pretrained` does. A plain
    module keeps every key, tied aliases stored as copies: the stock resume loads it with
    `load_state_dict(strict=False)` and then fails on any missing key of a non-`PreTrainedModel`.
    """
    state = model.state_dict()
    if not isinstance(model, PreTrainedModel):
        return _with_aliases_copied(state)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    if remove_tied_weights_from_state_dict is not None:
        # Must see the live tensors: it finds ties by shared storage.
        state = remove_tied_weights_from_state_dict(state, model)
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    return state


def pretrained_objects(model: torch.nn.Module, processing_class: Any) -> list[Any]:
    """Objects whose `save_pretrained` writes the files `from_pretrained` needs beside the weights."""
    objects: list[Any] = []
    if isinstance(model, PreTrainedModel):
        # Copies: the write may happen in the background, and save_pretrained edits the live config.
        config = copy.deepcopy(model.config)
        config.dtype = str(model.dtype).split(".")[1]
        config.architectures = [type(model).__name__.removeprefix("FSDP")]
        objects.append(config)
        if model.can_generate() and model.generation_config is not None:
            objects.append(copy.deepcopy(model.generation_config))
    if processing_class is not None:
        objects.append(processing_class)
    return objects


def processing_class_of(trainer: Any) -> Any:
    """The tokenizer or processor the stock saver writes: `processing_class`, else the collator's tokenizer."""
    if trainer.processing_class is not None:
        return trainer.processing_class
    return getattr(trainer.data_collator, "tokenizer", None)


def training_objects(trainer: Any) -> dict[str, Any]:
    """Optimizer, scheduler and (with AMP) grad scaler: what resuming needs beyond the weights."""
    objects = {"optimizer": trainer.optimizer, "scheduler": trainer.lr_scheduler}
    scaler = getattr(trainer.accelerator, "scaler", None)
    if scaler is not None:
        objects["scaler"] = scaler
    return objects


def refresh_stateful_callbacks(trainer: Any) -> None:
    """Record the state of every `ExportableState` callback (and `TrainerControl`) in `trainer.state`.

    Unlike the stock saver, several instances of one class are stored as the list of their current
    states instead of being appended to the stored list at every save (transformers PR #33875).
    """
    states: dict[str, list[Any]] = {}
    for callback in [*trainer.callback_handler.callbacks, trainer.control]:
        if isinstance(callback, ExportableState):
            states.setdefault(type(callback).__name__, []).append(callback.state())
    for name, values in states.items():
        trainer.state.stateful_callbacks[name] = values if len(values) > 1 else values[0]


def _with_aliases_copied(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every key kept; a tensor sharing memory with an earlier key is cloned (safetensors cannot alias)."""
    seen: set[Any] = set()
    result = {}
    for name, tensor in state.items():
        key = view_key(tensor)
        result[name] = tensor.clone() if key is not None and key in seen else tensor
        if key is not None:
            seen.add(key)
    return result
