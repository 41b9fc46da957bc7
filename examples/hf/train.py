"""ckpt_callbacks with transformers.Trainer: save, crash, resume exactly, keep the best, export.

    python examples/hf/train.py [--output-dir runs/hf-example]

Everything is local and runs on CPU in well under a minute: a tiny GPT-2 built from a config, a
word-level tokenizer and a dataset generated here. The script

1. trains with `save_strategy="steps"` and a crash injected at step 25 (checkpoints are every 10 steps,
   written in the background, committed atomically);
2. resumes with the stock `trainer.train(resume_from_checkpoint=True)` and checks the result equals an
   uninterrupted run bit for bit;
3. trains with `save_strategy="best"` on the eval loss, `save_total_limit=2` and
   `load_best_model_at_end`, then loads the sharded export with `from_pretrained`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
)
from transformers.trainer_utils import get_last_checkpoint

from ckpt_callbacks.hf import CheckpointCallback

VOCAB = 32
SEQ_LEN = 16


class CountingSequences(Dataset):
    """Sequences that count up modulo VOCAB from a random start with a random stride: learnable, and local."""

    def __init__(self, samples: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, VOCAB, (samples, 1), generator=generator)
        strides = torch.randint(1, 4, (samples, 1), generator=generator)
        self.tokens = (starts + strides * torch.arange(SEQ_LEN)) % VOCAB

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[index], "labels": self.tokens[index]}


class CrashAtStep(TrainerCallback):
    """Stands in for a node failure: raises at the end of optimizer step `step`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.step:
            raise SimulatedCrash(f"simulated crash at step {self.step}")


class SimulatedCrash(RuntimeError):
    pass


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"t{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), unk_token="t0")


def tiny_gpt2(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ_LEN,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


TRAIN, EVAL = CountingSequences(256, seed=0), CountingSequences(32, seed=1)


def trainer(output_dir: Path, callbacks: list[TrainerCallback], model_seed: int = 0, **flags: Any) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=8, per_device_eval_batch_size=8,
        gradient_accumulation_steps=2, num_train_epochs=3, learning_rate=3e-3, warmup_steps=5,
        lr_scheduler_type="linear", logging_steps=10, seed=42, report_to=[], use_cpu=True, disable_tqdm=True,
        **flags,
    )
    return Trainer(model=tiny_gpt2(model_seed), args=args, train_dataset=TRAIN, eval_dataset=EVAL,
                   data_collator=default_data_collator, processing_class=tokenizer(), callbacks=callbacks)


def folders(directory: Path) -> list[str]:
    return sorted((p.name for p in directory.iterdir() if not p.name.startswith(".")), key=_step_order)


def _step_order(name: str) -> tuple[int, str]:
    step = name.removeprefix("checkpoint-")
    return (int(step), name) if step.isdigit() else (1 << 30, name)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    other = b.state_dict()
    return all(torch.equal(tensor, other[name]) for name, tensor in a.state_dict().items())


def crash_and_resume(root: Path) -> None:
    print("\n== 1. steps strategy: a crash at step 25, then the stock resume ==")
    steps = dict(save_strategy="steps", save_steps=10)
    run = root / "steps"
    crashing = trainer(run, [CheckpointCallback(), CrashAtStep(25)], **steps)
    try:
        crashing.train()
    except SimulatedCrash as crash:
        print(f"training died: {crash}; on disk: {folders(run)}")

    last = Path(get_last_checkpoint(str(run))).name  # what resume_from_checkpoint=True picks
    resumed = trainer(run, [CheckpointCallback()], model_seed=1234, **steps)  # other init: weights come from disk
    resumed.train(resume_from_checkpoint=True)
    print(f"resumed from {last} and finished at step {resumed.state.global_step}; on disk: {folders(run)}")

    reference = trainer(root / "uninterrupted", [CheckpointCallback(export_at_end=False)], **steps)
    reference.train()
    identical = same_weights(resumed.model, reference.model)
    print(f"final weights equal to an uninterrupted run, bit for bit: {identical}")
    if not identical:
        raise SystemExit("resume was not exact")


def best_and_export(root: Path) -> None:
    print("\n== 2. best strategy: keep the best, restore it at the end, export it sharded ==")
    run = root / "best"
    best = trainer(
        run, [CheckpointCallback(max_shard_size="50KB")], save_strategy="best", eval_strategy="steps",
        eval_steps=8, metric_for_best_model="eval_loss", save_total_limit=2, load_best_model_at_end=True,
    )
    best.train()
    newest = "the newest, as the model was still improving" if best.state.best_global_step == best.state.global_step else "restored"
    print(f"best checkpoint: {best.state.best_model_checkpoint} (eval_loss {best.state.best_metric:.4f}, {newest}); "
          f"on disk: {folders(run)}")
    export = run / "export"
    shards = sorted(p.name for p in export.glob("model-*.safetensors"))
    print(f"export: {len(shards)} shards + model.safetensors.index.json + config and tokenizer in {export}")

    reloaded = AutoModelForCausalLM.from_pretrained(export).eval()
    best.model.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=EVAL.tokens).logits, best.model(input_ids=EVAL.tokens).logits)
    print(f"from_pretrained(export) gives the best model's logits exactly: {same}")
    saves = [entry for entry in best.state.log_history if "ckpt_save_total_s" in entry]
    if saves:
        print(f"last reported save: training waited {saves[-1]['ckpt_save_blocking_s'] * 1000:.1f} ms, "
              f"durable after {saves[-1]['ckpt_save_total_s'] * 1000:.1f} ms")
    if not same:
        raise SystemExit("export does not reproduce the model")


def prepare(output_dir: Path, default: bool) -> None:
    if output_dir.exists() and any(output_dir.iterdir()):
        if not default:
            raise SystemExit(f"{output_dir} is not empty: pass an empty or new --output-dir.")
        shutil.rmtree(output_dir)  # the example's own folder from an earlier run
    output_dir.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", type=Path, default=None, help="where runs go (default runs/hf-example)")
    options = parser.parse_args(argv)
    root = options.output_dir or Path("runs/hf-example")
    prepare(root, default=options.output_dir is None)
    torch.set_num_threads(1)  # a model this small runs fastest on one thread
    crash_and_resume(root)
    best_and_export(root)
    print(f"\ndone: everything is in {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
