"""`CheckpointCallback`: transformers.Trainer events translated into calls on the core's `RunController`.

The callback decides nothing and touches no file: it builds the stock
checkpoint pieces in memory (`capture.py`), reports Trainer events to the run
controller, and sets `TrainerControl` flags from its answers. The controller
(`core/run.py`) decides when to save (or lets the Trainer's own schedule
decide, when the flags agree with `TrainingArguments`), which checkpoint is
best, where a resume starts, and what happens at the end of training; the
manager below it stages, writes (through the `hf` engine, in the stock
layout), commits atomically and applies retention.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.distributed.collective import destroy_process_groups_at_exit
from ckpt_callbacks.core.format.engines.hf_engine import HFEngine, is_stock_trainer_checkpoint
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.core.read.catalog import LAST
from ckpt_callbacks.core.read.read_ahead import ReadAhead
from ckpt_callbacks.core.run import ExportSource, RunController
from ckpt_callbacks.core.save.saver import SaveStats
from ckpt_callbacks.errors import CheckpointNotFoundError
from ckpt_callbacks.hf import stock_saver, trainer_hooks
from ckpt_callbacks.hf.arguments import (
    check_flag_names,
    check_load_best_strategies,
    check_schedule_conflict,
    resolve_arguments,
    trainer_tracks_best,
    training_args_with,
)
from ckpt_callbacks.hf.capture import (
    DEFAULT_ADAPTER,
    adapter_state_dict,
    adapter_targets,
    checkpoint_pieces,
    is_peft_model,
    model_state_dict,
    pretrained_objects,
    processing_class_of,
    training_objects,
    unwrapped_model,
    weight_pieces,
)

logger = logging.getLogger("ckpt_callbacks.hf")

DEFAULT_ENGINE = "hf"


class CheckpointCallback(TrainerCallback):
    """Exact, atomic, asynchronous checkpoints for a `transformers.Trainer`, in the stock layout.

    Example:
        >>> trainer = Trainer(model=model, args=training_args, train_dataset=ds, callbacks=[CheckpointCallback()])
        >>> trainer.train(resume_from_checkpoint=True)   # stock resume, bit-exact

    With no arguments the save flags come from the Trainer's `TrainingArguments`; a `CheckpointArguments`
    or keyword flags (`CheckpointCallback(save_steps=50, async_save=False)`) override them. Pass
    `trainer=` when the callback is added after the Trainer was built and before `train()`; otherwise the
    Trainer is found when it fires `on_init_end` or `on_train_begin`.

    A `peft` model is saved as the stock Trainer saves it: its adapters (`adapter_model.safetensors`,
    `adapter_config.json`, `README.md`, a non-default adapter in `{name}/`), never the frozen base model; the
    best checkpoint loaded at the end and the export are adapters too.

    The Trainer's own best (`state.best_global_step`, `best_model_checkpoint`) is the run's best whenever the
    Trainer ranks by the run's metric: retention keeps it and the end of training loads it, whichever way the
    metric was computed. The metrics a checkpoint records are the Trainer's whole evaluation result
    (`_evaluate`: every eval dataset, and what a subclass's `evaluate()` adds).

    What stays with the stock Trainer, by design:
      - `TrainingArguments(load_best_model_at_end=True)`: the Trainer loads the best checkpoint itself
        (from our files); the callback loads it only when the flag is the callback's alone.
      - `TrainingArguments(save_total_limit=1)`: at the end of training the Trainer deletes every checkpoint
        but the best, as it always does (retention during training is the core's).
      - The Ray Tune writer `_tune_save_checkpoint` is not covered.

    FSDP (accelerate's FSDP1 and FSDP2, sharded or full state dict) and DeepSpeed (ZeRO-1/2/3): their sharded
    state is written by the stock saver itself, every rank its own files, into the core's hidden staging folder;
    the core then seals a manifest of every rank's files, publishes the checkpoint atomically and applies
    retention (`stock_saver.py`). The layout is the stock one, so the stock resume (and DeepSpeed's loader) reads
    it, after the callback verified it. These saves are synchronous (`async_save` does not apply). What cannot be
    served is refused at attach, naming it: a remote `output_dir`, another `engine`, `save_on_each_node` on several
    nodes, and `export_at_end` under ZeRO-3 without `stage3_gather_16bit_weights_on_model_save`. The class
    attribute `stock_saver` chooses the writer (True sends any Trainer down this path; set it on the class when
    the callback attaches in its constructor, `trainer=`).

    With `async_save`, a save returns before even the host copy of the weights and optimizer state: the
    copy overlaps the next forward and backward pass, and the callback waits for it in
    `on_pre_optimizer_step`, before anything it saved can change. Set `CheckpointCallback.defer_staging =
    False` (class or instance) to copy before the save returns instead.

    DDP (`torchrun`, `accelerate launch`): every rank writes its `rng_state_{rank}.pth`, rank 0 the other files;
    the commit is collective, retention and export run once. All ranks must see `output_dir` (a shared
    filesystem across nodes), `save_on_each_node` included.
    """

    # With async_save: the host copy overlaps the next forward/backward (see the class docstring).
    defer_staging = True
    # Who writes the files: None (default) the stock saver under FSDP or DeepSpeed (their sharded state), the core's
    # `hf` engine otherwise; True the stock saver for any Trainer (one process and DDP too: how that path is tested
    # on CPU); False the engine, refused at attach under FSDP or DeepSpeed. Set it on the class or the instance
    # before the callback attaches.
    stock_saver: bool | None = None

    def __init__(self, args: CheckpointArguments | None = None, *, trainer: Trainer | None = None,
                 **flags: Any) -> None:
        if args is not None and flags:
            raise TypeError("Pass either a CheckpointArguments or keyword flags to CheckpointCallback, not both.")
        check_flag_names(flags)
        self._overrides = args.non_default_fields() if args is not None else dict(flags)
        self.args: CheckpointArguments | None = None
        self.trainer: Trainer | None = None
        self.run: RunController | None = None
        self.last_save_stats: dict[str, float] = {}  # what the saves made durable since the last log cost
        self.save_reports: list[dict[str, float]] = []  # one per durable save: step, seconds waited, seconds, MB/s
        self._staging_prepared = False
        self._read_ahead = ReadAhead()
        self._reads_ahead = False  # whether the Trainer's optimizer loader takes states read ahead (attach)
        self._in_evaluate = False  # inside the Trainer's `_evaluate`: its merged metrics are reported at its end
        self._stepped = False  # an optimizer step ended in this train() call (evaluations before rank nothing)
        self._writes_with_stock_saver = False  # decided at attach (`stock_saver`)
        if trainer is not None:
            self.attach(trainer)

    @property
    def manager(self) -> CheckpointManager | None:
        """The core manager of the current run folder: `list()`, `latest()`, `best()`, `load(...)`."""
        return self.run.manager if self.run is not None else None

    @property
    def preempted(self) -> bool:
        """Whether SIGTERM/SIGUSR1 stopped the last `train()` (after saving at the next step boundary)."""
        return self.run is not None and self.run.preempted

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number after a preemption stop: end the script with `sys.exit(callback.exit_code)`
        so a scheduler sees an unfinished run (`train()` itself returns normally)."""
        return self.run.exit_code if self.run is not None else 0

    # ------------------------------------------------------------------ attaching

    def attach(self, trainer: Trainer) -> None:
        """Take over checkpointing of `trainer` (idempotent). Raises on flags the Trainer would overrule."""
        if self.trainer is trainer:
            return
        if self.trainer is not None:
            raise ValueError("This CheckpointCallback already serves another Trainer: create one callback per Trainer.")
        trainer_hooks.check_versions()
        args = resolve_arguments(trainer.args, self._overrides)
        check_schedule_conflict(args, trainer.args)
        check_load_best_strategies(args, trainer.args)
        self._writes_with_stock_saver = _check_writer(trainer, args, self.stock_saver)
        self.args = args
        self.trainer = trainer
        trainer_hooks.shadow_save_checkpoint(trainer, self._save_checkpoint)
        trainer_hooks.wrap_train(trainer, self._resume_checkpoint, self._on_train_failure)
        trainer_hooks.wrap_evaluate(trainer, self._evaluate_in_training)
        trainer_hooks.keep_epoch_when_skipping_batches()
        self._reads_ahead = trainer_hooks.loads_optimizer_like_stock(trainer)
        if self._reads_ahead:
            trainer_hooks.shadow_load_optimizer_and_scheduler(trainer, self._read_ahead.take)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach_from_stack()

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

    def _trainer(self) -> Trainer:
        assert self.trainer is not None, "attached in on_init_end / on_train_begin"
        return self.trainer

    def _run_for(self, trial: Any) -> RunController:
        """The run controller of the folder the Trainer saves `trial` to (a hyperparameter-search trial has its own)."""
        assert self.args is not None
        trainer = self._trainer()
        run_dir = self.args.output_dir or trainer._get_output_dir(trial=trial)
        if self.run is not None and self.run.manager.store.root == run_dir:
            return self.run
        if self.run is not None:
            self.run.manager.close()
        manager = CheckpointManager(self.args.replace(output_dir=run_dir), default_engine=DEFAULT_ENGINE,
                                    recognize_foreign=is_stock_trainer_checkpoint)
        self.run = RunController(manager, framework_args=resolve_arguments(trainer.args, {}),
                                 agree=trainer_hooks.any_rank_agreement(trainer))
        if manager.collective.world_size > 1:
            destroy_process_groups_at_exit()  # the Trainer never does; a gloo process exiting with one may abort
        return self.run

    # ------------------------------------------------------------------ run lifecycle

    def _resume_checkpoint(self, requested: Any) -> Any:
        """Runs before `Trainer.train`: the checkpoint a resume starts from, as the stock Trainer would pick it,
        checked against its manifest (and, with `fallback_to_verified`, the newest that passes).

        Its optimizer and scheduler states are read on a background thread meanwhile (new tensors only), and
        handed to the stock loader when it asks: the read overlaps the checksums and the Trainer's setup.
        For a 124M GPT-2 the optimizer file alone took the stock loader 0.45 s (see `docs/performance.md`)."""
        if requested is None or requested is False:
            return requested
        run = self._run_for(trial=None)
        if requested is True and "://" in run.manager.store.root:
            return requested  # the stock Trainer resumes from local folders only; let it say so
        read_ahead = self._start_read_ahead if self._reads_ahead else None
        try:
            return run.agreed_resume_path(LAST if requested is True else str(requested), accept_foreign=True,
                                          read_ahead=read_ahead)
        except CheckpointNotFoundError:
            return requested  # nothing to resume from: the stock Trainer raises its own error, as it always does

    def _start_read_ahead(self, checkpoint: str) -> None:
        self._read_ahead.start(HFEngine, checkpoint, ("optimizer", "scheduler"))

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._attach_from_stack()
        run = self._run_for(trial=None)
        run.begin(max_steps=state.max_steps, step=state.global_step, resumed=state.global_step > 0,
                  framework_tracks_best=self._trainer_tracks_best())
        self._staging_prepared = False
        self._stepped = False

    def _finish_run(self) -> None:
        """Flush pending writes and release the output folder; raises a background write error."""
        self._read_ahead.discard()  # a resume that failed before loading them
        if self.run is not None:
            self.run.preemption.uninstall()
            self.run.manager.close()

    def _on_train_failure(self) -> None:
        # Training raised: make the checkpoints already submitted durable, then let the original error surface.
        try:
            self._finish_run()
        except Exception:
            logger.exception("A checkpoint write failed while training was failing; the newest checkpoint may be missing.")

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        assert self.args is not None and self.run is not None
        self._stepped = False
        model = unwrapped_model(self._trainer())
        peft = is_peft_model(model)
        # The stock Trainer loads the best checkpoint itself when its own flag is set.
        callback_loads_best = self.args.load_best_model_at_end and not args.load_best_model_at_end
        load_best = None
        if self._writes_with_stock_saver:
            state_dict = self._end_with_stock_loader(model, peft, load_best=callback_loads_best)
        else:
            if callback_loads_best:
                load_best = dict(adapter_targets(model)) if peft else {"model": model}
            state_dict = (lambda: adapter_state_dict(model, DEFAULT_ADAPTER)) if peft else (lambda: model_state_dict(model))
        # A PEFT model is exported as `trainer.save_model(dir)` saves it: its adapters, loadable by
        # PeftModel.from_pretrained and AutoPeftModel*; any other model as its full weights.
        export = ExportSource(
            state_dict=state_dict,
            pretrained_objects=pretrained_objects(model, processing_class_of(self._trainer()), export=True),
            weights_name="adapter_model" if peft else "model",
        )
        # once per run (should_save is true on every node with save_on_each_node)
        try:
            self.run.end(load_best_into=load_best, export=export, is_exporting_rank=args.process_index == 0)
        finally:
            self._finish_run()

    def _end_with_stock_loader(self, model: Any, peft: bool, *, load_best: bool) -> Any:
        """The end of a run the stock saver wrote, on every rank (FSDP and ZeRO-3 gather collectively): the callback's
        own `load_best_model_at_end` through the stock loader, from the verified best folder; the whole weights of
        the export gathered as the stock `save_model` gathers them. Returns the export's weights (for process 0)."""
        assert self.run is not None and self.args is not None
        run, trainer = self.run, self._trainer()
        run.manager.wait()
        if run.stopped_by_signal:
            return _no_weights  # run.end skips the export
        if load_best:
            best = run.best_checkpoint()
            if best is None:
                logger.warning("load_best_model_at_end: no checkpoint has a value of %r; keeping the final weights. "
                               "Evaluate at the save steps.", run.manager.metric_rule.key)
            else:
                stock_saver.load_best_with_stock_loader(trainer, run.agreed_resume_path(best.step, fallback=False))
        if not (self.args.export_at_end and run.export_dir is not None):
            return _no_weights
        full = stock_saver.full_model_state(trainer)
        if peft:
            return lambda: adapter_state_dict(model, DEFAULT_ADAPTER, state_dict=full)
        return lambda: stock_saver.weights_as_saved(model, full)

    # ------------------------------------------------------------------ when to save

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.run is None:
            return
        self._stepped = True
        if not self._staging_prepared:
            self._staging_prepared = True
            self._prepare_staging()
        decision = self.run.step_ended(state.global_step)
        # Runs after DefaultFlowCallback: under the callback's own schedule this replaces the stock decision.
        control.should_save = (control.should_save or decision.save) if self.run.framework_decides else decision.save
        if decision.stop:
            control.should_save = True
            control.should_training_stop = True

    def on_pre_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                              **kwargs: Any) -> None:
        if self.run is not None:
            self.run.manager.wait_for_staging()  # the weights and optimizer state may change from here on

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self.run is not None and not self.run.framework_decides:
            control.should_save = self.run.epoch_ended()

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        metrics: Mapping[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        if self.run is None or metrics is None or self._in_evaluate or not self._stepped:
            # An evaluation outside train() or before its first step (`eval_on_start`: stock ranks nothing
            # there), or one dataset of an evaluation reported whole at its end.
            return
        # Not inside the Trainer's `_evaluate` (patched on the instance, or a callback calling evaluate()): each
        # eval set is reported as it ends, and a missing metric is raised at the next event.
        if self.run.evaluated(state.global_step, metrics) and not self.run.framework_decides:
            control.should_save = True

    def _evaluate_in_training(self, evaluate: Any, *args: Any, **kwargs: Any) -> Any:
        """Runs the Trainer's `_evaluate` (the evaluation of training's `eval_strategy`, every eval dataset and
        whatever a subclass's `evaluate()` adds), then reports its whole result, before the Trainer ranks it and
        decides on the save: a metric that ranks checkpoints and is missing raises here, as stock does."""
        self._in_evaluate = True
        try:
            metrics = evaluate(*args, **kwargs)
        finally:
            self._in_evaluate = False
        if self.run is not None and self._stepped and isinstance(metrics, Mapping):
            trainer = self._trainer()
            if self.run.evaluated(trainer.state.global_step, metrics) and not self.run.framework_decides:
                trainer.control.should_save = True
            self.run.check_metric_logged()
        return metrics

    # ------------------------------------------------------------------ saving

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """Replaces `Trainer._save_checkpoint` on the instance: same call, same effects, written by the core."""
        trainer = self._trainer()
        state = trainer.state
        run = self._run_for(trial)
        if self._trainer_tracks_best():
            run.framework_best(state.best_global_step, state.best_metric)
        step = state.global_step
        assert self.args is not None
        if self._writes_with_stock_saver:
            write = partial(stock_saver.write_checkpoint, trainer, model, trial, collective=run.manager.collective,
                            training_args=training_args_with(trainer.args, self.args),
                            best_checkpoint=run.best_checkpoint_path(step))
            run.save_written(step, write, states=stock_saver.pieces_written, epoch=state.epoch)
            return
        pieces = checkpoint_pieces(trainer, trial, best_checkpoint=run.best_checkpoint_path(step),
                                   save_only_model=self.args.save_only_model,
                                   training_args=training_args_with(trainer.args, self.args))
        # Deferred only while training goes on: on_pre_optimizer_step then waits for the copy. The model's
        # buffers are copied at once, since the next forward pass may update them (BatchNorm statistics).
        defer = self.defer_staging and not trainer.control.should_training_stop
        run.save(step, pieces, epoch=state.epoch, defer_staging=defer,
                 copy_now=unwrapped_model(trainer).buffers() if defer else ())
        if trainer.control.should_training_stop:
            run.manager.wait()  # the stock end of training reads and prunes checkpoint folders right after this

    def _prepare_staging(self) -> None:
        """After the first optimizer step (the optimizer state exists now), let the manager allocate the host
        buffers of the first async save in the background, so that save does not fault in fresh memory."""
        if self.run is None or not self.run.policy.saves_during_training or self._writes_with_stock_saver:
            return
        trainer = self._trainer()
        state = weight_pieces(unwrapped_model(trainer))
        if not self.run.args.save_only_model:
            state.update(training_objects(trainer))
        self.run.manager.prepare_staging(state)

    def _trainer_tracks_best(self) -> bool:
        """Whether the Trainer's own best (`state.best_global_step`) is the run's: it ranks by the run's metric."""
        return trainer_tracks_best(self._trainer().args, self.args)

    # ------------------------------------------------------------------ reporting

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
        logs: dict[str, Any] | None = None, **kwargs: Any,
    ) -> None:
        """Save costs go to the log line the user sees (the progress bar and printer run after this callback), to
        `callback.last_save_stats` and `callback.save_reports`, never into `trainer.state` / `trainer_state.json`:
        a resumed run's state must equal the uninterrupted run's."""
        if self.run is None:
            return
        if control.should_training_stop or state.global_step >= state.max_steps:
            # Last log before the stock end of training loads the best checkpoint and prunes folders.
            self.run.manager.wait()
        finished = self.run.finished_save_stats()
        if finished:
            self.save_reports += [{"step": stats.step, **save_stats_for_log([stats])} for stats in finished]
            self.last_save_stats = save_stats_for_log(finished)
            if logs is not None:
                logs.update(self.last_save_stats)  # the progress bar / printer line; log_history holds a copy


def save_stats_for_log(saves: list[SaveStats]) -> dict[str, float]:
    """What durable saves cost: seconds training waited, seconds until durable, MB/s."""
    blocking = sum(stats.blocking_seconds for stats in saves)
    total = sum(stats.total_seconds or 0.0 for stats in saves)
    written = sum(stats.bytes_written for stats in saves)
    logs = {"ckpt_save_blocking_s": round(blocking, 4), "ckpt_save_total_s": round(total, 4)}
    if total > 0:
        logs["ckpt_save_MBps"] = round(written / 1e6 / total, 2)
    return logs


def _no_weights() -> dict[str, Any]:
    return {}


def _check_writer(trainer: Trainer, args: CheckpointArguments, stock_saver_flag: bool | None) -> bool:
    """Whether the stock saver writes this run's files (`CheckpointCallback.stock_saver`); refuses what it cannot
    serve, naming the strategy."""
    strategy = stock_saver.sharding_of(trainer)
    if strategy is not None and stock_saver_flag is False:
        raise ValueError(f"CheckpointCallback.stock_saver=False cannot save {strategy}: only the stock saver writes its "
                         "sharded state. Leave stock_saver unset (None).")
    uses_stock_saver = stock_saver_flag if stock_saver_flag is not None else strategy is not None
    if uses_stock_saver:
        stock_saver.check_supported(trainer, args, strategy, str(args.output_dir or trainer.args.output_dir))
        if strategy is not None and args.async_save:
            logger.info("%s: checkpoints are written synchronously by the stock saver (async_save does not apply).",
                        strategy)
    return uses_stock_saver


__all__ = ["CheckpointCallback", "save_stats_for_log"]
