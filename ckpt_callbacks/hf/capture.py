"""What an HF checkpoint holds: every piece the stock `Trainer._save_checkpoint` writes, built in memory.

The pieces are named as the `hf` engine expects ("model", "optimizer",
"scheduler", "scaler", "trainer_state", "training_args", "pretrained"; for a
PEFT model "adapter" and "{name}/adapter" instead of "model"), so the core
writes them in the exact stock layout. Nothing here touches a file: objects in
the "pretrained" piece write their own files when the core calls their
`save_pretrained`, as a model config does.

Capturing has the stock saver's side effects on `trainer.state` (flops
accounting, `best_model_checkpoint`, the `stateful_callbacks` refresh), because
the Trainer, other callbacks and `trainer_state.json` rely on them.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.trainer_callback import ExportableState

from ckpt_callbacks.core.format.engines.hf_engine import ADAPTER_PIECE
from ckpt_callbacks.core.format.safetensors_io import view_key
from ckpt_callbacks.hf import trainer_hooks

try:  # PEFT models are saved as their adapters, as the stock Trainer saves them
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
except ImportError:  # pragma: no cover - depends on the environment
    PeftModel = None  # type: ignore[assignment,misc]
    get_peft_model_state_dict = None  # type: ignore[assignment]
    set_peft_model_state_dict = None  # type: ignore[assignment]

try:  # transformers >= 5: the helpers save_pretrained itself uses
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict
except ImportError:  # transformers 4.x: the hf engine keeps one name per shared tensor instead
    revert_weight_conversion = None  # type: ignore[assignment]
    remove_tied_weights_from_state_dict = None  # type: ignore[assignment]

DEFAULT_ADAPTER = "default"  # the adapter PeftModel.save_pretrained writes at the top of the folder


def checkpoint_pieces(trainer: Any, trial: Any, *, best_checkpoint: str | None, save_only_model: bool,
                      training_args: Any) -> dict[str, Any]:
    """The stock checkpoint of `trainer` at its current step, as named pieces for `CheckpointManager.save`.

    `best_checkpoint` is the path the stock saver would record as `state.best_model_checkpoint` (or None to
    leave it as it is); it is set before `trainer_state` is captured, as the stock saver does.
    `save_only_model`: the flag the run saves with (the callback's may differ from the Trainer's);
    `training_args`: what `training_args.bin` records (the Trainer's arguments with the run's save flags).
    """
    state = trainer.state
    if trainer.hp_search_backend is None and trial is None:
        trainer.store_flos()
    model = unwrapped_model(trainer)
    pieces: dict[str, Any] = weight_pieces(model)
    pretrained = pretrained_objects(model, processing_class_of(trainer))
    if pretrained:
        pieces["pretrained"] = pretrained
    pieces["training_args"] = training_args
    if best_checkpoint is not None:
        state.best_model_checkpoint = best_checkpoint
    if not save_only_model:
        pieces.update(training_objects(trainer))
    refresh_stateful_callbacks(trainer)
    pieces["trainer_state"] = dataclasses.asdict(state)  # a deep copy, detached from the live state
    return pieces


def unwrapped_model(trainer: Any) -> torch.nn.Module:
    """The user's model without DDP / torch.compile wrappers."""
    return trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)


def weight_pieces(model: Any) -> dict[str, Any]:
    """The weights as the stock saver writes them: `model` (the state dict `save_pretrained` writes), or for a
    PEFT model one `adapter` piece per adapter (`{name}/adapter` for a non-default one), holding only what
    `PeftModel.save_pretrained` writes: the frozen base model is not captured at all."""
    if is_peft_model(model):
        return {adapter_piece(name): adapter_state_dict(model, name) for name in model.peft_config}
    return {"model": model_state_dict(model)}


def is_peft_model(model: Any) -> bool:
    """Whether the stock saver writes `model` as a PEFT adapter (`PeftModel.save_pretrained`)."""
    return PeftModel is not None and isinstance(model, PeftModel)


def adapter_piece(adapter_name: str) -> str:
    """The piece of adapter `adapter_name`: where `PeftModel.save_pretrained` puts its files."""
    return ADAPTER_PIECE if adapter_name == DEFAULT_ADAPTER else f"{adapter_name}/{ADAPTER_PIECE}"


def adapter_state_dict(model: Any, adapter_name: str,
                       state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter under the names `adapter_model.safetensors` holds (live tensors; with
    `state_dict`, taken from that whole state of the model instead, e.g. one gathered from sharded ranks)."""
    assert get_peft_model_state_dict is not None
    return dict(get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter_name,
                                          save_embedding_layers="auto"))


class AdapterWeights:
    """One adapter of a live PEFT model as a loadable target: `load_state_dict` puts an `adapter_model` state
    back with `set_peft_model_state_dict` (what `PeftModel.load_adapter` does after reading the file)."""

    def __init__(self, model: Any, adapter_name: str) -> None:
        self.model = model
        self.adapter_name = adapter_name

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model, self.adapter_name)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        assert set_peft_model_state_dict is not None
        result = set_peft_model_state_dict(self.model, state, adapter_name=self.adapter_name)
        unexpected = list(getattr(result, "unexpected_keys", ()))
        if unexpected:
            raise KeyError(f"adapter {self.adapter_name!r} has no parameters {unexpected[:5]}")


def adapter_targets(model: Any) -> dict[str, AdapterWeights]:
    """Every adapter of a PEFT model, keyed by its piece."""
    return {adapter_piece(name): AdapterWeights(model, name) for name in model.peft_config}


class PeftFiles:
    """What `PeftModel.save_pretrained` writes beside the adapter weights: the model card `README.md` and each
    adapter's `adapter_config.json` (in `{name}/` for a non-default adapter), prepared as it prepares them.

    The configs are copied when the checkpoint is captured; `save_pretrained(directory)` runs when the core
    writes the checkpoint (possibly in the background) and reads only the model's card data then. With
    `extra_adapter_weights`, it also writes the weights of the non-default adapters (for the export, whose
    own weights file holds the default adapter)."""

    def __init__(self, model: Any, *, extra_adapter_weights: bool = False) -> None:
        self._model = model
        self._configs = [(name, *_config_as_saved(model, name)) for name in model.peft_config]
        self._extra_adapter_weights = extra_adapter_weights

    def save_pretrained(self, directory: str) -> None:
        self._model.create_or_update_model_card(directory)
        for name, config, auto_mapping in self._configs:
            folder = directory if name == DEFAULT_ADAPTER else os.path.join(directory, name)
            os.makedirs(folder, exist_ok=True)
            config.save_pretrained(folder, auto_mapping_dict=auto_mapping)
            if self._extra_adapter_weights and name != DEFAULT_ADAPTER:
                self._model.save_pretrained(directory, selected_adapters=[name])


def _config_as_saved(model: Any, adapter_name: str) -> tuple[Any, dict[str, str] | None]:
    """A copy of an adapter's config as `PeftModel.save_pretrained` writes it, and its auto-mapping."""
    live = model.peft_config[adapter_name]
    if live.base_model_name_or_path is None:  # the stock saver's side effect on the live config
        base = model.base_model if live.is_prompt_learning else model.base_model.model
        live.base_model_name_or_path = base.__dict__.get("name_or_path", None) or None
    config = copy.deepcopy(live)
    config.inference_mode = True
    auto_mapping = None
    if config.task_type is None:
        base_class = model._get_base_model_class(is_prompt_tuning=config.is_prompt_learning)
        auto_mapping = {"base_model_class": base_class.__name__, "parent_library": base_class.__module__}
    return config, auto_mapping


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights under the keys `save_pretrained` writes (live tensors: the core copies them when it stages).

    A `PreTrainedModel` drops tied aliases and ignored keys exactly as `save_pretrained` does. A plain
    module keeps every key, tied aliases stored as copies: the stock resume loads it with
    `load_state_dict(strict=False)` and then fails on any missing key of a non-`PreTrainedModel`.
    """
    return saved_state_dict(model, model.state_dict())


def saved_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` (the model's state dict, or one shaped like it) under the keys `save_pretrained` writes: see
    `model_state_dict`. Tied weights are found by shared storage, so `state` must alias them as the model does."""
    if not isinstance(model, PreTrainedModel):
        return _with_aliases_copied(state)
    for key in model._keys_to_ignore_on_save or ():
        state.pop(key, None)
    if remove_tied_weights_from_state_dict is not None:
        # Must see the tensors aliased as in the model: it finds ties by shared storage.
        state = remove_tied_weights_from_state_dict(state, model)
    if revert_weight_conversion is not None:
        state = revert_weight_conversion(model, state)
    return state


def pretrained_objects(model: torch.nn.Module, processing_class: Any, *, export: bool = False) -> list[Any]:
    """Objects whose `save_pretrained` writes the files `from_pretrained` needs beside the weights (for a PEFT
    model, `PeftModel.from_pretrained` and `AutoPeftModel*`: the adapter configs and the model card)."""
    objects: list[Any] = []
    if is_peft_model(model):
        objects.append(PeftFiles(model, extra_adapter_weights=export))
    elif isinstance(model, PreTrainedModel):
        # Copies: the write may happen in the background, and save_pretrained edits the live config.
        config = copy.deepcopy(model.config)
        trainer_hooks.set_config_dtype(config, str(model.dtype).split(".")[1])
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
