"""Real `transformers.Trainer` runs on a tiny GPT-2 built from config and random tokens made here (CPU, seconds).

40 samples, batch 4, gradient accumulation 2: 5 optimizer steps per epoch, 3 epochs, 15 steps, with
dropout 0.1, shuffling, and a warmup + linear decay schedule, so weights, optimizer, scheduler, RNG and
data order all matter for an exact resume.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Dataset
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)

VOCAB = 64
STEPS_PER_EPOCH = 5
MAX_STEPS = 15


class RandomTokens(Dataset):
    """Fixed random token sequences; each sample is its own language-modelling target."""

    def __init__(self, samples: int, seq_len: int = 16, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (samples, seq_len), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


TRAIN = RandomTokens(40, seed=0)
EVAL = RandomTokens(8, seed=1)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)  # dropout 0.1 everywhere by default; lm_head tied to wte


def training_args(output_dir: Path, **overrides: Any) -> TrainingArguments:
    base: dict[str, Any] = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, num_train_epochs=3, learning_rate=1e-3, warmup_steps=2,
        lr_scheduler_type="linear", logging_steps=1, seed=42, report_to=[], use_cpu=True, disable_tqdm=True,
        save_strategy="steps", save_steps=4,
    )
    base.update(overrides)
    return TrainingArguments(**base)


def make_trainer(
    output_dir: Path, callbacks: Sequence[TrainerCallback] = (), *, model: torch.nn.Module | None = None,
    model_seed: int = 0, **args: Any,
) -> Trainer:
    evaluating = args.get("eval_strategy", "no") != "no"
    return Trainer(
        model=model if model is not None else tiny_gpt2(model_seed),
        args=training_args(output_dir, **args),
        train_dataset=TRAIN,
        eval_dataset=EVAL if evaluating else None,
        data_collator=default_data_collator,
        callbacks=list(callbacks),
    )


class ScriptedMetric:
    """`compute_metrics` returning the next value of a script as `score` (so evaluations rank predictably)."""

    def __init__(self, values: Sequence[float]) -> None:
        self._values: Iterator[float] = itertools.chain(values, itertools.repeat(values[-1]))

    def __call__(self, prediction: Any) -> dict[str, float]:
        return {"score": next(self._values)}


class CrashAtStep(TrainerCallback):
    """Raises at the end of optimizer step `step`: an interruption after earlier checkpoints."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise Interrupted(f"interrupted at step {self.step}")


class Interrupted(RuntimeError):
    pass


def losses(trainer: Trainer) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_same_state_dicts(actual: Any, expected: Any, path: str = "") -> None:
    """Nested state (optimizer, scheduler) equal: tensors bit for bit, everything else by value."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and torch.equal(actual, expected), path
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), path
        for key in expected:
            assert_same_state_dicts(actual[key], expected[key], f"{path}/{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), path
        for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_same_state_dicts(a, e, f"{path}/{index}")
    else:
        assert actual == expected, path


def checkpoint_steps(output_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in output_dir.glob("checkpoint-*"))


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread() -> Iterator[None]:
    """The model is tiny: one thread is ~10x faster than two fighting over a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def stock_save_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Steps at which the stock `Trainer._save_checkpoint` ran (class method patched with a counter)."""
    calls: list[int] = []
    stock: Callable[..., None] = Trainer._save_checkpoint

    def counting(self: Trainer, model: Any, trial: Any) -> None:
        calls.append(self.state.global_step)
        stock(self, model, trial)

    monkeypatch.setattr(Trainer, "_save_checkpoint", counting)
    return calls
