"""The places where the adapter reaches into a `Trainer` instance, and finding that instance.

Callback events receive the model, optimizer and scheduler but not the Trainer,
and no event fires between the stock loop's save decision and its call to
`Trainer._save_checkpoint`. So the adapter (1) finds the Trainer that fired an
event, (2) shadows `_save_checkpoint` on that instance (an instance attribute
wins over the class method; the Trainer's own flow still decides when to call
it and still fires `on_save` after it), (3) wraps `train` on the instance, to verify the checkpoint a
resume starts from before the stock loader reads it, and to flush pending
background writes when training raises (`on_train_end` does not fire then), and (4) shadows
`_load_optimizer_and_scheduler`, to hand the stock resume optimizer and scheduler states read ahead
(the Trainer still decides whether and when to load them).

The differences between the supported transformers and accelerate versions are handled here too, each
detected by feature where possible (see "Version differences" below).
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version
from transformers import Trainer
from transformers.trainer_pt_utils import reissue_pt_warnings
from transformers.utils import is_sagemaker_mp_enabled, is_torch_xla_available

SAVE_METHOD = "_save_checkpoint"
LOAD_OPTIMIZER_METHOD = "_load_optimizer_and_scheduler"
EVALUATE_METHOD = "_evaluate"


def find_trainer(callback: object) -> Any | None:
    """The Trainer whose callback list holds `callback`, found on the call stack of the event being fired.

    The frame that fires an event is a Trainer method (`__init__` for `on_init_end`, the training loop for
    later events), so its `self` is the Trainer, subclasses included.
    """
    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in getattr(candidate.callback_handler, "callbacks", ()):
            return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def shadow_save_checkpoint(trainer: Any, save: Callable[[Any, Any], None]) -> None:
    """Route the Trainer's `_save_checkpoint(model, trial)` calls to `save`; the stock writer never runs."""
    setattr(trainer, SAVE_METHOD, save)


def wrap_train(trainer: Any, resolve_resume: Callable[[Any], Any], on_failure: Callable[[], None]) -> None:
    """Make `trainer.train` pass its `resume_from_checkpoint` through `resolve_resume` first, and call
    `on_failure()` before an exception leaves it (then re-raise)."""
    train = trainer.train

    @functools.wraps(train)
    def train_with_checked_resume(resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any) -> Any:
        try:
            return train(resolve_resume(resume_from_checkpoint), *args, **kwargs)
        except BaseException:
            on_failure()
            raise

    trainer.train = train_with_checked_resume


def wrap_evaluate(trainer: Any, around: Callable[..., Any]) -> None:
    """Route the training loop's `_evaluate(trial, ignore_keys_for_eval, ...)` through `around(evaluate, *args)`,
    where `evaluate` runs the method of the Trainer's class, looked up at each call (a subclass's override or a
    patch of the class still runs). A later patch of the instance attribute replaces this wrapper."""

    def evaluate_and_report(*args: Any, **kwargs: Any) -> Any:
        method = getattr(type(trainer), EVALUATE_METHOD)
        evaluate = method.__get__(trainer, type(trainer)) if hasattr(method, "__get__") else method
        return around(evaluate, *args, **kwargs)

    setattr(trainer, EVALUATE_METHOD, evaluate_and_report)


def loads_optimizer_like_stock(trainer: Any) -> bool:
    """Whether `trainer` loads a resume's optimizer and scheduler with one plain `torch.load` each to the CPU,
    the only case whose states may be handed over read ahead. Not: a subclass with its own loader,
    DeepSpeed/FSDP (sharded), TPU, SageMaker model parallel, or several GPUs (loaded straight to each device)."""
    if getattr(type(trainer), LOAD_OPTIMIZER_METHOD, None) is not getattr(Trainer, LOAD_OPTIMIZER_METHOD):
        return False
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return False
    if is_torch_xla_available() or is_sagemaker_mp_enabled():
        return False
    return trainer.args.world_size <= 1 or trainer.args.device.type == "cpu"


def shadow_load_optimizer_and_scheduler(trainer: Any, read_ahead: Callable[[Any], dict[str, Any] | None]) -> None:
    """Make the Trainer's `_load_optimizer_and_scheduler(checkpoint)` restore `read_ahead(checkpoint)`'s
    "optimizer" and "scheduler" states when it has them, as the stock method restores what it loads;
    when it returns None, the stock method runs unchanged."""
    stock = getattr(trainer, LOAD_OPTIMIZER_METHOD)

    @functools.wraps(stock)
    def load_optimizer_and_scheduler(checkpoint: Any) -> None:
        states = read_ahead(checkpoint)
        if states is None:
            return stock(checkpoint)
        trainer.optimizer.load_state_dict(states["optimizer"])
        with warnings.catch_warnings(record=True) as caught_warnings:  # as the stock method, for the same warnings
            trainer.lr_scheduler.load_state_dict(states["scheduler"])
        reissue_pt_warnings(caught_warnings)
        return None

    setattr(trainer, LOAD_OPTIMIZER_METHOD, load_optimizer_and_scheduler)


def any_rank_agreement(trainer: Any) -> Callable[[tuple[bool, ...]], tuple[bool, ...]] | None:
    """The cross-rank vote the run controller needs with several processes (None for one): each flag true on every
    rank when it is true on any. On the training's own process group and device, from the training thread: the
    checkpoint group may be busy with an async save."""
    if trainer.args.world_size <= 1:
        return None

    def agree(flags: tuple[bool, ...]) -> tuple[bool, ...]:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            return flags
        votes = torch.tensor([int(flag) for flag in flags], device=trainer.args.device)
        dist.all_reduce(votes, op=dist.ReduceOp.MAX)
        return tuple(bool(vote) for vote in votes.tolist())

    return agree


# ---------------------------------------------------------------------------------------------- version differences

MIN_VERSIONS = {"transformers": "4.50.0", "accelerate": "1.3.0"}
"""The oldest releases the adapter runs with: transformers < 4.50 has no `TrainerState.best_global_step` and
(< 4.47) passes `metrics=` to `_save_checkpoint`, which then decides the best checkpoint itself; accelerate < 1.3
has no `unwrap_model(keep_torch_compile=)`."""


def installed_version(package: str) -> Version | None:
    try:
        return Version(version(package))
    except PackageNotFoundError:
        return None


def check_versions() -> None:
    """Raise at attach when transformers or accelerate is older than the adapter supports, naming both versions."""
    for package, minimum in MIN_VERSIONS.items():
        installed = installed_version(package)
        if installed is not None and installed < Version(minimum):
            raise RuntimeError(
                f"ckpt_callbacks.hf needs {package}>={minimum}; {package} {installed} is installed. "
                f"Upgrade it (pip install '{package}>={minimum}') or remove the callback to use the stock checkpointing."
            )


def set_config_dtype(config: Any, dtype: str) -> None:
    """Record the weights' dtype in a config as the installed `save_pretrained` does: transformers >= 4.56 writes
    `dtype` (its `torch_dtype` became a deprecated property aliasing it), older versions write `torch_dtype`."""
    if isinstance(getattr(type(config), "torch_dtype", None), property):
        config.dtype = dtype
    else:
        config.torch_dtype = dtype
    if hasattr(config, "_attn_implementation_autoset"):
        # transformers <= 4.51 writes this flag into config.json, and save_pretrained resets it (4.52+ never writes
        # it, 4.56+ has none): a checkpoint saying True would make from_pretrained keep another attention.
        config._attn_implementation_autoset = False


def keep_epoch_when_skipping_batches() -> None:
    """Make a stock mid-epoch resume draw the epoch's own shuffle with accelerate < 1.15 (idempotent).

    On resume the Trainer replaces the epoch's DataLoader with `accelerate.skip_first_batches(...)`, a new
    loader whose epoch counter starts at 0; accelerate 1.15 copies it from the original. Before that, the resumed
    epoch is reshuffled with another epoch's seed: with accelerate 1.7-1.14 under transformers 4.x (the new loader
    resets the shared sampler to epoch 0), and with accelerate < 1.7 under transformers 5.x (which sets the epoch on
    the new loader only, whose `set_epoch` does not reach that sampler yet). The stock resume then trains on other
    batches than the uninterrupted run. The Trainer looks `skip_first_batches` up in its module, so the fix wraps
    it there: the new loader gets the original's epoch, and its `set_epoch` also reaches the sampler, as in 1.15.
    """
    accelerate_version = installed_version("accelerate")
    if accelerate_version is None or accelerate_version >= Version("1.15.0"):
        return
    import transformers.trainer as trainer_module

    stock = getattr(trainer_module, "skip_first_batches", None)
    if stock is None or getattr(stock, "_ckpt_keeps_epoch", False):
        return

    @functools.wraps(stock)
    def skip_first_batches(dataloader: Any, num_batches: int = 0) -> Any:
        skipped = stock(dataloader, num_batches)
        if skipped is dataloader or not hasattr(skipped, "iteration") or not hasattr(dataloader, "iteration"):
            return skipped
        skipped.iteration = dataloader.iteration
        stock_set_epoch = getattr(skipped, "set_epoch", None)
        if stock_set_epoch is not None:
            def set_epoch(epoch: int) -> None:
                stock_set_epoch(epoch)
                batch_sampler = getattr(getattr(skipped, "batch_sampler", None), "batch_sampler", None)
                sampler_set_epoch = getattr(getattr(batch_sampler, "sampler", None), "set_epoch", None)
                if sampler_set_epoch is not None:
                    sampler_set_epoch(epoch)

            skipped.set_epoch = set_epoch  # __iter__ calls self.set_epoch(self.iteration): the instance's wins
        return skipped

    skip_first_batches._ckpt_keeps_epoch = True  # type: ignore[attr-defined]
    trainer_module.skip_first_batches = skip_first_batches
