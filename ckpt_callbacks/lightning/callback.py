"""Lightning events mapped onto the core, for either Lightning namespace.

`CheckpointCallbackLogic` holds the behaviour; `ckpt_callbacks.lightning` and
`ckpt_callbacks.pytorch_lightning` combine it with their namespace's
`OnExceptionCheckpoint`. Why that base: Lightning resolves
`fit(ckpt_path="last")` from `ModelCheckpoint` files named `last*.ckpt` and
from the `ckpt_path` of every `OnExceptionCheckpoint`, so exposing our newest
committed checkpoint there is the one public way in. (Lightning also turns
`fit(ckpt_path=None)` into `"last"` when such a callback is present: a run
resumes from its output folder unless told otherwise.)

What happens where:

- The run's `RunController` (core) decides when to save, which checkpoint is
  best, where a resume starts and what happens at the end; this module reports
  Lightning's events to it and calls
  `trainer.save_checkpoint(.../checkpoint-{step}/checkpoint.ckpt)`, which the
  plugin commits through the same controller.
- RNG state (every rank) and the data position go into this callback's
  `state_dict`, i.e. into Lightning's checkpoint dict; `SamplerResume` (core)
  replays the interrupted epoch on resume.
- During `fit`, validation runs inside an RNG bubble: the training stream is
  put back after it. Lightning does not re-run a validation that followed the
  saved step, so without the bubble a resumed run would draw different
  random numbers than the uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.core.read.catalog import LAST, CheckpointInfo
from ckpt_callbacks.core.run import ExportSource, RunController
from ckpt_callbacks.core.state.rng import capture_rng_state, restore_rng_state
from ckpt_callbacks.core.state.sampler_replay import SamplerResume
from ckpt_callbacks.lightning.plugin import (
    CHECKPOINT_FILE,
    ENGINE,
    CheckpointIOLogic,
    committed_checkpoint_path,
    make_run_manager,
)

logger = logging.getLogger("ckpt_callbacks")


class CheckpointCallbackLogic:
    """Save policy, exact resume, best tracking and export for a Lightning `Trainer`.

    Args:
        args: `CheckpointArguments`; `output_dir` defaults to `{trainer.default_root_dir}/checkpoints`.
        **overrides: fields of `CheckpointArguments` to change, e.g. `CheckpointCallback(save_steps=50)`.

    Needs `CheckpointIOPlugin` in the same Trainer (`plugins=[CheckpointIOPlugin()]`).
    """

    def __init__(self, args: CheckpointArguments | None = None, **overrides: Any) -> None:
        args = args if args is not None else CheckpointArguments()
        self.args = args.replace(**overrides) if overrides else args
        if self.args.engine not in (None, ENGINE):
            raise ValueError(
                f"engine={self.args.engine!r}: the Lightning adapter stores Lightning's checkpoint dict as one torch "
                f"file so stock loaders can read it; leave engine unset (or '{ENGINE}')."
            )
        self.dirpath: str | Path = self.args.output_dir or ""
        self.filename = CHECKPOINT_FILE
        self._output_dir: Path | None = Path(self.args.output_dir) if self.args.output_dir else None
        self._runs: dict[Path, RunController] = {}
        self._trainer: Any = None
        self._plugin: CheckpointIOLogic | None = None
        self._data = SamplerResume()
        self._reset_run_state()
        _silence_misleading_lightning_warnings()

    def _reset_run_state(self) -> None:
        self._last_step_seen: int | None = None
        self._rng_before_validation: dict[str, Any] | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def output_dir(self) -> Path:
        if self._output_dir is not None:
            return self._output_dir
        # Before setup, Lightning already asks for `ckpt_path` (fit(ckpt_path="last") resolves first), so the
        # Trainer's default_root_dir is found on the call stack; the working directory is Lightning's default.
        trainer = self._trainer if self._trainer is not None else _trainer_on_stack(self)
        root = trainer.default_root_dir if trainer is not None else os.getcwd()
        return Path(root) / "checkpoints"

    @property
    def run(self) -> RunController:
        """The run controller of this run's folder."""
        key = self.output_dir.resolve()
        if key not in self._runs:
            self._runs[key] = RunController(make_run_manager(self.args, self.output_dir), agree=self._agreement())
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
        """The checkpoint `fit(ckpt_path="last")` resumes from ("" when there is none): the newest one; when it is
        damaged, an error naming the file, unless `fallback_to_verified` asked for the newest one that passes."""
        verify = self.args.verify_on_load if self.args.fallback_to_verified else "size"
        try:
            folder = self.run.resume_path(LAST, verify=verify)
        except FileNotFoundError:
            return ""
        return os.path.join(folder, CHECKPOINT_FILE)

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number after a preemption stop (`preempted`): end the script with
        `sys.exit(callback.exit_code)` so a scheduler sees an unfinished run (`fit()` itself returns normally).
        A rank that stopped because another rank was signalled reports SIGTERM."""
        return self.run.exit_code

    @property
    def last_model_path(self) -> str:
        return _checkpoint_file(self.manager.latest())

    @property
    def best_model_path(self) -> str:
        """The best committed checkpoint by `metric_for_best_model` ("" when none): `fit(ckpt_path="best")`."""
        return _checkpoint_file(self.manager.best())

    @property
    def best_model_score(self) -> torch.Tensor | None:
        best = self.manager.best()
        value = self.manager.metric_rule.value_in(best.metrics) if best is not None else None
        return None if value is None else torch.tensor(value)

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        if self._output_dir is None:
            self._output_dir = Path(trainer.default_root_dir) / "checkpoints"
            self.dirpath = str(self._output_dir)
        self._reset_run_state()
        self._plugin = _find_plugin(trainer)
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

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # Lightning creates the first training iterator after this hook: for an epoch-boundary resume, the next
        # epoch's order must be drawn from the RNG state the checkpoint saved.
        self._data.before_iterator()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._attach_late(trainer)
        self._data.batches_per_epoch = _finite_int(trainer.num_training_batches)
        resumed = self._data.resuming
        self._data.after_iterator()
        self._last_step_seen = trainer.global_step
        # After Lightning installed its own handlers (it does so after on_fit_start): ours replace them for the
        # training, so SIGTERM means "save at the next step, then return from fit" instead of an exception.
        self.run.begin(max_steps=_max_steps(trainer), step=trainer.global_step, resumed=resumed)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        # Resuming from a checkpoint taken after the epoch's last batch (in on_validation_end), Lightning finishes
        # the old epoch and creates a new iterator for the next one: that iterator must draw from the saved state.
        if self._data.resuming and _new_iterator_follows(trainer):
            self._data.before_iterator()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._data.finish()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._rng_before_validation = capture_rng_state()
        step = trainer.global_step
        if step == self._last_step_seen:
            return  # accumulating gradients: no optimizer step ended
        self._last_step_seen = step
        if self.run.flush_deferred():
            self._save(trainer)
        decision = self.run.step_ended(step, validation_follows=_validation_follows(trainer))
        if decision.save:
            self._save(trainer)
        if decision.stop:
            trainer.should_stop = True

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking or not _fitting(trainer) or self._plugin is None:
            return
        if self._rng_before_validation is not None:
            restore_rng_state(self._rng_before_validation)
        if self.run.evaluated(trainer.global_step, trainer.callback_metrics):
            self._save(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run.flush_deferred():
            self._save(trainer)
        if self.run.epoch_ended():
            self._save(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.run.flush_deferred():
            self._save(trainer)
        if self.run.train_ended(trainer.global_step):
            self._save(trainer)
        self.manager.wait()  # surface a failed background write now, and let best_model_path see every save
        trainer.strategy.barrier("ckpt_callbacks.on_train_end")
        load_best = {CHECKPOINT_FILE: _ModelInTrainer(trainer)} if self.args.load_best_model_at_end else None
        model, pretrained = exportable_model(pl_module)
        export = ExportSource(state_dict=model.state_dict, pretrained_objects=pretrained)
        self.run.end(load_best_into=load_best, export=export, is_exporting_rank=trainer.is_global_zero)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # OnExceptionCheckpoint would save here; a checkpoint taken mid-failure is not trusted for resume.
        self.run.preemption.uninstall()

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        # OnExceptionCheckpoint would delete ckpt_path (our newest checkpoint) here.
        self.run.preemption.uninstall()

    # ------------------------------------------------------------------ internals

    def _save(self, trainer: Any) -> None:
        assert self._plugin is not None
        step = trainer.global_step
        if self.run.policy.last_saved_step == step:
            return
        path = committed_checkpoint_path(self.output_dir, step)
        self._plugin.expect_save(path, epoch=_fractional_epoch(trainer))
        trainer.save_checkpoint(path, weights_only=self.args.save_only_model)
        self.run.saved(step)  # every rank: Lightning writes on rank 0 only, but all ranks must agree what is saved

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


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _checkpoint_file(info: CheckpointInfo | None) -> str:
    return os.path.join(info.path, CHECKPOINT_FILE) if info is not None else ""


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
    """Two Lightning warnings say the opposite of what happens with this callback: that fit(ckpt_path=None)
    loads "the last model of the previous fit" (it resumes from the newest checkpoint in output_dir, and
    Lightning logs the path), and that a mid-epoch resume of a plain DataLoader is unreliable (the callback
    replays the epoch exactly; where it cannot, it warns itself). Only these two messages are filtered."""
    warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")


def _new_iterator_follows(trainer: Any) -> bool:
    """Whether Lightning creates a new training iterator after `on_train_epoch_start` (mirrors its own rule in
    `_TrainingEpochLoop.on_run_start`)."""
    fit_loop = trainer.fit_loop
    return bool(trainer.current_epoch > 0 and not fit_loop.is_resuming and not fit_loop.epoch_loop.restarting)


def _validation_follows(trainer: Any) -> bool:
    """Whether Lightning validates right after the current training batch (its own private decision)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    try:
        return bool(epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))
    except (AttributeError, TypeError):  # a Lightning version without these internals: save at once instead
        return False
