"""Lightning events mapped onto the core, for either Lightning namespace.

`CheckpointCallbackLogic` holds the behaviour; `ckpt_callbacks.lightning` and
`ckpt_callbacks.pytorch_lightning` combine it with their namespace's
`ModelCheckpoint`, so Lightning treats it as its own checkpoint callback:
`trainer.checkpoint_callback` is this callback, `fit(ckpt_path="last")` finds
its newest checkpoint (`_find_last_checkpoints`), `ckpt_path="best"` its
`best_model_path`, `ckpt_path=None` resumes nothing (as with `ModelCheckpoint`),
and loggers hear of each checkpoint (`after_save_checkpoint`) once it is durable.
None of `ModelCheckpoint`'s own saving runs: every hook is this class's.

What happens where:

- The run's `RunController` (core) decides when to save, which checkpoint is
  best, where a resume starts and what happens at the end; this module reports
  Lightning's events to it and calls
  `trainer.save_checkpoint(.../checkpoint-{step}/checkpoint.ckpt)`, which the
  plugin commits through the same controller. Lightning's conventions are
  stated once (`LIGHTNING_CONVENTIONS`): saves fall on the schedule only (no
  extra final-step save), and without a metric the newest checkpoint is the best.
- A save due on an epoch's last step is taken in `on_train_epoch_end`, after the
  validation and the epoch-end hooks (where `ModelCheckpoint` saves too): a
  resume from it does not replay that epoch end with empty metrics.
- RNG state (every rank) and the data position go into this callback's
  `state_dict`, i.e. into Lightning's checkpoint dict; `SamplerResume` (core)
  replays the interrupted epoch on resume.
- A save due on a step that a validation follows waits for that validation
  (and on an epoch's last step for the epoch's end): Lightning does not re-run
  it on resume, so the checkpoint holds the RNG state after it, and the resumed
  run draws exactly what the uninterrupted one drew. Validation itself runs as
  with `ModelCheckpoint` (its random draws, such as a loader's base seed, stay
  in the training stream).
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.distributed.collective import Collective, SingleProcess
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.core.read.catalog import LAST, CheckpointInfo
from ckpt_callbacks.core.run import (
    Conventions,
    ExportSource,
    RunController,
    fresh_run_folder,
    run_folder_versions,
)
from ckpt_callbacks.core.state.rng import capture_rng_state
from ckpt_callbacks.core.state.sampler_replay import SamplerResume
from ckpt_callbacks.lightning.plugin import (
    CHECKPOINT_FILE,
    ENGINE,
    CheckpointIOLogic,
    committed_checkpoint_path,
    is_url,
    join_path,
    make_run_manager,
    parse_committed_path,
    run_key,
)
from ckpt_callbacks.lightning.sharded import (
    SHARDED_ENGINE,
    ShardedSave,
    StrategySupport,
    collective_of,
    stop_verifying,
    strategy_support,
    verify_before_loading,
)

logger = logging.getLogger("ckpt_callbacks")

# What ModelCheckpoint does where CheckpointArguments leave it open (see core/run.py `Conventions`).
LIGHTNING_CONVENTIONS = Conventions(final_step_saves=False, newest_is_best_without_metric=True)
# The state key of checkpoints written before this callback was a ModelCheckpoint: their RNG and data position
# still resume (Lightning falls back to `_legacy_state_key`).
_OLD_STATE_KEY = "CheckpointCallback"


class CheckpointCallbackLogic:
    """Save policy, exact resume, best tracking and export for a Lightning `Trainer`, in place of `ModelCheckpoint`.

    Args:
        args: `CheckpointArguments`; `output_dir` defaults to `{trainer.default_root_dir}/checkpoints`.
        **overrides: fields of `CheckpointArguments` to change, e.g. `CheckpointCallback(save_steps=50)`; each
            is also a keyword parameter of its own, so `LightningCLI` accepts `init_args: {save_steps: 50}`.

    Needs `CheckpointIOPlugin` in the same Trainer (`plugins=[CheckpointIOPlugin()]`).

    The attributes a `ModelCheckpoint` user reads are here with the same meaning: `best_model_path`,
    `best_model_score`, `last_model_path`, `best_k_models`, `kth_best_model_path`, `kth_value`, `current_score`,
    `dirpath`, `monitor`, `mode`, `save_top_k`; they describe the committed checkpoints, as the core sees them.
    """

    def __init__(self, args: CheckpointArguments | None = None, **overrides: Any) -> None:
        args = args if args is not None else CheckpointArguments()
        args = args.replace(**overrides) if overrides else args
        if args.output_dir is not None and not is_url(args.output_dir):
            args = args.replace(output_dir=os.path.realpath(os.path.expanduser(args.output_dir)))  # as ModelCheckpoint
        self.args = args
        if self.args.engine not in (None, ENGINE):
            raise ValueError(
                f"engine={self.args.engine!r}: the Lightning adapter stores Lightning's checkpoint dict as one torch "
                f"file so stock loaders can read it; leave engine unset (or '{ENGINE}')."
            )
        self._output_dir: Path | str | None = _folder(self.args.output_dir) if self.args.output_dir else None
        self._configured_dir = self._output_dir  # before a run from scratch moved to `{output_dir}-v{N}`
        self._set_model_checkpoint_attributes()
        self._assigned: dict[str, Any] = {}
        self._reset_runtime()
        _silence_misleading_lightning_warnings()

    def _reset_runtime(self) -> None:
        self._runs: dict[str, RunController] = {}
        self._trainer: Any = None
        self._plugin: CheckpointIOLogic | None = None
        self._active = False
        self._support: StrategySupport | None = None  # set at setup: how the Trainer's strategy is served
        self._collective: Collective | None = None  # the Trainer's processes, for a strategy that loads itself
        self._collective_of_group: Any = None  # the process group `_collective` was made for
        self._sharded_save: ShardedSave | None = None
        self._reset_run_state()

    def _reset_run_state(self) -> None:
        self._last_step_seen: int | None = None
        self._staging_prepared = False  # the first save's host buffers reserved (after the first optimizer step)
        self._fit_start: tuple[int, int] | None = None  # (global_step, batches) when this fit's training started
        self._restored_checkpoint: dict[str, Any] | None = None  # until the resumed training starts

    def _set_model_checkpoint_attributes(self) -> None:
        """`ModelCheckpoint`'s configuration attributes, as these arguments map to them (docs/migration.md)."""
        args = self.args
        # Typed as ModelCheckpoint's attributes are (Any here: each namespace's ModelCheckpoint declares its own).
        self.dirpath: Any = str(self._output_dir) if self._output_dir is not None else None
        self.filename: Any = CHECKPOINT_FILE
        self.monitor = args.metric_for_best_model
        self.mode = "max" if args.metric_for_best_model is not None and args.metric_greater_is_better else "min"
        limit = args.save_best_limit if args.metric_for_best_model is not None else args.save_total_limit
        saves = args.save_strategy != "no" or args.save_time_interval is not None
        self.save_top_k = (limit or -1) if saves else 0
        self.save_last: Any = True  # the newest checkpoint is always kept and is what "last" resumes
        self.save_weights_only = args.save_only_model
        self.save_on_exception = False
        self.verbose = False
        self.auto_insert_metric_name = False
        self._every_n_train_steps = int(args.save_steps) if args.save_strategy == "steps" and args.save_steps >= 1 else 0
        self._every_n_epochs = 1 if args.save_strategy == "epoch" else 0
        self._train_time_interval = (timedelta(seconds=args.save_time_interval)
                                     if args.save_time_interval is not None else None)
        self._save_on_train_epoch_end: bool | None = None
        self._enable_version_counter = False
        self._fs = _filesystem(self.dirpath or "")

    # Pickling (`torch.save(trainer)`): writers, signal handlers and the Trainer are process-local; the callback's
    # arguments and the data position travel, and the run is re-created lazily.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        for name in ("_runs", "_trainer", "_plugin", "_fs", "_restored_checkpoint", "_collective",
                     "_collective_of_group", "_sharded_save"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._runs, self._trainer, self._plugin, self._restored_checkpoint = {}, None, None, None
        self._collective, self._collective_of_group, self._sharded_save = None, None, None
        self._fs = _filesystem(self.dirpath or "")

    @property
    def _data(self) -> SamplerResume:
        """The data position (made when first needed, so an unused callback pickles to an equal copy)."""
        data = self.__dict__.get("_sampler_resume")
        if data is None:
            data = self.__dict__["_sampler_resume"] = SamplerResume()
        return data

    # ------------------------------------------------------------------ public surface

    @property
    def output_dir(self) -> Path | str:
        """The run folder (a local `Path`, or an fsspec URL as given); `{output_dir}-v{N}` for a run from scratch
        whose `output_dir` held an earlier run's checkpoints."""
        if self._output_dir is not None:
            return self._output_dir
        return self._default_dir(None)

    def _default_dir(self, trainer: Any) -> Path | str:
        # Before setup, Lightning already asks for `ckpt_path` (fit(ckpt_path="last") resolves first), so the
        # Trainer's default_root_dir is found on the call stack; the working directory is Lightning's default.
        trainer = trainer or self._trainer or _trainer_on_stack(self)
        root = trainer.default_root_dir if trainer is not None else os.getcwd()
        return _folder(join_path(root, "checkpoints"))

    @property
    def run(self) -> RunController:
        """The run controller of this run's folder."""
        return self._run_for(self.output_dir)

    def _run_for(self, folder: Path | str) -> RunController:
        key = run_key(folder)
        if key not in self._runs:
            if self._sharded_save is not None:  # every rank writes its shard: a collective commit, read back by dcp
                manager = make_run_manager(self.args, folder, engine=SHARDED_ENGINE,
                                           collective=self._sharded_save.collective)
            else:
                manager = make_run_manager(self.args, folder)
            self._runs[key] = RunController(manager, agree=self._agreement(), conventions=LIGHTNING_CONVENTIONS)
        return self._runs[key]

    @property
    def manager(self) -> CheckpointManager:
        """The core manager of this run's folder: `list()`, `latest()`, `best()`, `load(...)`."""
        return self.run.manager

    @property
    def preempted(self) -> bool:
        """Whether SIGTERM/SIGUSR1 stopped the last `fit` (after saving at the next step boundary)."""
        return self.run.preempted

    @property
    def ckpt_path(self) -> str:
        """The checkpoint `fit(ckpt_path="last")` resumes from in this run's folder ("" when there is none): the
        newest one; when it is damaged, an error naming the file, unless `fallback_to_verified` asked for the
        newest one that passes."""
        return self._newest_in(self.output_dir)

    def _newest_in(self, folder: Path | str) -> str:
        verify = self.args.verify_on_load if self.args.fallback_to_verified else "size"
        try:
            found = self._run_for(folder).resume_path(LAST, verify=verify)
        except FileNotFoundError:
            return ""
        return join_path(found, CHECKPOINT_FILE)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number after a preemption stop (`preempted`): end the script with
        `sys.exit(callback.exit_code)` so a scheduler sees an unfinished run (`fit()` itself returns normally).
        A rank that stopped because another rank was signalled reports SIGTERM."""
        return self.run.exit_code

    @property
    def last_model_path(self) -> str:
        """The newest committed checkpoint, "" when there is none (one still being written counts once it is
        complete: loggers hear of it then, `after_save_checkpoint`)."""
        return _checkpoint_file(self.manager.latest()) or self._assigned.get("last_model_path", "")

    @last_model_path.setter
    def last_model_path(self, value: str) -> None:
        self._assigned["last_model_path"] = value

    @property
    def best_model_path(self) -> str:
        """The best committed checkpoint ("" when none): by `metric_for_best_model`, or without one the newest, as
        `ModelCheckpoint(monitor=None)`. What `fit(ckpt_path="best")` resumes from."""
        if self.args.metric_for_best_model is None:
            return self.last_model_path
        return _checkpoint_file(self.run.best_checkpoint()) or self._assigned.get("best_model_path", "")

    @best_model_path.setter
    def best_model_path(self, value: str) -> None:
        # Lightning's spawn launchers copy the worker's best path into the main process's callback.
        self._assigned["best_model_path"] = value

    @property
    def best_model_score(self) -> torch.Tensor | None:
        if self.args.metric_for_best_model is None:
            return None
        return self._score_of(self.run.best_checkpoint())

    @best_model_score.setter
    def best_model_score(self, value: Any) -> None:
        self._assigned["best_model_score"] = value

    @property
    def best_k_models(self) -> dict[str, torch.Tensor]:
        """{checkpoint file: score} of the best checkpoints `save_best_limit` keeps (all scored ones without a
        limit); empty without a metric, as `ModelCheckpoint(monitor=None)`."""
        if self.args.metric_for_best_model is None:
            return {}
        found = {}
        for info in self.run.best_checkpoints():
            score = self._score_of(info)
            if score is not None:
                found[_checkpoint_file(info)] = score
        return found

    @best_k_models.setter
    def best_k_models(self, value: Any) -> None:
        self._assigned["best_k_models"] = value

    @property
    def kth_best_model_path(self) -> str:
        """The worst of `best_k_models` once it holds `save_best_limit` checkpoints (any number without a limit)."""
        best = self.best_k_models
        limit = self.args.save_best_limit
        if not best or (limit is not None and len(best) < limit):
            return ""
        return list(best)[-1]

    @kth_best_model_path.setter
    def kth_best_model_path(self, value: str) -> None:
        self._assigned["kth_best_model_path"] = value

    @property
    def kth_value(self) -> torch.Tensor:
        path = self.kth_best_model_path
        if path:
            return self.best_k_models[path]
        return torch.tensor(-math.inf if self.mode == "max" else math.inf)

    @kth_value.setter
    def kth_value(self, value: Any) -> None:
        self._assigned["kth_value"] = value

    @property
    def current_score(self) -> torch.Tensor | None:
        """The metric of the newest committed checkpoint that has one (None without a metric)."""
        if self.args.metric_for_best_model is None:
            return None
        for info in reversed(self.manager.list()):
            score = self._score_of(info)
            if score is not None:
                return score
        return None

    @current_score.setter
    def current_score(self, value: Any) -> None:
        self._assigned["current_score"] = value

    @property
    def every_n_epochs(self) -> int:
        return self._every_n_epochs

    @property
    def state_key(self) -> str:
        """Distinct per timing and metric, as `ModelCheckpoint`'s: two callbacks in one Trainer keep their states
        apart (and two identical ones are refused by Lightning, as two identical `ModelCheckpoint`s are)."""
        key = {"save_strategy": self.args.save_strategy, "save_steps": self.args.save_steps,
               "save_time_interval": self.args.save_time_interval, "metric_for_best_model": self.monitor}
        return f"{type(self).__qualname__}{key!r}"

    @property
    def _legacy_state_key(self) -> Any:
        return _OLD_STATE_KEY

    def _find_last_checkpoints(self, trainer: Any) -> set[str]:
        """What `fit(ckpt_path="last")` may resume from (Lightning asks every `ModelCheckpoint`, then takes the
        most recently written): the core's choice, the newest committed checkpoint, of `output_dir` and of each
        `{output_dir}-v{N}` a run from scratch moved to (as `ModelCheckpoint` offers `last.ckpt`, `last-v1.ckpt`)."""
        configured = self._configured_dir if self._configured_dir is not None else self._default_dir(trainer)
        found = {self._newest_in(_folder(folder)) for folder in run_folder_versions(os.fspath(configured))}
        return {path for path in found if path}

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        _check_lightning_version(trainer)
        self._trainer = trainer
        self._serve_strategy(trainer)
        if stage != "fit":
            return
        # fast_dev_run checks the code, as with ModelCheckpoint: nothing is saved, locked or exported
        self._active = not trainer.fast_dev_run
        if self._output_dir is None:
            self._output_dir = self.output_dir
            self.dirpath = str(self._output_dir)
            self._fs = _filesystem(self.dirpath)
            self._configured_dir = self._output_dir
        self._reset_run_state()
        self._plugin = _find_plugin(trainer)
        if not self._active:
            return
        self._plugin.register_run(self.run)
        # A DataLoader passed to fit() exists now, before the checkpoint is restored and before any iterator:
        # the only moment at which wrapping it works for every num_workers.
        loader = getattr(getattr(trainer.fit_loop, "_data_source", None), "instance", None)
        self._data.attach(loader, _batches_per_epoch(trainer, loader))

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:
            return {}
        batches_done = _batches_done(trainer.fit_loop.epoch_loop.batch_progress.current)
        return {"rng": _rng_states_of_all_ranks(trainer), "position": self._data.state_dict(batches_done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning calls this after setup() and before the training iterator exists.
        states = state_dict.get("rng")
        if not states:
            return
        rank = getattr(self._trainer, "global_rank", 0)
        self._data.load_state_dict(state_dict.get("position") or {}, states[rank % len(states)])

    def on_load_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        # Kept until training starts: a mid-epoch resume replays the epoch's start with it (`on_train_start`).
        self._restored_checkpoint = checkpoint if _fitting(trainer) else None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning creates the first training iterator after this hook: for an epoch-boundary resume, the next
        # epoch's order must be drawn from the RNG state the checkpoint saved.
        self._data.before_iterator()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._attach_late(trainer)
        self._data.batches_per_epoch = _finite_int(trainer.num_training_batches)
        checkpoint, self._restored_checkpoint = self._restored_checkpoint, None
        if checkpoint is not None and _restarted_mid_epoch(trainer):
            replay_epoch_start(trainer, checkpoint, skip=self)
        resumed = self._data.resuming
        self._data.after_iterator()  # after the replay: the RNG is the checkpoint's, whatever the hooks drew
        self._last_step_seen = trainer.global_step
        self._fit_start = (trainer.global_step, 0)
        if not self._active:
            return
        if trainer.ckpt_path is None and trainer.global_step == 0:
            self._start_from_scratch(trainer)
        elif trainer.ckpt_path is not None:
            self._continue_where_resumed(os.fspath(trainer.ckpt_path))
        # After Lightning installed its own handlers (it does so after on_fit_start): ours replace them for the
        # training, so SIGTERM means "save at the next step, then return from fit" instead of an exception.
        self.run.begin(max_steps=_max_steps(trainer), step=trainer.global_step, resumed=resumed)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # Resuming from a checkpoint taken at an epoch's end, Lightning finishes the old epoch and creates a new
        # iterator for the next one: that iterator must draw from the saved state.
        if self._data.resuming and _new_iterator_follows(trainer):
            self._data.before_iterator()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._data.finish()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._active:
            return
        self._count_optimizer_steps(trainer, pl_module)
        step = trainer.global_step
        if step == self._last_step_seen:
            return  # accumulating gradients: no optimizer step ended
        self._last_step_seen = step
        if not self._staging_prepared:
            self._staging_prepared = True
            self._prepare_staging(trainer)
        if self._agreed(trainer, self.run.flush_deferred()):
            self._save(trainer)
        decision = self.run.step_ended(step, validation_follows=_validation_follows(trainer),
                                       epoch_ends=_epoch_ends(trainer))
        if decision.save:
            self._save(trainer)
        if decision.stop:
            trainer.should_stop = True
        self._announce_saves(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not _fitting(trainer) or not self._active:
            return
        due = self.run.evaluated(trainer.global_step, self._metrics_now(trainer), epoch_ends=_epoch_ends(trainer))
        if self._agreed(trainer, due):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active:
            return
        if self._agreed(trainer, self.run.flush_deferred()):
            self._save(trainer)
        if self.run.epoch_ended():
            self._save(trainer)
        self._announce_saves(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._active:
            return
        if self._agreed(trainer, self.run.flush_deferred()):
            self._save(trainer)
        if self.run.train_ended(trainer.global_step):
            self._save(trainer)
        self.manager.wait()  # surface a failed background write now, and let best_model_path see every save
        self._announce_saves(trainer)
        trainer.strategy.barrier("ckpt_callbacks.on_train_end")
        model, pretrained = exportable_model(pl_module)
        if self._support is not None and self._support.loads_itself:
            self._end_through_strategy(trainer, model, pretrained)
            return
        load_best = {CHECKPOINT_FILE: _ModelInTrainer(trainer)} if self.args.load_best_model_at_end else None
        export = ExportSource(state_dict=model.state_dict, pretrained_objects=pretrained)
        self.run.end(load_best_into=load_best, export=export, is_exporting_rank=trainer.is_global_zero)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # ModelCheckpoint(save_on_exception=True) would save here; a checkpoint taken mid-failure is not trusted
        # for resume (docs/migration.md).
        if self._runs:
            self.run.preemption.uninstall()
        stop_verifying(trainer.strategy)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._runs:
            self.run.preemption.uninstall()
        stop_verifying(trainer.strategy)
        if self._support is not None and self._support.loads_itself and self._plugin is not None:
            # ModelParallelStrategy's teardown never reaches CheckpointIO.teardown: flush and release here
            self._plugin.teardown()

    # ------------------------------------------------------------------ internals

    def _start_from_scratch(self, trainer: Any) -> None:
        """A run that resumes nothing never writes among an earlier run's checkpoints (core: `fresh_run_folder`);
        global rank 0 looks, every rank follows."""
        folder = fresh_run_folder(os.fspath(self.output_dir)) if trainer.is_global_zero else None
        folder = trainer.strategy.broadcast(folder)
        if run_key(folder) == run_key(self.output_dir):
            return
        if trainer.is_global_zero:
            warnings.warn(f"Checkpoint directory {self.output_dir} holds the checkpoints of an earlier run; this run "
                          f"starts from scratch (fit(ckpt_path=None)) and writes to {folder}. Pass ckpt_path='last' "
                          "to resume instead.", stacklevel=2)
        self._switch_to(folder)

    def _continue_where_resumed(self, ckpt_path: str) -> None:
        """A run resumed from a checkpoint of `output_dir` or of one of its `-v{N}` folders goes on in that folder
        (the same path on every rank)."""
        committed = parse_committed_path(ckpt_path)
        if committed is None:
            return
        configured = self._configured_dir if self._configured_dir is not None else self.output_dir
        folders = {run_key(folder): folder for folder in run_folder_versions(os.fspath(configured))}
        folder = folders.get(run_key(committed[0]))
        if folder is not None and run_key(folder) != run_key(self.output_dir):
            logger.info("Resumed from %s: this run goes on saving into %s.", ckpt_path, folder)
            self._switch_to(folder)

    def _switch_to(self, folder: str) -> None:
        self._output_dir = _folder(folder)
        self.dirpath = str(self._output_dir)
        self._fs = _filesystem(self.dirpath)
        assert self._plugin is not None
        self._plugin.register_run(self.run)

    def _save(self, trainer: Any) -> None:
        assert self._plugin is not None
        step = trainer.global_step
        if self.run.policy.last_saved_step == step:
            return
        if self._sharded_save is not None:
            self._save_sharded(trainer, step)
        else:
            path = committed_checkpoint_path(self.output_dir, step)
            self._plugin.expect_save(path, epoch=_fractional_epoch(trainer), metrics=self._metrics_now(trainer))
            trainer.save_checkpoint(path, weights_only=self.args.save_only_model)
        self.run.saved(step)  # every rank: Lightning writes on rank 0 only, but all ranks must agree what is saved

    def _prepare_staging(self, trainer: Any) -> None:
        """After the first optimizer step (the optimizer state exists now), let the manager reserve, in the
        background, the host buffers the first async save will copy Lightning's checkpoint dict into: its
        `state_dict` and `optimizer_states`, under the same keys, so that save does not fault in fresh memory.
        Lightning writes on global rank 0 only; a sharded save stages its own host copy."""
        if self._sharded_save is not None or not trainer.is_global_zero or not self.run.policy.saves_during_training:
            return
        layout_of_the_save: dict[str, Any] = {"state_dict": trainer.lightning_module.state_dict()}
        if not self.args.save_only_model:
            layout_of_the_save["optimizer_states"] = [optimizer.state_dict() for optimizer in trainer.optimizers]
        self.run.manager.prepare_staging({CHECKPOINT_FILE: layout_of_the_save})

    def _save_sharded(self, trainer: Any, step: int) -> None:
        """Every rank: Lightning's checkpoint dict (its hooks run as for `trainer.save_checkpoint`), written in the
        strategy's own sharded layout into the staging folder and committed by the run (`save_written`). With
        `async_save` the training waits only for the host copy of the shards."""
        assert self._sharded_save is not None
        background = self.args.async_save
        with trainer.profiler.profile("save_checkpoint"):
            # The previous save is durable before its host copy is overwritten (and commits run one at a time).
            self.manager.wait()
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(self.args.save_only_model)
            write = self._sharded_save.files_writer(checkpoint, stage=background)
            self.run.save_written(step, write, states=[CHECKPOINT_FILE], epoch=_fractional_epoch(trainer),
                                  metrics=self._metrics_now(trainer), background=background)

    def _serve_strategy(self, trainer: Any) -> None:
        """How the Trainer's strategy is served (`lightning/sharded.py`): refused when it writes its checkpoints in
        a way this library cannot commit (DeepSpeed, XLA); for one that loads (and may save) checkpoints itself,
        the Trainer's processes get a collective of their own (every rank is here), the run folders a manager
        that commits what every rank writes, and the strategy's `load_checkpoint` a verification first."""
        support = strategy_support(trainer.strategy)
        self._support = support
        if not support.loads_itself:
            self._use_managers(sharded=None)
            return
        self._collective = self._collective_for(trainer)
        self._use_managers(sharded=ShardedSave(support, self._collective) if support.sharded else None)
        verify_before_loading(trainer.strategy, self._verified_path)

    def _collective_for(self, trainer: Any) -> Collective:
        import torch.distributed as dist

        group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
        if self._collective is None or group is not self._collective_of_group:
            self._collective, self._collective_of_group = collective_of(trainer), group
        return self._collective

    def _use_managers(self, *, sharded: ShardedSave | None) -> None:
        """Keep the run controllers whose manager fits the strategy (made before setup, they only read), close the
        others; new ones are made on demand with `sharded`'s collective."""
        self._sharded_save = sharded
        for key, run in list(self._runs.items()):
            manager = run.manager
            fits = (manager.engine_class.name == SHARDED_ENGINE and manager.collective is sharded.collective
                    if sharded is not None else isinstance(manager.collective, SingleProcess))
            if not fits:
                manager.close()
                del self._runs[key]

    def _verified_path(self, path: str) -> str:
        """What a strategy that loads checkpoints itself reads instead of `path`: for one of this library's
        checkpoints, the same folder once rank 0 has checksummed every file (shards included) and every rank has
        its verdict (`RunController.agreed_resume_path`: the same error on every rank when a file is damaged,
        naming it). Any other path is left to Lightning, as it is."""
        committed = parse_committed_path(path)
        if committed is None:
            return path
        run_dir, _, name = committed
        collective = self._collective if self._collective is not None else SingleProcess()
        folder = self._run_for(_folder(run_dir)).agreed_resume_path(os.path.dirname(path), collective=collective)
        return join_path(folder, name)

    def _agreed(self, trainer: Any, due: bool) -> bool:
        """Whether a save is due on every rank. A sharded save is collective, so under `save_strategy="best"`
        (a rank's own metrics decide) any rank's due save is every rank's, as `ModelCheckpoint` decides."""
        if self._sharded_save is None or self.args.save_strategy != "best" or trainer.world_size <= 1:
            return due
        return bool(trainer.strategy.reduce_boolean_decision(due, all=False))

    def _end_through_strategy(self, trainer: Any, model: torch.nn.Module, pretrained: list[Any]) -> None:
        """The end of training under a strategy that loads itself: the best weights are loaded by the strategy
        (verified first), and the export gathers whole tensors from the shards to global rank 0 (a collective)."""
        from ckpt_callbacks.core.distributed.consolidate import full_model_state_dict

        weights: dict[str, torch.Tensor] = {}
        if not self.run.stopped_by_signal:
            if self.args.load_best_model_at_end:
                self._load_best_through_strategy(trainer)
            if self.args.export_at_end and self.run.export_dir is not None:
                weights = _whole_weights_of(model, trainer, full_model_state_dict)
        export = ExportSource(state_dict=lambda: weights, pretrained_objects=pretrained)
        self.run.end(export=export, is_exporting_rank=trainer.is_global_zero)

    def _load_best_through_strategy(self, trainer: Any) -> None:
        best = self.run.best_checkpoint()
        collective = self._collective if self._collective is not None else SingleProcess()
        path = collective.broadcast_object(_checkpoint_file(best) or None)  # global rank 0 chooses for every rank
        if path is None:
            logger.warning("load_best_model_at_end: no checkpoint has a value of %r; keeping the final weights. "
                           "Evaluate at the save steps.", self.manager.metric_rule.key)
            return
        trainer.strategy.load_checkpoint(path)  # verified first (`_verified_path`); the model as the strategy loads it
        logger.info("Loaded the best weights from %s.", path)

    def _announce_saves(self, trainer: Any) -> None:
        """`logger.after_save_checkpoint` for each save once it is durable (on the training thread, as stock).
        The saves are written on global rank 0, where Lightning's loggers are told too."""
        for _ in self.run.finished_save_stats():
            for lightning_logger in trainer.loggers:
                lightning_logger.after_save_checkpoint(weakref.proxy(self))

    def _metrics_now(self, trainer: Any) -> dict[str, Any]:
        """What Lightning has logged (training and validation), and `epoch`/`step` when they are the metric, as
        `ModelCheckpoint` reads them at a save. A NaN value of the metric is the worst value (+inf when lower is
        better), as `ModelCheckpoint` ranks it, instead of no value."""
        metrics = dict(trainer.callback_metrics)
        if self.monitor == "epoch":
            metrics.setdefault("epoch", trainer.current_epoch)
        if self.monitor == "step":
            metrics.setdefault("step", trainer.global_step)
        value = metrics.get(self.monitor) if self.monitor is not None else None
        if value is not None and _is_nan(value):
            metrics[self.monitor] = math.inf if self.mode == "min" else -math.inf
        return metrics

    def format_checkpoint_name(self, metrics: dict[str, Any], filename: str | None = None, ver: int | None = None,
                               prefix: str | None = None) -> str:
        """The file of the checkpoint of `metrics["step"]` in this callback's layout
        (`{output_dir}/checkpoint-{step}/checkpoint.ckpt`); `filename`, `ver` and `prefix` do not apply."""
        step = metrics.get("step", 0)
        return self._checkpoint_file_of(int(step.item() if hasattr(step, "item") else step))

    def _count_optimizer_steps(self, trainer: Any, pl_module: Any) -> None:
        """With manual optimization global_step counts every optimizer's steps, while Lightning's estimate of the
        run's length counts batches: after the first batch, scale it (a ratio `save_steps` resolves on it)."""
        if self._fit_start is None or getattr(pl_module, "automatic_optimization", True) or trainer.max_steps > 0:
            return
        start_step, batches = self._fit_start
        self._fit_start = (start_step, batches + 1)
        if batches == 0 and trainer.global_step > start_step:
            estimate = _finite_int(trainer.estimated_stepping_batches)
            if estimate is not None:
                self.run.policy.set_max_steps(estimate * (trainer.global_step - start_step))

    def _checkpoint_file_of(self, step: int) -> str:
        return committed_checkpoint_path(self.output_dir, step)

    def _score_of(self, info: CheckpointInfo | None) -> torch.Tensor | None:
        if info is None:
            return None
        value = self.manager.metric_rule.value_in(info.metrics)
        return None if value is None else torch.tensor(value)

    def _agreement(self) -> Any:
        """Lightning's cross-rank vote for the run controller: any rank's flag counts for all."""

        def agree(flags: tuple[bool, ...]) -> tuple[bool, ...]:
            trainer = self._trainer
            if trainer is None or trainer.world_size <= 1:
                return flags
            return tuple(bool(trainer.strategy.reduce_boolean_decision(flag, all=False)) for flag in flags)

        return agree

    def _attach_late(self, trainer: Any) -> None:
        """Loaders from `train_dataloader()` or a DataModule (or re-created for a distributed sampler) exist only
        now. Without workers the sampler has not drawn yet, so wrapping still works; with workers it already
        drew, so the iterator is re-created (from the saved RNG when resuming)."""
        loader = _single_train_loader(trainer)
        if loader is None or self._data.is_wrapping(loader):
            return
        if not self._data.attach(loader, _batches_per_epoch(trainer, loader)):
            logger.warning("The training loader cannot be replayed (no sized sampler): a mid-epoch resume restores "
                           "the RNG but not the position in the epoch.")
            return
        if getattr(loader, "num_workers", 0) > 0:
            self._data.before_iterator()
            _recreate_train_iterator(trainer)


def replay_epoch_start(trainer: Any, checkpoint: dict[str, Any], *, skip: object) -> None:
    """Resuming in the middle of an epoch, Lightning skips the epoch's `on_train_epoch_start` hooks, which the
    interrupted run did call before it saved: `StochasticWeightAveraging` then never swaps in its scheduler for
    the rest of the epoch, `BackboneFinetuning` leaves the backbone frozen for good. Call them as Lightning's fit
    loop does (callbacks, then the LightningModule), then put back what the checkpoint holds of everything they
    may have changed (weights, optimizers, schedulers, the other callbacks' states): what they did beyond that
    (a scheduler swapped, parameters made trainable) is what the interrupted run had too."""
    import importlib
    from copy import deepcopy

    call = importlib.import_module(f"{_namespace_of(trainer)}.trainer.call")
    with warnings.catch_warnings():
        # BackboneFinetuning re-adds the backbone's parameter group, which the restored optimizer already has
        warnings.filterwarnings("ignore", message=r"The provided params to be frozen already exist")
        call._call_callback_hooks(trainer, "on_train_epoch_start")
        call._call_lightning_module_hook(trainer, "on_train_epoch_start")
    strategy = trainer.strategy
    strategy.load_model_state_dict(checkpoint, strict=getattr(trainer.lightning_module, "strict_loading", True))
    if checkpoint.get("optimizer_states"):
        strategy.load_optimizer_state_dict(checkpoint)
    for config, state in zip(trainer.lr_scheduler_configs, checkpoint.get("lr_schedulers") or [], strict=False):
        config.scheduler.load_state_dict(state)
    states = checkpoint.get("callbacks") or {}
    for callback in trainer.callbacks:
        if callback is skip:
            continue
        state = states.get(callback.state_key, states.get(callback._legacy_state_key))
        if state:
            callback.load_state_dict(deepcopy(state))


def _namespace_of(trainer: Any) -> str:
    """'lightning.pytorch' or 'pytorch_lightning': the package of Lightning's `Trainer` class (a user's subclass of
    it lives elsewhere)."""
    for cls in type(trainer).__mro__:
        if cls.__module__.endswith(".trainer.trainer"):
            return cls.__module__.removesuffix(".trainer.trainer")
    return "lightning.pytorch"


def _restarted_mid_epoch(trainer: Any) -> bool:
    return bool(getattr(trainer.fit_loop, "restarted_mid_epoch", False))


class _ModelInTrainer:
    """The Lightning model as `CheckpointManager.load` restores it: from the `state_dict` of a checkpoint dict,
    through the strategy (which knows how the module is wrapped)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        return {"state_dict": self._trainer.lightning_module.state_dict()}

    def load_state_dict(self, checkpoint: dict[str, Any]) -> None:
        self._trainer.strategy.load_model_state_dict(checkpoint, strict=True)


def exportable_model(pl_module: torch.nn.Module) -> tuple[torch.nn.Module, list[Any]]:
    """What to export: a Hugging Face model the LightningModule wraps (then with its config, so
    `from_pretrained` loads the export), else the LightningModule's own weights."""
    candidates = [child for child in pl_module.children()
                  if callable(getattr(child, "save_pretrained", None)) and getattr(child, "config", None) is not None]
    if len(candidates) != 1 or _parameter_count(candidates[0]) != _parameter_count(pl_module):
        return pl_module, []
    model = candidates[0]
    objects = [model.config]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and callable(getattr(generation_config, "save_pretrained", None)):
        objects.append(generation_config)
    return model, objects


def _whole_weights_of(model: torch.nn.Module, trainer: Any,
                      gather: Callable[[torch.nn.Module], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """`model`'s weights (the LightningModule or the Hugging Face model it wraps) as whole tensors on global rank 0
    (`{}` elsewhere): gathered from the strategy's root module (FSDP1 wraps the LightningModule from outside; FSDP2
    shards it in place), a collective on every rank."""
    pl_module = trainer.lightning_module
    root = trainer.strategy.model if trainer.strategy.model is not None else pl_module
    weights = gather(root)
    if model is pl_module:
        return weights
    prefix = next(f"{name}." for name, child in pl_module.named_children() if child is model)
    return {name.removeprefix(prefix): value for name, value in weights.items() if name.startswith(prefix)}


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _checkpoint_file(info: CheckpointInfo | None) -> str:
    return join_path(info.path, CHECKPOINT_FILE) if info is not None else ""


def _folder(path: str | os.PathLike[str]) -> Path | str:
    """A run folder as this callback keeps it: a local `Path`, or an fsspec URL kept as a string (a `Path` would
    fold its `//`)."""
    text = os.fspath(path)
    return text.rstrip("/") if is_url(text) else Path(text.removeprefix("file://"))


def _filesystem(path: str) -> Any:
    """The fsspec file system of `path` (what `ModelCheckpoint._fs` is; `to_yaml` and `file_exists` use it)."""
    import fsspec

    return fsspec.core.url_to_fs(path or ".")[0]


def _is_nan(value: Any) -> bool:
    try:
        return math.isnan(float(value.item() if hasattr(value, "item") else value))
    except (TypeError, ValueError, RuntimeError):
        return False


def _epoch_ends(trainer: Any) -> bool:
    """Whether the batch that just ended is the epoch's last (Lightning's own flag, set before the batch's hooks)."""
    return bool(getattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch", False))


def _find_plugin(trainer: Any) -> CheckpointIOLogic:
    checkpoint_io = trainer.strategy.checkpoint_io
    # Lightning's wrappers (AsyncCheckpointIO) keep the wrapped plugin in `.checkpoint_io`.
    while not isinstance(checkpoint_io, CheckpointIOLogic) and getattr(checkpoint_io, "checkpoint_io", None) is not None:
        checkpoint_io = checkpoint_io.checkpoint_io
    if not isinstance(checkpoint_io, CheckpointIOLogic):
        raise ValueError(
            f"CheckpointCallback writes through CheckpointIOPlugin, but the Trainer uses {type(checkpoint_io).__name__}. "
            "Add the plugin from the same package as the callback: Trainer(plugins=[CheckpointIOPlugin()], ...)."
        )
    return checkpoint_io


def _trainer_on_stack(callback: object) -> Any | None:
    """The Trainer (or its checkpoint connector's trainer) whose callbacks include `callback`, from the caller frames."""
    frame = sys._getframe(1)
    while frame is not None:
        owner = frame.f_locals.get("self")
        for candidate in (owner, _attribute(owner, "trainer")):
            callbacks = _attribute(candidate, "callbacks")
            if isinstance(callbacks, list) and any(c is callback for c in callbacks):
                return candidate
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _attribute(obj: Any, name: str) -> Any:
    try:
        return getattr(obj, name, None)
    except Exception:  # properties such as LightningModule.trainer raise when unattached
        return None


def _batches_done(progress: Any) -> int:
    """Batches of the current epoch already trained on, by Lightning's own restart rule: a checkpoint taken in
    `on_train_batch_end` (the batch processed, not yet marked completed) counts that batch as done."""
    saved_in_batch_end = progress.ready == progress.started == progress.processed == progress.completed + 1
    return int(progress.completed + (1 if saved_in_batch_end else 0))


def _rng_states_of_all_ranks(trainer: Any) -> list[dict[str, Any]]:
    state = capture_rng_state()
    if trainer.world_size <= 1 or not torch.distributed.is_initialized():
        return [state]
    # Only global rank 0's checkpoint dict is written, so every rank's state must travel there.
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, state)
    return gathered


def _single_train_loader(trainer: Any) -> Any | None:
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = getattr(combined, "flattened", None) or []
    return loaders[0] if len(loaders) == 1 else None


def _recreate_train_iterator(trainer: Any) -> None:
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is not None:
        iter(fetcher)


def _batches_per_epoch(trainer: Any, loader: Any) -> int | None:
    """Batches Lightning takes from `loader` per epoch (its length, cut by `limit_train_batches`)."""
    try:
        length = len(loader)
    except TypeError:
        return None
    limit = trainer.limit_train_batches
    if isinstance(limit, int):
        return min(length, limit)
    return int(length * limit) if isinstance(limit, float) and limit < 1.0 else length


def _finite_int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _max_steps(trainer: Any) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    return _finite_int(trainer.estimated_stepping_batches)


def _fractional_epoch(trainer: Any) -> float:
    batches = _finite_int(trainer.num_training_batches)
    done = _batches_done(trainer.fit_loop.epoch_loop.batch_progress.current)
    return float(trainer.current_epoch + (done / batches if batches else 0.0))


def _fitting(trainer: Any) -> bool:
    fn = getattr(trainer.state, "fn", None)
    return getattr(fn, "value", fn) == "fit"


def _silence_misleading_lightning_warnings() -> None:
    """Lightning warns that a mid-epoch resume of a plain DataLoader is unreliable; with this callback it is exact
    (the callback replays the epoch; where it cannot, it warns itself). Only this message is filtered."""
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


MIN_LIGHTNING = "2.5.0"  # the loop restart rules (RestartStage) the exact resume mirrors came with 2.5.0


def _check_lightning_version(trainer: Any) -> None:
    """Refuse a Lightning older than the adapter supports, naming the installed version and the minimum."""
    from packaging.version import Version  # a Lightning dependency

    package = type(trainer).__module__.split(".")[0]  # "lightning" or "pytorch_lightning"
    installed = getattr(sys.modules.get(package), "__version__", None)
    if installed is not None and Version(installed) < Version(MIN_LIGHTNING):
        raise RuntimeError(
            f"ckpt_callbacks needs {package.replace('_', '-')}>={MIN_LIGHTNING} (its resume is exact only with the loop "
            f"restart rules of 2.5); {package} {installed} is installed. Upgrade it, or remove CheckpointCallback and "
            "CheckpointIOPlugin to use Lightning's own checkpointing."
        )


def _new_iterator_follows(trainer: Any) -> bool:
    """Whether Lightning creates a new training iterator after `on_train_epoch_start` (mirrors its own rule in
    `_TrainingEpochLoop.on_run_start`)."""
    fit_loop = trainer.fit_loop
    resuming = getattr(fit_loop, "is_resuming", False)  # Lightning < 2.5.3 has none, and its rule no such term
    return bool(trainer.current_epoch > 0 and not resuming and not fit_loop.epoch_loop.restarting)


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning validates right after the current training batch (its own private decision)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # a Lightning version without these internals: save at once instead
        return False
