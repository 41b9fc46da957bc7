"""Run by test_sharded_gpu.py under torchrun: Trainer runs of one strategy (FSDP2/FSDP1 with a sharded or full state
dict, DeepSpeed ZeRO-1/2/3 on CUDA; `ddp` on CPU with the stock saver forced, to check this script where there is
no GPU), with and without the callback, each in its own folder under ROOT:

    python -m torch.distributed.run --standalone --nproc_per_node N -m tests.hf.sharded_train ROOT STRATEGY [reshard]

- stock/  the stock Trainer alone: 10 steps, a checkpoint every 3 steps and at the end, an evaluation at each
          (scripted scores, the best at step 9), `save_total_limit=2`, `load_best_model_at_end=True`;
- ref/    the same run with the callback (uninterrupted);
- run/    the same run with the callback, interrupted after step 7 (its newest checkpoint is step 6), then resumed
          by a fresh Trainer (another init seed) with the stock `train(resume_from_checkpoint=True)`;
- cbbest/ 6 steps, `load_best_model_at_end` given to the callback alone (best at step 3), the export at the end;
- only/, only-stock/  `save_only_model=True`, with and without the callback (not under FSDP SHARDED_STATE_DICT,
          which the stock Trainer refuses with it);
- refused/ (nothing is written): what attaching the callback raises for the combinations it cannot serve
          (ROOT/refusals.pt: case -> message).

Rank 0 writes ROOT/{name}.pt for each run: the whole weights at each save (gathered as the stock `save_model`
gathers them), at the end, the losses, and `state.best_model_checkpoint`. `reshard` (one process): resume
reshard/checkpoint-9 (the test copies ref/'s there) at world size 1, record the weights the stock loader restored
when training starts, stop there, and write ROOT/reshard.pt.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, default_data_collator

from ckpt_callbacks.hf import CheckpointCallback
from tests.hf.conftest import EVAL, TRAIN, CrashAtStep, Interrupted, losses, tiny_gpt2, training_args

warnings.filterwarnings("ignore")
# The score of the evaluation at each step (lower is better), by step: a resumed run evaluates as the uninterrupted one.
SCORES = {3: 3.0, 6: 2.0, 9: 1.0, 10: 1.5}  # the best at step 9
CALLBACK_BEST_SCORES = {3: 1.0, 6: 2.0}  # the best at step 3


def deepspeed_config(stage: int, gather_on_save: bool = True) -> dict[str, Any]:
    return {
        "zero_optimization": {"stage": stage, "stage3_gather_16bit_weights_on_model_save": gather_on_save},
        "zero_allow_untested_optimizer": True,  # the Trainer's own AdamW
        "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
    }


def fsdp(version: int, state_dict_type: str) -> dict[str, Any]:
    return {"fsdp": True, "fsdp_config": {"version": version, "state_dict_type": state_dict_type}}


STRATEGIES: dict[str, dict[str, Any]] = {
    "fsdp2-sharded": fsdp(2, "SHARDED_STATE_DICT"),
    "fsdp2-full": fsdp(2, "FULL_STATE_DICT"),
    "fsdp1-sharded": fsdp(1, "SHARDED_STATE_DICT"),
    "fsdp1-full": fsdp(1, "FULL_STATE_DICT"),
    "zero1": {"deepspeed": deepspeed_config(1)},
    "zero2": {"deepspeed": deepspeed_config(2)},
    "zero3": {"deepspeed": deepspeed_config(3)},
    "ddp": {"use_cpu": True, "ddp_backend": "gloo"},  # CPU: the same runs through the stock saver (forced)
}
SAVE_ONLY_MODEL_REFUSED = ("fsdp2-sharded", "fsdp1-sharded")


def whole_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every rank (a collective when sharded): the weights as the stock `save_model` gathers them, on the CPU."""
    wrapped = trainer.deepspeed if trainer.is_deepspeed_enabled else trainer.model
    state = trainer.accelerator.get_state_dict(wrapped)
    return {name: tensor.detach().cpu().clone() for name, tensor in state.items()}


class RecordSaves(TrainerCallback):
    """The whole weights at every save (after the checkpoint was written); with `stop_at_start`, the weights a
    resume restored, at the start of training, and then training is stopped (raises `Interrupted`)."""

    def __init__(self, stop_at_start: bool = False) -> None:
        self.trainer: Trainer | None = None
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.stop_at_start = stop_at_start
        self.start: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.stop_at_start:
            assert self.trainer is not None
            self.start = whole_weights(self.trainer)
            raise Interrupted(f"stopped at the start, step {state.global_step}")

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        assert self.trainer is not None
        self.saved[state.global_step] = whole_weights(self.trainer)


def run(root: Path, strategy: str, name: str, *, with_callback: bool, callback_flags: dict[str, Any] | None = None,
        crash_at: int | None = None, resume: Any = None, model_seed: int = 0, scores: dict[int, float] | None = None,
        stop_at_start: bool = False, **flags: Any) -> None:
    from accelerate.state import AcceleratorState

    base: dict[str, Any] = dict(max_steps=10, save_steps=3, gradient_accumulation_steps=1, logging_steps=1,
                                use_cpu=False, report_to=[])
    if scores is not None:
        base.update(eval_strategy="steps", eval_steps=3, metric_for_best_model="score", greater_is_better=False)
    args = training_args(root / name.split("-")[0] if name.startswith("run") else root / name,
                         **{**base, **STRATEGIES[strategy], **flags})
    model = tiny_gpt2(model_seed)  # after the TrainingArguments: ZeRO-3 partitions a model built after them
    recorder = RecordSaves(stop_at_start)
    callbacks: list[TrainerCallback] = [recorder]
    if with_callback:
        checkpointing = CheckpointCallback(**(callback_flags or {}))
        if strategy == "ddp":
            checkpointing.stock_saver = True
        callbacks.append(checkpointing)
    if crash_at is not None:
        callbacks.append(CrashAtStep(crash_at))
    trainer = Trainer(model=model, args=args, train_dataset=TRAIN, eval_dataset=EVAL if scores else None,
                      data_collator=default_data_collator, callbacks=callbacks)
    recorder.trainer = trainer
    if scores is not None:
        trainer.compute_metrics = lambda prediction: {"score": scores[trainer.state.global_step]}
    try:
        trainer.train(resume_from_checkpoint=resume)
    except Interrupted:
        assert crash_at is not None or stop_at_start
    final = whole_weights(trainer)
    if args.process_index == 0:
        torch.save({"saved": recorder.saved, "start": recorder.start, "final": final, "losses": losses(trainer),
                    "best_model_checkpoint": trainer.state.best_model_checkpoint,
                    "world_size": args.world_size}, root / f"{name}.pt")
    AcceleratorState._reset_state()  # the next Trainer of this process builds its own accelerator state


def refusals(root: Path, strategy: str) -> dict[str, str]:
    """What attaching the callback raises for the combinations it cannot serve under `strategy` (no training)."""
    from accelerate.state import AcceleratorState

    cases: dict[str, tuple[dict[str, Any], dict[str, Any], bool | None]] = {
        "stock_saver=False": ({}, {}, False),
    }
    if strategy.endswith("-sharded"):
        cases["save_only_model"] = ({}, {"save_only_model": True, "export_at_end": False}, None)
    if strategy == "zero3":
        cases["export without gather"] = ({"deepspeed": deepspeed_config(3, gather_on_save=False)}, {}, None)
    raised = {}
    for case, (flags, callback_flags, stock_saver) in cases.items():
        args = training_args(root / "refused", **{"use_cpu": False, "report_to": [], **STRATEGIES[strategy], **flags})
        callback = CheckpointCallback(**callback_flags)
        callback.stock_saver = stock_saver
        try:
            Trainer(model=tiny_gpt2(), args=args, train_dataset=TRAIN, data_collator=default_data_collator,
                    callbacks=[callback])
        except ValueError as exc:
            raised[case] = str(exc)
        else:
            raised[case] = "accepted"
        AcceleratorState._reset_state()
    return raised


def main(root_arg: str, strategy: str, mode: str = "all") -> None:
    root = Path(root_arg)
    if torch.cuda.is_available():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    else:
        torch.set_num_threads(1)
    best_flags = dict(save_total_limit=2, load_best_model_at_end=True, scores=SCORES)
    if mode == "reshard":
        run(root, strategy, "reshard", with_callback=True, callback_flags={"export_at_end": False},
            resume=str(root / "reshard" / "checkpoint-9"), stop_at_start=True)
        return
    if strategy != "ddp":
        refused = refusals(root, strategy)
        if int(os.environ.get("RANK", "0")) == 0:
            torch.save(refused, root / "refusals.pt")
    run(root, strategy, "stock", with_callback=False, **best_flags)
    run(root, strategy, "ref", with_callback=True, **best_flags)
    run(root, strategy, "run-crash", with_callback=True, crash_at=7, **best_flags)
    run(root, strategy, "run-resumed", with_callback=True, resume=True, model_seed=123, **best_flags)
    run(root, strategy, "cbbest", with_callback=True, callback_flags={"load_best_model_at_end": True},
        max_steps=6, scores=CALLBACK_BEST_SCORES)
    if strategy not in SAVE_ONLY_MODEL_REFUSED:
        run(root, strategy, "only", with_callback=True, callback_flags={"export_at_end": False},
            max_steps=3, save_only_model=True)
        run(root, strategy, "only-stock", with_callback=False, max_steps=3, save_only_model=True)


if __name__ == "__main__":
    main(*sys.argv[1:4])
