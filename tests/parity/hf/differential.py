"""Differential harness: one `transformers.Trainer` scenario played twice, stock and with `CheckpointCallback()`.

A scenario is a function of a `Run`. It builds and trains Trainers through `run.trainer(...)` and
`run.train(...)`; in the stock half they are plain Trainers, in the other half each one gets a fresh
`CheckpointCallback(**flags)` appended to its callbacks, which is the one line a user adds. Both halves start
from the same model seed, the same data and the same `TrainingArguments` (seed 42), each in its own
output folder, so any difference between their `Observation`s is the callback's doing.

`assert_same_observations(stock, ours)` then checks everything a user can see, in this order (the first
difference found is the one reported): the exception raised, the `checkpoint-*` folders and their files,
the best checkpoint the Trainer tracks, the final weights and optimizer state, each checkpoint's contents,
and `trainer_state.json` (each checkpoint's and the live `trainer.state`).

What is deliberately not compared, and why:
  - `manifest.json` in each checkpoint and the `export` folder: documented additions of the callback
    (SPEC.md "On disk" and "Export"); tests of those features check them on their own.
  - keys ending in `_runtime`, `_samples_per_second`, `_steps_per_second`, `_tokens_per_second` in the
    state's `log_history`: the stock Trainer's wall-clock measurements (`speed_metrics`), which differ
    between any two runs, stock against stock included. Nothing else is excluded: `total_flos`,
    `train_loss`, `grad_norm` and every other logged value are deterministic here and must be equal.
  - the absolute output folder inside values (`best_model_checkpoint`, `TrainingArguments.output_dir`):
    each half has its own; values are compared with it replaced by `<output_dir>`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, default_data_collator

from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import EVAL, TRAIN, CrashAtStep, Interrupted, tiny_gpt2, training_args

# The callback's documented additions (see the module docstring).
ADDED_CHECKPOINT_FILES = frozenset({"manifest.json"})
ADDED_RUN_ENTRIES = frozenset({"export"})
# The stock Trainer's wall-clock measurements in log_history (`transformers.trainer_utils.speed_metrics`).
TIMING_KEY = re.compile(r"(_runtime|_samples_per_second|_steps_per_second|_tokens_per_second)$")
OUTPUT_DIR = "<output_dir>"

ModelFactory = Callable[[int], torch.nn.Module]
Scenario = Callable[["Run"], None]


@dataclass
class Run:
    """One half of a differential test: builds Trainers in `output_dir`, with the callback or without."""

    output_dir: Path
    with_callback: bool
    callback_flags: dict[str, Any] = field(default_factory=dict)
    trainers: list[Trainer] = field(default_factory=list)

    @property
    def half(self) -> str:
        return "ours" if self.with_callback else "stock"

    def trainer(
        self, *, model: ModelFactory = tiny_gpt2, model_seed: int = 0,
        callbacks: Sequence[TrainerCallback] = (), trainer_class: type[Trainer] = Trainer,
        eval_dataset: Any = None, compute_metrics: Any = None, with_callback: bool | None = None,
        callback_flags: dict[str, Any] | None = None, **args: Any,
    ) -> Trainer:
        """A Trainer on the tiny GPT-2 of tests/hf/conftest.py (`args` override its `TrainingArguments`).

        `with_callback` overrides the half's choice for this Trainer only (a migration mixes both);
        `callback_flags` override the flags given to `both()` for this Trainer's callback."""
        added: list[TrainerCallback] = []
        if self.with_callback if with_callback is None else with_callback:
            added.append(CheckpointCallback(**(self.callback_flags if callback_flags is None else callback_flags)))
        if eval_dataset is None and args.get("eval_strategy", "no") != "no":
            eval_dataset = EVAL
        trainer = trainer_class(
            model=model(model_seed), args=training_args(self.output_dir, **args), train_dataset=TRAIN,
            eval_dataset=eval_dataset, data_collator=default_data_collator, compute_metrics=compute_metrics,
            callbacks=[*callbacks, *added],
        )
        if hasattr(compute_metrics, "bind"):
            compute_metrics.bind(trainer)
        self.trainers.append(trainer)
        return trainer

    def train(self, *, resume_from_checkpoint: Any = None, crash_at: int | None = None,
              callbacks: Sequence[TrainerCallback] = (), **trainer_options: Any) -> Trainer:
        """Build a Trainer and train it; with `crash_at`, training raises `Interrupted` after that optimizer step
        (before that step's save), as a killed job would stop."""
        crash = [CrashAtStep(crash_at)] if crash_at is not None else []
        trainer = self.trainer(callbacks=[*callbacks, *crash], **trainer_options)
        if crash_at is None:
            trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        else:
            with pytest.raises(Interrupted):
                trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        return trainer


@dataclass
class Observation:
    """What a user of one half can see once its scenario ended (normally or by raising)."""

    half: str
    output_dir: Path
    trainer: Trainer | None
    error: Exception | None
    entries: set[str]  # names directly in output_dir
    checkpoints: dict[str, set[str]]  # `checkpoint-*` folder name -> relative paths of its files
    state: dict[str, Any] | None  # the last Trainer's `trainer.state`, normalized
    weights: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None

    def checkpoint(self, name: str | int) -> Path:
        return self.output_dir / (name if isinstance(name, str) else f"checkpoint-{name}")

    @property
    def steps(self) -> list[int]:
        """The steps of the `checkpoint-*` folders, in order."""
        return sorted(int(name.split("-")[1]) for name in self.checkpoints)

    def checkpoint_state(self, name: str | int) -> dict[str, Any]:
        """A checkpoint's `trainer_state.json`, normalized."""
        return normalized(json.loads((self.checkpoint(name) / "trainer_state.json").read_text()), self.output_dir)

    def checkpoint_weights(self, name: str | int, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
        return load_file(self.checkpoint(name) / file)

    @property
    def best(self) -> tuple[Any, Any, Any]:
        """`(best_model_checkpoint relative to output_dir, best_global_step, best_metric)` of the final state."""
        assert self.state is not None, f"{self.half}: no Trainer was built"
        return self.state["best_model_checkpoint"], self.state["best_global_step"], self.state["best_metric"]


def both(tmp_path: Path, scenario: Scenario, **callback_flags: Any) -> tuple[Observation, Observation]:
    """Play `scenario` with the stock Trainer, then with `CheckpointCallback(**callback_flags)` added."""
    stock = play(Run(tmp_path / "stock", with_callback=False), scenario)
    ours = play(Run(tmp_path / "ours", with_callback=True, callback_flags=callback_flags), scenario)
    return stock, ours


def play(run: Run, scenario: Scenario) -> Observation:
    error: Exception | None = None
    try:
        scenario(run)
    except Exception as exc:  # an exception is an observation like any other; pytest's own outcomes pass through
        error = exc
    return observe(run, error)


def observe(run: Run, error: Exception | None) -> Observation:
    trainer = run.trainers[-1] if run.trainers else None
    output_dir = Path(trainer.args.output_dir) if trainer is not None else run.output_dir
    entries = {path.name for path in output_dir.iterdir()} if output_dir.is_dir() else set()
    checkpoints = {
        path.name: {str(file.relative_to(path)) for file in path.rglob("*") if file.is_file()}
        for path in output_dir.glob("checkpoint-*") if path.is_dir()
    }
    state = weights = optimizer = None
    if trainer is not None:
        state = normalized(dataclasses.asdict(trainer.state), output_dir)
        weights = {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}
        if trainer.optimizer is not None:
            optimizer = copy.deepcopy(trainer.optimizer.state_dict())
    return Observation(run.half, output_dir, trainer, error, entries, checkpoints, state, weights, optimizer)


# --------------------------------------------------------------------------- comparing the halves


def assert_same_observations(stock: Observation, ours: Observation) -> None:
    """Everything a user observes is equal, except the documented additions (module docstring)."""
    assert_same_error(stock, ours)
    assert_same_checkpoint_files(stock, ours)
    assert_same_best(stock, ours)
    assert_same_final_model(stock, ours)
    assert_same_checkpoint_contents(stock, ours)
    assert_same_states(stock, ours)


def assert_same_error(stock: Observation, ours: Observation) -> None:
    """Both finished, or ours raised the stock exception's type (or a subclass of it)."""
    if stock.error is None:
        assert ours.error is None, f"stock finished, ours raised {ours.error!r}"
    else:
        assert isinstance(ours.error, type(stock.error)), f"stock raised {stock.error!r}, ours {ours.error!r}"


def assert_same_checkpoint_files(stock: Observation, ours: Observation) -> None:
    assert ours.steps == stock.steps, f"checkpoint folders: stock {stock.steps}, ours {ours.steps}"
    for name, stock_files in stock.checkpoints.items():
        ours_files = ours.checkpoints[name] - ADDED_CHECKPOINT_FILES
        assert ours_files == stock_files, (
            f"{name}: only ours {sorted(ours_files - stock_files)}, only stock {sorted(stock_files - ours_files)}"
        )


def assert_same_best(stock: Observation, ours: Observation) -> None:
    assert ours.best == stock.best, "(best_model_checkpoint, best_global_step, best_metric) differ"


def assert_same_final_model(stock: Observation, ours: Observation) -> None:
    assert stock.weights is not None and ours.weights is not None
    assert_same_tensors(ours.weights, stock.weights, "final weights")
    assert_same_values(ours.optimizer, stock.optimizer, "final optimizer state")


def assert_same_checkpoint_contents(stock: Observation, ours: Observation) -> None:
    """Each stock file's content equals ours (trainer_state.json is left to `assert_same_states`)."""
    for name, files in sorted(stock.checkpoints.items()):
        for file in sorted(files - {"trainer_state.json"}):
            assert_same_file(stock.checkpoint(name) / file, ours.checkpoint(name) / file, stock, ours)


def assert_same_states(stock: Observation, ours: Observation) -> None:
    for name in sorted(stock.checkpoints):
        diff = differences(ours.checkpoint_state(name), stock.checkpoint_state(name))
        assert not diff, f"{name}/trainer_state.json (ours vs stock): {diff}"
    diff = differences(ours.state, stock.state)
    assert not diff, f"trainer.state at the end (ours vs stock): {diff}"


def assert_same_file(stock_file: Path, ours_file: Path, stock: Observation, ours: Observation) -> None:
    label = str(stock_file.relative_to(stock.output_dir))
    if stock_file.suffix == ".safetensors":
        assert_same_tensors(load_file(ours_file), load_file(stock_file), label)
    elif stock_file.name == "training_args.bin":
        # Pickled TrainingArguments: compared field by field, each half's own output_dir normalized.
        ours_args = torch.load(ours_file, weights_only=False).to_dict()
        stock_args = torch.load(stock_file, weights_only=False).to_dict()
        diff = differences(normalized(ours_args, ours.output_dir), normalized(stock_args, stock.output_dir))
        assert not diff, f"{label}: {diff}"
    elif stock_file.suffix in (".pt", ".pth", ".bin"):
        assert_same_values(torch.load(ours_file, weights_only=False), torch.load(stock_file, weights_only=False), label)
    elif stock_file.suffix == ".json":
        diff = differences(normalized(json.loads(ours_file.read_text()), ours.output_dir),
                           normalized(json.loads(stock_file.read_text()), stock.output_dir))
        assert not diff, f"{label}: {diff}"
    else:
        assert ours_file.read_bytes() == stock_file.read_bytes(), label


def assert_holds_checkpoint_weights(observation: Observation, name: str | int, file: str = "model.safetensors") -> None:
    """The final model of `observation` holds exactly the weights saved in checkpoint `name`."""
    saved = observation.checkpoint_weights(name, file)
    assert observation.weights is not None
    unequal = [key for key, tensor in saved.items() if not torch.equal(observation.weights[key], tensor)]
    assert not unequal, f"{observation.half}: final weights differ from {name}/{file}: {unequal}"


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], label: str) -> None:
    assert sorted(actual) == sorted(expected), f"{label}: keys differ"
    unequal = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not unequal, f"{label}: tensors differ: {unequal}"


def assert_same_values(actual: Any, expected: Any, label: str) -> None:
    """Nested state equal: tensors and arrays bit for bit, everything else by value."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), label
    elif isinstance(expected, np.ndarray):
        assert isinstance(actual, np.ndarray) and np.array_equal(actual, expected), label
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(map(str, actual)) == sorted(map(str, expected)), f"{label}: keys"
        for key in expected:
            assert_same_values(actual[key], expected[key], f"{label}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), f"{label}: length"
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_values(a, e, f"{label}/{index}")
    else:
        assert actual == expected, f"{label}: {actual!r} != {expected!r}"


# --------------------------------------------------------------------------- states


def normalized(value: Any, output_dir: Path) -> Any:
    """`value` with the stock timing keys dropped and the half's output folder replaced by `<output_dir>`."""
    if isinstance(value, dict):
        return {key: normalized(item, output_dir) for key, item in value.items() if not TIMING_KEY.search(str(key))}
    if isinstance(value, (list, tuple)):
        return [normalized(item, output_dir) for item in value]
    if isinstance(value, str):
        return value.replace(str(output_dir), OUTPUT_DIR)
    return value


def differences(actual: Any, expected: Any, path: str = "") -> list[str]:
    """Where two JSON-like values differ, as readable paths (`log_history[3].loss: 3.1 != 3.2`)."""
    if isinstance(actual, dict) and isinstance(expected, dict):
        found = []
        for key in sorted(set(actual) | set(expected), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in expected:
                found.append(f"{where}: only in the first")
            elif key not in actual:
                found.append(f"{where}: only in the second")
            else:
                found += differences(actual[key], expected[key], where)
        return found
    if isinstance(actual, list) and isinstance(expected, list):
        if len(actual) != len(expected):
            return [f"{path}: {len(actual)} items != {len(expected)}"]
        return [found for index, (a, e) in enumerate(zip(actual, expected, strict=True)) for found in differences(a, e, f"{path}[{index}]")]
    return [] if actual == expected else [f"{path}: {actual!r} != {expected!r}"]


def difference_paths(actual: Any, expected: Any) -> set[str]:
    """Where two states differ, without the values: what differs, not by how much."""
    return {found.split(":")[0] for found in differences(actual, expected)}


# --------------------------------------------------------------------------- helpers for scenarios


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    """The real `ckpt-callbacks` command (the console script next to this interpreter, else `-m`)."""
    script = Path(sys.executable).with_name("ckpt-callbacks")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ckpt_callbacks.cli"]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=180)


def frozen_embeddings_and_first_block(seed: int) -> torch.nn.Module:
    """The tiny GPT-2 with its embeddings (tied to the LM head) and first block frozen: no optimizer state there."""
    model = tiny_gpt2(seed)
    for parameter in [*model.transformer.wte.parameters(), *model.transformer.h[0].parameters()]:
        parameter.requires_grad_(False)
    return model


class Scripted:
    """`compute_metrics` reporting `name` from a script keyed by the step of the evaluation.

    Keyed by step, not by call, so a resumed run reports what the uninterrupted one did. `values` maps steps to
    values, or, for several eval datasets, each dataset's size (`len(prediction.label_ids)`) to its own map;
    steps not in the script report `default`. `Run.trainer` binds it to its Trainer, whose step it reads."""

    def __init__(self, name: str, values: Mapping[int, float] | Mapping[int, Mapping[int, float]],
                 default: float = 9.0) -> None:
        self.name = name
        self.values = values
        self.default = default
        self.trainer: Trainer | None = None

    def bind(self, trainer: Trainer) -> None:
        self.trainer = trainer

    def __call__(self, prediction: Any) -> dict[str, float]:
        assert self.trainer is not None, "Scripted metrics are bound by Run.trainer"
        table: Any = self.values
        if all(isinstance(value, Mapping) for value in self.values.values()):
            table = self.values[len(prediction.label_ids)]
        return {self.name: float(table.get(self.trainer.state.global_step, self.default))}
