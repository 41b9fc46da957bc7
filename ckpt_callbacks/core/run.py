"""`RunController`: one training run seen from the checkpointing side; the adapters report events to it.

What both adapters share lives here, once: the run's policy and best tracker (the manager's, fed by the
framework's own notion of best where it has one), preemption with a cross-rank vote the adapter injects,
saves deferred until the validation that follows a step, the metrics a checkpoint records, the end of the
run (flush, best weights, export), and the checkpoint a resume starts from. The adapters translate
framework events into these calls and framework objects into state; they decide nothing here.

Event order for one run:

    begin(...)                        # training starts (after a resume is restored)
    step_ended(step, ...) -> StepDecision   # save now / stop
    evaluated(step, metrics) -> bool  # save now (a new best, or the save deferred to this validation)
    epoch_ended() -> bool
    save(step, pieces, ...)           # the adapter captured the framework's state
    end(...)                          # training finished: flush, load the best weights, export
"""

from __future__ import annotations

import logging
import math
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.distributed.collective import Collective
from ckpt_callbacks.core.export import check_export_target, export_safetensors
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.core.preemption import PreemptionFlag
from ckpt_callbacks.core.read.catalog import CheckpointInfo, ResumeCandidate
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.save.retention import RetentionPolicy
from ckpt_callbacks.core.save.saver import SaveStats
from ckpt_callbacks.core.storage.store import make_store
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError

if TYPE_CHECKING:
    import torch

    from ckpt_callbacks.errors import CheckpointCorruptError

__all__ = ["Conventions", "ExportSource", "RunController", "StepDecision", "fresh_run_folder", "run_folder_versions"]

logger = logging.getLogger("ckpt_callbacks")

# (flags) -> the same flags, true on every rank when true on any: the adapter's collective on the training group.
Agreement = Callable[[tuple[bool, ...]], tuple[bool, ...]]


@dataclass(frozen=True)
class StepDecision:
    save: bool  # checkpoint this step now
    stop: bool  # a preemption signal: stop training after this step's checkpoint
    deferred: bool = False  # the save waits for the validation that follows this step


@dataclass(frozen=True)
class Conventions:
    """What the framework's own checkpointing does where the flags leave it open; the adapter names its
    framework's, the rules that apply them stay here.

    `final_step_saves`: the HF Trainer's. Under `steps` the final step is saved too, and the end of training saves
    an unsaved last step. False (Lightning's `ModelCheckpoint`): saves fall only on the schedule
    (`every_n_train_steps` never adds the final step), and the end of training saves only when the run saved
    nothing at all (what `save_last=True` does).
    `newest_is_best_without_metric`: without `metric_for_best_model`, the best checkpoint is the newest
    (`ModelCheckpoint(monitor=None)`), not none (the HF Trainer's `best_model_checkpoint`)."""

    final_step_saves: bool = True
    newest_is_best_without_metric: bool = False


@dataclass
class ExportSource:
    """What the end-of-run export writes: the weights (read only when exporting) and the files beside them."""

    state_dict: Callable[[], Mapping[str, torch.Tensor]]
    pretrained_objects: Iterable[Any] = ()
    weights_name: str = "model"


@dataclass
class _StepMetrics:
    step: int
    metrics: dict[str, float] = field(default_factory=dict)


class RunController:
    """One run: `manager` holds the checkpoints, the policy and the best tracker.

    `framework_args`: the save flags the framework itself runs with (the HF Trainer's own save schedule), or None
    when the framework has no schedule of its own. When their timing equals the run's, the framework decides when
    to save (its flow keeps its own rules) and only the time interval and preemption are added here. Such a
    framework's rotation rule applies as well: `save_total_limit` counts the checkpoint a resume started from like
    any other (the newest N and the best survive, nothing more).

    `agree`: the adapter's cross-rank vote (several processes must take the same decision: clocks and signals
    differ between them), or None for one process."""

    def __init__(self, manager: CheckpointManager, *, framework_args: CheckpointArguments | None = None,
                 agree: Agreement | None = None, conventions: Conventions | None = None) -> None:
        self.manager = manager
        self.args = manager.args
        self.policy = manager.policy
        self.framework_decides = framework_args is not None and self.policy.same_timing(framework_args)
        if framework_args is not None:
            manager.protect_resumed_from = False
        self.conventions = conventions if conventions is not None else Conventions()
        self.preemption = PreemptionFlag()
        self.stopped_by_signal = False
        self.saves_this_run = 0
        self.export_dir: Path | None = self._export_dir()
        self.unreported_saves: list[SaveStats] = []
        self._agree = agree
        self._framework_tracks_best = False
        self._framework_best: tuple[int, float | None] | None = None
        self._metrics: _StepMetrics | None = None
        self._deferred_step: int | None = None
        self._deferred_to_epoch_end = False
        self._evaluated_without_metric: list[str] | None = None
        self._weights_from: CheckpointInfo | None = None  # the checkpoint `load_best` restored

    # ------------------------------------------------------------------ lifecycle

    def begin(self, *, max_steps: int | None, step: int, resumed: bool, install_signals: bool = True,
              framework_tracks_best: bool = False) -> None:
        """Training starts at `step` (after a resume was restored). Refuses, before any training, an export folder
        that holds anything but an earlier export. `framework_tracks_best`: the framework ranks checkpoints
        itself and reports its best through `framework_best` (retention then protects exactly that one)."""
        if self.args.export_at_end and self.export_dir is not None:
            try:
                check_export_target(self.export_dir)
            except CheckpointError as exc:
                # Training and its checkpoints go ahead; the export is refused at the end unless the folder is
                # cleared by then (it is checked again there), and nothing in it is touched either way.
                logger.warning("%s Until then the export at the end of training will be refused; checkpoints are "
                               "saved as usual.", exc)
        self.policy.set_max_steps(max_steps)
        self.manager.know_best()
        if resumed:
            self.manager.resumed_from_step = step
            self.policy.record_save(step)  # the step resumed from is saved already
        self._framework_tracks_best = framework_tracks_best
        if framework_tracks_best:
            # The framework's best (`framework_best`, protected) is the one retention keeps, not a best of its own
            # by the metrics in the manifests (which lack the framework's metric when it came from elsewhere, and
            # which checkpoints the framework wrote itself do not have at all).
            keep_best = self.args.save_best_limit
            self.manager.retention = RetentionPolicy(self.args.save_total_limit, keep_best,
                                                     self.manager.metric_rule if keep_best else None)
        self.stopped_by_signal = False
        self.saves_this_run = 0
        self._deferred_step = None
        self._deferred_to_epoch_end = False
        self._metrics = None
        self.preemption = PreemptionFlag()
        if install_signals and self.args.save_on_signal:
            self.preemption.install()
        self.manager.expect_saves()  # a restored state's staging buffers are reserved while training starts

    def step_ended(self, step: int, *, validation_follows: bool = False, epoch_ends: bool = False) -> StepDecision:
        """An optimizer step ended. Under the framework's own schedule only the time interval and preemption add
        saves; otherwise the policy decides. A due save waits for the validation that follows this step, if any:
        the checkpoint then records its metrics (and a resume does not replay a validation the run never ran).
        On the epoch's last step (`epoch_ends`) it waits for the end of the epoch (`epoch_ended`): the checkpoint
        then holds what the epoch-end hooks did with that validation, and a resume does not replay them."""
        self.check_metric_logged()
        due = self.policy.time_interval_elapsed() if self.framework_decides else self._due_at_step(step)
        stop = self.preemption.requested
        if self._agree is not None and (self.args.save_on_signal or self.args.save_time_interval is not None):
            due, stop = self._agree((due, stop))
            if stop and not self.preemption.requested:
                self.preemption.received = signal.SIGTERM  # stopped because another rank was signalled
        if stop:
            self.stopped_by_signal = True
            logger.warning("Preemption signal received: saving checkpoint-%d, stopping.", step)
        save = (due or stop) and self.policy.last_saved_step != step
        if save and (validation_follows or epoch_ends):
            self._deferred_step, self._deferred_to_epoch_end = step, epoch_ends
            return StepDecision(save=False, stop=stop, deferred=True)
        return StepDecision(save=save, stop=stop)

    def _due_at_step(self, step: int) -> bool:
        if self.conventions.final_step_saves:
            return self.policy.on_step_end(step)
        # The schedule alone, without the policy's final-step save.
        interval = self.policy.save_interval if self.args.save_strategy == "steps" else None
        return (interval is not None and step > 0 and step % interval == 0) or self.policy.time_interval_elapsed()

    def evaluated(self, step: int, metrics: Mapping[str, Any], *, epoch_ends: bool = False) -> bool:
        """An evaluation of the weights at `step` (one of several, with several eval sets): merged into what the
        checkpoint of this step records. True when a save is due now: a new best under `best`, or the save that
        waited for this validation. After the epoch's last step (`epoch_ends`) a due save waits for
        `epoch_ended` instead (see `step_ended`)."""
        numeric = _numeric(metrics)
        if self._metrics is None or self._metrics.step != step:
            self._metrics = _StepMetrics(step)
        self._metrics.metrics.update(numeric)
        self._note_metric_presence(numeric)
        is_due = self.manager.should_save_evaluation(self._metrics.metrics, step)
        if self._deferred_to_epoch_end and self._deferred_step == step:
            return False  # taken at the end of the epoch
        deferred, self._deferred_step = self._deferred_step == step, None
        due = deferred if self.framework_decides else (is_due or deferred) and self.policy.last_saved_step != step
        if due and epoch_ends:
            self._deferred_step, self._deferred_to_epoch_end = step, True
            return False
        return due

    def flush_deferred(self) -> bool:
        """Whether a save still waits (for a validation that did not come, or for the end of the epoch): due now."""
        due, self._deferred_step, self._deferred_to_epoch_end = self._deferred_step is not None, None, False
        return due

    def epoch_ended(self) -> bool:
        self.check_metric_logged()
        if self.framework_decides:
            return False
        return self.policy.on_epoch_end()

    def saved(self, step: int) -> None:
        """The framework saved `step` (on every rank, even where another rank did the writing)."""
        self.policy.record_save(step)
        self.saves_this_run += 1

    def train_ended(self, step: int) -> bool:
        """Whether a final save is due at the end of training (not when saving is off or this step is saved; under
        `Conventions(final_step_saves=False)` only when the run saved nothing)."""
        if not self.conventions.final_step_saves and self.saves_this_run:
            return False
        return self.policy.on_train_end(step)

    @property
    def preempted(self) -> bool:
        return self.stopped_by_signal

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number after a preemption stop (SIGTERM when another rank was signalled)."""
        if not self.stopped_by_signal:
            return 0
        return self.preemption.exit_code or 128 + signal.SIGTERM

    # ------------------------------------------------------------------ best

    def framework_best(self, step: int | None, value: float | None) -> None:
        """The framework's own best checkpoint (the HF Trainer's `best_global_step`/`best_metric`): retention never
        deletes it, and a checkpoint of that step records `value` under the run's metric."""
        if step is None:
            return
        self._framework_best = (step, value)
        self.manager.protected_steps = {step}
        tracker = self.manager.best_tracker
        tracker.best_step, tracker.best_value = step, value

    def best_step(self) -> int | None:
        """The step of the run's best checkpoint: the framework's when it tracks one, else the best evaluation."""
        if self._framework_tracks_best:
            return self._framework_best[0] if self._framework_best is not None else None
        return self.manager.best_tracker.best_step

    def best_checkpoint(self) -> CheckpointInfo | None:
        """The run's best committed checkpoint: the framework's or the best evaluation's, else the best saved score;
        without `metric_for_best_model`, the newest under `Conventions(newest_is_best_without_metric=True)`."""
        best = self._best_info()
        if best is None and self.args.metric_for_best_model is None and self.conventions.newest_is_best_without_metric:
            return self.manager.latest()
        return best

    def best_checkpoints(self) -> list[CheckpointInfo]:
        """The committed checkpoints that have a value of the run's metric, best first (ties to the earlier step),
        at most `save_best_limit` of them: the ones `save_best_limit` keeps as the best."""
        committed = {info.step: info for info in self.manager.list()}
        rule = self.manager.metric_rule
        ranked = rule.ranked((step, value) for step, info in committed.items()
                             if (value := rule.value_in(info.metrics)) is not None)
        limit = self.args.save_best_limit
        return [committed[step] for step in (ranked if limit is None else ranked[:limit])]

    def best_checkpoint_path(self, step: int) -> str | None:
        """`checkpoint-{best}` in the run folder, once it exists (or is the one being saved at `step`)."""
        best = self.best_step()
        if best is None or not (best == step or self.has_checkpoint(best)):
            return None
        return self.manager.store.location(layout.checkpoint_name(best))

    def has_checkpoint(self, step: int) -> bool:
        return any(info.step == step for info in self.manager.list()) or self.policy.last_saved_step == step

    # ------------------------------------------------------------------ saving

    def metrics_at(self, step: int) -> dict[str, float]:
        """What the checkpoint of `step` records: the evaluations of exactly these weights, and the framework's best
        value when this step is its best (so the manifest ranks it as the framework does)."""
        metrics = dict(self._metrics.metrics) if self._metrics is not None and self._metrics.step == step else {}
        if self._framework_best is not None and self._framework_best[0] == step and self._framework_best[1] is not None:
            metrics.setdefault(self.manager.metric_rule.key, float(self._framework_best[1]))
        return metrics

    def save(self, step: int, state: Mapping[str, Any], *, epoch: float | None, defer_staging: bool = False,
             copy_now: Iterable[torch.Tensor] = (), capture_rng: bool = True,
             metrics: Mapping[str, Any] | None = None) -> None:
        """Checkpoint the framework state `state` (already captured by the adapter) at `step`. `metrics`: values the
        framework holds at the save (Lightning's logged metrics, training ones included); an evaluation of this
        very step takes precedence."""
        self.check_metric_logged()
        recorded = {**_numeric(metrics or {}), **self.metrics_at(step)}
        self.manager.save(step, state, metrics=recorded, epoch=epoch, defer_staging=defer_staging,
                          copy_now=copy_now, capture_rng=capture_rng)
        if self.manager.last_save is not None:
            self.unreported_saves.append(self.manager.last_save)

    def save_written(self, step: int, write_files: Callable[[Path], None], *,
                     states: Iterable[str] | Callable[[Path], Iterable[str]], epoch: float | None,
                     metrics: Mapping[str, Any] | None = None, background: bool = False) -> None:
        """`save` for a checkpoint whose files the framework writes itself (`CheckpointManager.save_written`, on
        every rank): the same metrics recorded, the same commit, retention and reporting; synchronous unless
        `background` (the caller made a copy the writer thread reads)."""
        self.check_metric_logged()
        recorded = {**_numeric(metrics or {}), **self.metrics_at(step)}
        self.manager.save_written(step, write_files, states=states, epoch=epoch, metrics=recorded,
                                  background=background)
        if self.manager.last_save is not None:
            self.unreported_saves.append(self.manager.last_save)

    def finished_save_stats(self) -> list[SaveStats]:
        """The saves that became durable since the last call, each reported once."""
        finished = [stats for stats in self.unreported_saves if stats.total_seconds is not None]
        self.unreported_saves = [stats for stats in self.unreported_saves if stats.total_seconds is None]
        return finished

    # ------------------------------------------------------------------ metric checks

    def _note_metric_presence(self, metrics: Mapping[str, float]) -> None:
        if self.args.metric_for_best_model is None:
            return
        if self.manager.metric_rule.value_in(self._metrics.metrics if self._metrics else metrics) is None:
            self._evaluated_without_metric = sorted(self._metrics.metrics if self._metrics else metrics)
        else:
            self._evaluated_without_metric = None

    def check_metric_logged(self) -> None:
        """Raise when an evaluation ended without the metric that ranks checkpoints, naming the ones it had: as the
        stock Trainer does at its first evaluation (checked at the next event, when every eval set has reported)."""
        missing, self._evaluated_without_metric = self._evaluated_without_metric, None
        if missing is None or self._framework_tracks_best:
            return
        raise KeyError(
            f"The `metric_for_best_model` flag is set to {self.manager.metric_rule.key!r}, which is not found in the "
            f"evaluation metrics. The available evaluation metrics are: {missing}. Set metric_for_best_model to one of "
            "them (CheckpointArguments or TrainingArguments).")

    # ------------------------------------------------------------------ end of run

    def end(self, *, load_best_into: Mapping[str, Any] | None = None, export: ExportSource | None = None,
            is_exporting_rank: bool = True) -> None:
        """Training ended: make every save durable, then (unless a signal stopped the run, which will resume)
        restore the best weights into `load_best_into` and write the export."""
        self.manager.wait()
        self.preemption.uninstall()
        if self.stopped_by_signal:
            logger.warning("Stopped on signal %s after saving checkpoint-%s; skipped best-model loading and export.",
                           self.preemption.received, self.policy.last_saved_step)
            return
        if load_best_into is not None:
            self.load_best(load_best_into)
        if export is not None and self.args.export_at_end and is_exporting_rank:
            self.write_export(export)

    def load_best(self, targets: Mapping[str, Any]) -> CheckpointInfo | None:
        best = self._best_info()
        if best is None:
            logger.warning("load_best_model_at_end: no checkpoint has a value of %r; keeping the final weights. "
                           "Evaluate at the save steps.", self.manager.metric_rule.key)
            return None
        self.manager.load(best, targets, restore_rng=False)
        self._weights_from = best
        logger.info("Loaded the best weights from %s (%s).", best.path, best.metrics)
        return best

    def _best_info(self) -> CheckpointInfo | None:
        """The framework's best checkpoint when it tracks one (if it is committed); else the best committed
        checkpoint by the metric it recorded (an evaluation of weights that were never saved ranks nothing)."""
        if not self._framework_tracks_best:
            return self.manager.best()
        step = self.best_step()
        return next((info for info in self.manager.list() if info.step == step), None)

    def write_export(self, source: ExportSource) -> Path | None:
        if self.export_dir is None:
            logger.warning("export_at_end: the run folder %s is not local; set export_dir to a local folder.",
                           self.manager.store.root)
            return None
        # The checkpoint most likely to hold the exported weights: the export shares its files where they verify.
        holder = self._weights_from or self.manager.latest()
        export_safetensors(source.state_dict(), self.export_dir, max_shard_size=self.args.max_shard_size,
                           pretrained_objects=source.pretrained_objects, weights_name=source.weights_name,
                           reuse_from=holder.path if holder is not None else None)
        logger.info("Exported the final model to %s.", self.export_dir)
        return self.export_dir

    def _export_dir(self) -> Path | None:
        if self.args.export_dir is not None:
            return Path(self.args.export_dir)
        root = self.manager.store.root
        return None if "://" in root else Path(root) / "export"

    # ------------------------------------------------------------------ resuming

    def resume_path(self, requested: str | int | os.PathLike[str], *, accept_foreign: bool = False,
                    read_ahead: Callable[[str], None] | None = None, verify: str | None = None,
                    fallback: bool | None = None) -> str:
        """The folder a resume starts from: `requested` (`catalog.LAST`, `catalog.BEST`, a step or a folder),
        verified (`verify_on_load`), with `fallback_to_verified`'s rule. `read_ahead(path)` is called as soon as a
        candidate is known, before its verification ends (it may read files into new memory, never restore).
        A folder without a manifest is taken unverified when `accept_foreign` (the stock Trainer's own). `verify`
        overrides `verify_on_load` (e.g. "size" to choose cheaply when the load that follows verifies anyway), and
        `fallback` overrides `fallback_to_verified` (False: exactly `requested`, e.g. the best checkpoint to load)."""
        mode = self.args.verify_on_load if verify is None else verify

        def attempt(candidate: ResumeCandidate) -> str:
            if candidate.info is None:
                if not accept_foreign:
                    raise_not_committed(candidate)
                logger.info("%s has no manifest (not written by ckpt_callbacks); resuming from it unverified.",
                            candidate.path)
                return candidate.path
            if read_ahead is not None:
                read_ahead(candidate.path)
            for problem in self._problems(candidate.info, candidate.path, mode):
                raise problem
            return candidate.path

        return self.manager.catalog.resume(requested, attempt,
                                           fallback=self.args.fallback_to_verified if fallback is None else fallback)

    def _problems(self, info: CheckpointInfo, path: str, mode: str) -> list[CheckpointCorruptError]:
        """What is wrong with a checkpoint by `mode`, wherever the run folder is: sizes from the store (an object
        store lists them without a download), checksums on the files (downloaded first from an object store)."""
        store = self.manager.store
        if mode == "none":
            return []
        if store.location(info.name) != path:  # a folder outside this run: a local path
            return list(find_problems(Path(path), info.manifest, mode))
        if mode == "size":
            return list(store.size_problems(info.name, info.manifest))
        return list(find_problems(store.local_dir(info.name), info.manifest, mode))

    def agreed_resume_path(self, requested: str | int | os.PathLike[str], *, accept_foreign: bool = False,
                           read_ahead: Callable[[str], None] | None = None, fallback: bool | None = None,
                           collective: Collective | None = None) -> str:
        """`resume_path` with several processes (every rank calls it): rank 0 reads and checksums the files once
        and broadcasts its verdict, so every rank resumes from the same checkpoint or raises the same error (none
        is left waiting in training). The other ranks start their read-ahead once the choice is known.
        `collective`: the processes that agree, when they are not the manager's (its saves run on one rank)."""
        collective = collective if collective is not None else self.manager.collective
        if collective.world_size == 1:
            return self.resume_path(requested, accept_foreign=accept_foreign, read_ahead=read_ahead, fallback=fallback)
        verdict: tuple[str | None, Exception | None] | None = None
        if collective.rank == 0:
            try:
                verdict = (self.resume_path(requested, accept_foreign=accept_foreign, read_ahead=read_ahead,
                                            fallback=fallback), None)
            except Exception as exc:  # every rank must learn of it, or the others would wait for rank 0 forever
                verdict = (None, exc)
        resolved, error = collective.broadcast_object(verdict)
        if error is not None:
            raise error
        assert resolved is not None
        if collective.rank != 0 and read_ahead is not None:
            read_ahead(resolved)
        return str(resolved)


def fresh_run_folder(output_dir: str) -> str:
    """Where a run that starts from scratch (resuming nothing) writes: `output_dir`, unless it already holds
    `checkpoint-{step}` entries (an earlier run's), then the first `{output_dir}-v{N}` that holds none. So an
    unrelated new run never replaces an earlier run's checkpoint of the same step, and retention and "last" never
    mix the two runs (Lightning's `ModelCheckpoint` keeps both too, as `-v{N}` files)."""
    parent, name = _split_folder(output_dir)
    version = 0
    while True:
        candidate = output_dir.rstrip("/") if version == 0 else _join_folder(parent, layout.run_folder_version(name, version))
        if not any(layout.parse_checkpoint_step(entry) is not None for entry in make_store(candidate).list_names()):
            return candidate
        version += 1


def run_folder_versions(output_dir: str) -> list[str]:
    """`output_dir` and the `{output_dir}-v{N}` folders beside it (`fresh_run_folder`), in version order."""
    parent, name = _split_folder(output_dir)
    versions = sorted(v for entry in make_store(parent).list_names()
                      if (v := layout.parse_run_folder_version(name, entry)) is not None)
    return [output_dir.rstrip("/"), *(_join_folder(parent, layout.run_folder_version(name, v)) for v in versions)]


def _split_folder(folder: str) -> tuple[str, str]:
    if "://" in folder and not folder.startswith("file://"):
        parent, _, name = folder.rstrip("/").rpartition("/")
        return parent, name
    path = Path(folder.removeprefix("file://"))
    return str(path.parent), path.name


def _join_folder(parent: str, name: str) -> str:
    return f"{parent}/{name}" if "://" in parent and not parent.startswith("file://") else str(Path(parent) / name)


def raise_not_committed(candidate: ResumeCandidate) -> None:
    from ckpt_callbacks.errors import CheckpointNotFoundError

    raise CheckpointNotFoundError(f"{candidate.path}: not a committed checkpoint (no {layout.MANIFEST_NAME}).",
                                  path=candidate.path)


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    numeric = {}
    for name, value in metrics.items():
        if hasattr(value, "numel") and hasattr(value, "item"):
            if value.numel() != 1:
                continue
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(float(value)):
            numeric[str(name)] = float(value)
    return numeric
