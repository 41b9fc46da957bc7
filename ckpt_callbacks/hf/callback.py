"""`CheckpointCallback`: transformers.Trainer events mapped onto the core.

The callback decides nothing about bytes: it builds the stock checkpoint pieces
in memory (`capture.py`) and hands them to `CheckpointManager`, which stages,
writes (through the `hf` engine, in the stock layout), commits atomically and
applies retention. When to save comes from the Trainer's own flow when the
flags agree with `TrainingArguments`, and from the core's `SavePolicy` when the
user overrode them.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.best import BestTracker
from ckpt_callbacks.core.distributed.collective import destroy_process_groups_at_exit
from ckpt_callbacks.core.export import export_safetensors
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines.hf_engine import HFEngine
from ckpt_callbacks.core.manager import CheckpointManager, SaveStats
from ckpt_callbacks.core.preemption import PreemptionFlag
from ckpt_callbacks.core.read.read_ahead import ReadAhead
from ckpt_callbacks.core.save.policy import SavePolicy
from ckpt_callbacks.hf import trainer_hooks
from ckpt_callbacks.hf.arguments import check_flag_names, enum_value, policy_decides, resolve_arguments
from ckpt_callbacks.hf.capture import (
    checkpoint_pieces,
    model_state_dict,
    pretrained_objects,
    processing_class_of,
    training_objects,
    unwrapped_model,
)
from ckpt_callbacks.hf.resume import verified_resume_checkpoint

logger = logging.getLogger("ckpt_callbacks.hf")

DEFAULT_ENGINE = "hf"
_TRACKED_BY_TRAINER = ("steps", "epoch", "best")  # strategies under which the Trainer sets best_global_step


class CheckpointCallback(TrainerCallback):
    defer_staging = True  # with async_save: the host copy overlaps the next forward/backward (docstring)

    """Exact, atomic, asynchronous checkpoints for a `transformers.Trainer`, in the stock layout.

    Example:
        >>> trainer = Trainer(model=model, args=training_args, train_dataset=ds, callbacks=[CheckpointCallback()])
        >>> trainer.train(resume_from_checkpoint=True)   # stock resume, bit-exact

    With no arguments the save flags come from the Trainer's `TrainingArguments`; a `CheckpointArguments`
    or keyword flags (`CheckpointCallback(save_steps=50, async_save=False)`) override them. Pass
    `trainer=` when the callback is added after the Trainer was built and before `train()`; otherwise the
    Trainer is found when it fires `on_init_end` or `on_train_begin`.

    What stays with the stock Trainer, by design:
      - `TrainingArguments(load_best_model_at_end=True)`: the Trainer loads the best checkpoint itself
        (from our files); the callback loads it only when the flag is the callback's alone.
      - `TrainingArguments(save_total_limit=1)`: at the end of training the Trainer deletes every checkpoint
        but the best, as it always does (retention during training is the core's).
      - DeepSpeed and FSDP are refused (sharded optimizer state); PEFT models are saved as full weights;
        the Ray Tune writer `_tune_save_checkpoint` is not covered.

    With `async_save`, a save returns before even the host copy of the weights and optimizer state: the
    copy overlaps the next forward and backward pass, and the callback waits for it in
    `on_pre_optimizer_step`, before anything it saved can change. Set `CheckpointCallback.defer_staging =
    False` (class or instance) to copy before the save returns instead.

    DDP (`torchrun`, `accelerate launch`): every rank writes its `rng_state_{rank}.pth`, rank 0 the other files;
    the commit is collective, retention and export run once. All ranks must see `output_dir` (a shared
    filesystem across nodes), `save_on_each_node` included.
    """

    def __init__(self, args: CheckpointArguments | None = None, *, trainer: Any = None, **flags: Any) -> None:
        if args is not None and flags:
            raise TypeError("Pass either a CheckpointArguments or keyword flags to CheckpointCallback, not both.")
        check_flag_names(flags)
        self._overrides = args.non_default_fields() if args is not None else dict(flags)
        self.args: CheckpointArguments | None = None
        self.trainer: Any = None
        self.manager: CheckpointManager | None = None
        self.policy: SavePolicy | None = None
        self.preemption = PreemptionFlag()
        self.export_dir: str | None = None
        self._policy_decides = False
        self._last_eval: tuple[int, dict[str, Any]] | None = None
        self._evaluations: BestTracker | None = None  # every evaluation of this run, saved or not
        self._saved_steps: set[int] = set()
        self._unreported_saves: list[SaveStats] = []  # filled in by the writer when each save is durable
        self._warned_missing_metric = False
        self._staging_prepared = False
        self._read_ahead = ReadAhead()
        self._reads_ahead = False  # whether the Trainer's optimizer loader takes states read ahead (attach)
        if trainer is not None:
            self.attach(trainer)

    @property
    def preempted(self) -> bool:
        """Whether SIGTERM/SIGUSR1 stopped the last `train()` (after saving at the next step boundary)."""
        return self.preemption.requested

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number after a preemption stop: end the script with `sys.exit(callback.exit_code)`
        so a scheduler sees an unfinished run (`train()` itself returns normally)."""
        return self.preemption.exit_code

    # ------------------------------------------------------------------ attaching

    def attach(self, trainer: Any) -> None:
        """Take over checkpointing of `trainer` (idempotent). Raises on flags the Trainer would overrule."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("This CheckpointCallback already serves another Trainer: create one callback per Trainer.")
        _check_supported(trainer)
        self.args = resolve_arguments(trainer.args, self._overrides)
        self._policy_decides = policy_decides(self.args, trainer.args)
        self.trainer = trainer
        trainer_hooks.shadow_save_checkpoint(trainer, self._save_checkpoint)
        trainer_hooks.wrap_train(trainer, self._verified_resume, self._on_train_failure)
        self._reads_ahead = trainer_hooks.loads_optimizer_like_stock(trainer)
        if self._reads_ahead:
            trainer_hooks.shadow_load_optimizer_and_scheduler(trainer, self._read_ahead.take)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach_from_stack()

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach_from_stack()
        self._start_run(state)

    def _attach_from_stack(self) -> None:
        if self.trainer is not None:
            return
        trainer = trainer_hooks.find_trainer(self)
        if trainer is None:
            raise RuntimeError(
                "CheckpointCallback could not find its Trainer. Pass it explicitly: CheckpointCallback(trainer=trainer) "
                "or callback.attach(trainer) before trainer.train()."
            )
        self.attach(trainer)

    # ------------------------------------------------------------------ run lifecycle

    def _verified_resume(self, requested: Any) -> Any:
        """Runs before `Trainer.train`: the checkpoint a resume starts from, checked against its manifest.

        Its optimizer and scheduler states are read on a background thread meanwhile (new tensors only), and
        handed to the stock loader when it asks: the read overlaps the checksums and the Trainer's setup.
        For a 124M GPT-2 the optimizer file alone took the stock loader 0.45 s (see `docs/performance.md`)."""
        read_ahead = self._start_read_ahead if self._reads_ahead else None
        return verified_resume_checkpoint(requested, self._manager_for(self._run_dir(trial=None)), read_ahead)

    def _start_read_ahead(self, checkpoint: str) -> None:
        self._read_ahead.start(HFEngine, checkpoint, ("optimizer", "scheduler"))

    def _start_run(self, state: TrainerState) -> None:
        assert self.args is not None
        manager = self._manager_for(self._run_dir(trial=None))
        self._evaluations = BestTracker(manager.metric_rule)
        self.policy = SavePolicy(self.args, self._evaluations)
        self.policy.set_max_steps(state.max_steps)
        self._saved_steps = {info.step for info in manager.list()}
        if state.global_step > 0:
            # Resumed: never rotate away the checkpoint this run started from, and remember its best.
            manager.resumed_from_step = state.global_step
            best = manager.best()
            if best is not None and (value := manager.metric_rule.value_in(best.metrics)) is not None:
                self._evaluations.reset_from([(best.step, value)])
        self.preemption = PreemptionFlag()
        if self.args.save_on_signal:
            self.preemption.install()
        self._staging_prepared = False

    def _finish_run(self) -> None:
        """Flush pending writes and release the output folder; raises a background write error."""
        self.preemption.uninstall()
        self._read_ahead.discard()  # a resume that failed before loading them
        self.policy = None
        manager, self.manager = self.manager, None
        if manager is not None:
            manager.close()

    def _on_train_failure(self) -> None:
        # Training raised: make the checkpoints already submitted durable, then let the original error surface.
        try:
            self._finish_run()
        except Exception:
            logger.exception("A checkpoint write failed while training was failing; the newest checkpoint may be missing.")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        assert self.args is not None and self.manager is not None
        self.manager.wait()
        if self.preemption.requested:
            logger.warning(
                "Stopped on signal %s after saving checkpoint-%d; skipped best-model loading and export. "
                "Resume with trainer.train(resume_from_checkpoint=True).", self.preemption.received, state.global_step,
            )
        else:
            if self.args.load_best_model_at_end and not args.load_best_model_at_end:
                self._load_best_model()  # the stock Trainer does it itself when its own flag is set
            if self.args.export_at_end and args.process_index == 0:
                self._export()  # once per run (should_save is true on every node with save_on_each_node)
        self._finish_run()

    # ------------------------------------------------------------------ when to save

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.policy is None:
            return
        if not self._staging_prepared:
            self._staging_prepared = True
            self._prepare_staging()
        if self._policy_decides:
            # Runs after DefaultFlowCallback, so this replaces the stock decision for this step.
            control.should_save = self.policy.on_step_end(state.global_step)
        elif self.policy.time_interval_elapsed():
            control.should_save = True
        preempted = self.preemption.requested
        ours = self.policy.args
        if args.world_size > 1 and (ours.save_on_signal or ours.save_time_interval is not None):
            # Clocks and signals differ between processes, and a save is collective: every rank must agree.
            control.should_save, preempted = _on_any_rank(args, control.should_save, preempted)
            if preempted and not self.preemption.requested:
                self.preemption.received = signal.SIGTERM  # stopped because another rank was signalled
        if preempted:
            control.should_save = True
            control.should_training_stop = True

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        if self.manager is not None:
            self.manager.wait_for_staging()  # the weights and optimizer state may change from here on

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.policy is not None and self._policy_decides:
            control.should_save = self.policy.on_epoch_end()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        metrics: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        if self.policy is None or self.manager is None or metrics is None:
            return  # an evaluation outside train()
        self._last_eval = (state.global_step, dict(metrics))
        self._warn_if_metric_missing(metrics)
        is_due = self.policy.on_evaluate(metrics, state.global_step)
        if self._policy_decides and is_due:
            control.should_save = True

    def _warn_if_metric_missing(self, metrics: Mapping[str, Any]) -> None:
        assert self.args is not None and self.manager is not None
        if self.args.metric_for_best_model is None or self._warned_missing_metric:
            return
        if self.manager.metric_rule.value_in(metrics) is None:
            self._warned_missing_metric = True
            logger.warning(
                "metric_for_best_model=%r is not among the evaluation metrics (%s): best tracking and "
                "save_strategy='best' ignore this evaluation. Set metric_for_best_model to one of them.",
                self.args.metric_for_best_model, ", ".join(sorted(metrics)),
            )

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Replaces `Trainer._save_checkpoint` on the instance: same call, same effects, written by the core."""
        trainer, state = self.trainer, self.trainer.state
        run_dir = self._run_dir(trial)
        manager = self._manager_for(run_dir)
        step = state.global_step
        pieces = checkpoint_pieces(trainer, trial, best_checkpoint=self._best_checkpoint_dir(run_dir, step))
        # Deferred only while training goes on: on_pre_optimizer_step then waits for the copy. The model's
        # buffers are copied at once, since the next forward pass may update them (BatchNorm statistics).
        defer = self.defer_staging and not trainer.control.should_training_stop
        manager.save(step, pieces, metrics=self._metrics_at(step), epoch=state.epoch, defer_staging=defer,
                     copy_now=unwrapped_model(trainer).buffers() if defer else ())
        if manager.last_save is not None:
            self._unreported_saves.append(manager.last_save)
        self._saved_steps.add(step)
        if self.policy is not None:
            self.policy.record_save(step)
        if trainer.control.should_training_stop:
            # The stock end of training reads and prunes checkpoint folders right after this.
            manager.wait()

    def _prepare_staging(self) -> None:
        """After the first optimizer step (the optimizer state exists now), let the manager allocate the host
        buffers of the first async save in the background, so that save does not fault in fresh memory."""
        if self.manager is None or self.policy is None or not self.policy.saves_during_training:
            return
        trainer = self.trainer
        state = {"model": model_state_dict(unwrapped_model(trainer))}
        if not trainer.args.save_only_model:
            state.update(training_objects(trainer))
        self.manager.prepare_staging(state)

    def _best_checkpoint_dir(self, run_dir: str, step: int) -> str | None:
        """`state.best_model_checkpoint` as the stock saver sets it: the best step's folder, once it exists."""
        best_step = self._best_step()
        if best_step and (best_step == step or best_step in self._saved_steps):
            return os.path.join(run_dir, layout.checkpoint_name(best_step))
        return None

    def _best_step(self) -> int | None:
        """The Trainer's best step when it tracks one (its flags), else the best of our evaluations."""
        trainer_args = self.trainer.args
        trainer_tracks = trainer_args.metric_for_best_model is not None and enum_value(trainer_args.save_strategy) in _TRACKED_BY_TRAINER
        if trainer_tracks or self._evaluations is None:
            return self.trainer.state.best_global_step
        return self._evaluations.best_step

    def _metrics_at(self, step: int) -> dict[str, Any] | None:
        """The evaluation of exactly these weights, if one ran at this step: it ranks the checkpoint."""
        if self._last_eval is not None and self._last_eval[0] == step:
            return self._last_eval[1]
        return None

    def _run_dir(self, trial: Any) -> str:
        assert self.args is not None
        return self.args.output_dir or self.trainer._get_output_dir(trial=trial)

    def _manager_for(self, run_dir: str) -> CheckpointManager:
        """The manager of `run_dir` (a hyperparameter-search trial gets its own folder, hence its own manager)."""
        assert self.args is not None
        if self.manager is not None and self.manager.args.output_dir == run_dir:
            return self.manager
        if self.manager is not None:
            self.manager.close()
        # save_only_model is applied here by leaving out the training state; the manager must still write
        # trainer_state.json and the config files, which its own save_only_model would drop.
        manager_args = self.args.replace(output_dir=run_dir, save_only_model=False)
        self.manager = CheckpointManager(manager_args, engine=self.args.engine or DEFAULT_ENGINE)
        if self.manager.collective.world_size > 1:
            destroy_process_groups_at_exit()  # the Trainer never does; a gloo process exiting with one may abort
        return self.manager

    # ------------------------------------------------------------------ reporting

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        if self.manager is None:
            return
        if control.should_training_stop or state.global_step >= state.max_steps:
            # Last log before the stock end of training loads the best checkpoint and prunes folders.
            self.manager.wait()
        stats = self._finished_save_stats()
        if stats and logs is not None:
            logs.update(stats)
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(stats)  # Trainer.log appended its copy just before on_log

    def _finished_save_stats(self) -> dict[str, float]:
        """The cost of the saves that became durable since the last log, each reported once."""
        finished = [stats for stats in self._unreported_saves if stats.total_seconds is not None]
        self._unreported_saves = [stats for stats in self._unreported_saves if stats.total_seconds is None]
        return save_stats_for_log(finished) if finished else {}

    # ------------------------------------------------------------------ end of training

    def _load_best_model(self) -> None:
        assert self.manager is not None
        best = self.manager.best()
        if best is None:
            logger.warning(
                "load_best_model_at_end: no checkpoint was saved with an evaluation of %r; keeping the final weights. "
                "Evaluate at the save steps (eval_strategy/eval_steps matching the saves).",
                self.manager.metric_rule.key,
            )
            return
        self.manager.load(best, {"model": unwrapped_model(self.trainer)}, restore_rng=False)
        logger.info("Loaded the best weights from %s (%s).", best.path, best.metrics)

    def _export(self) -> None:
        assert self.args is not None and self.manager is not None
        export_dir = self.args.export_dir or os.path.join(self.manager.store.root, "export")
        if "://" in export_dir:
            logger.warning("export_at_end: %s is not a local folder; set export_dir to a local path.", export_dir)
            return
        model = unwrapped_model(self.trainer)
        export_safetensors(
            model_state_dict(model), export_dir, max_shard_size=self.args.max_shard_size,
            pretrained_objects=pretrained_objects(model, processing_class_of(self.trainer)),
        )
        self.export_dir = export_dir
        logger.info("Exported the final model to %s.", export_dir)


def save_stats_for_log(saves: list[SaveStats]) -> dict[str, float]:
    """What durable saves cost, as Trainer log keys: seconds training waited, seconds until durable, MB/s."""
    blocking = sum(stats.blocking_seconds for stats in saves)
    total = sum(stats.total_seconds or 0.0 for stats in saves)
    written = sum(stats.bytes_written for stats in saves)
    logs = {"ckpt_save_blocking_s": round(blocking, 4), "ckpt_save_total_s": round(total, 4)}
    if total > 0:
        logs["ckpt_save_MBps"] = round(written / 1e6 / total, 2)
    return logs


def _on_any_rank(args: TrainingArguments, *flags: bool) -> tuple[bool, ...]:
    """Each flag, true on every rank when it is true on any. On the training's own process group and thread:
    the checkpoint group may be busy with an async save."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return flags
    votes = torch.tensor([int(flag) for flag in flags], device=args.device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return tuple(bool(vote) for vote in votes.tolist())


def _check_supported(trainer: Any) -> None:
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise ValueError(
            "CheckpointCallback does not support DeepSpeed or FSDP yet (their optimizer state is sharded). "
            "Remove the callback to use the Trainer's own checkpointing for this run."
        )

