"""`CheckpointManager`: the checkpoints of one run, saved, listed, loaded and pruned through one object.

A facade over the steps of a save and a load, each in its own module:

    save: policy (when) -> transaction (what, captured) -> saver (staging, background writer)
          -> commit (write, seal, publish) -> retention (which survive)
    read: catalog (which exist, which count, which a resume takes) -> verify -> load (restore in place)

It knows no training framework; adapters (through `core/run.py`) and plain
loops call it the same way. Constructing it does no I/O: the run folder is
read when first asked, and locked and cleaned at the first save.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ckpt_callbacks.config import CheckpointArguments
from ckpt_callbacks.core.best import BestTracker, MetricRule, metric_rule_for
from ckpt_callbacks.core.distributed.collective import Collective, default_collective
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines import CheckpointEngine, EngineConfig, get_engine_class
from ckpt_callbacks.core.format.provenance import git_commit, library_versions
from ckpt_callbacks.core.preemption import PreemptionFlag
from ckpt_callbacks.core.read.catalog import LAST, Catalog, CheckpointInfo, ResumeCandidate
from ckpt_callbacks.core.read.load import restore_checkpoint
from ckpt_callbacks.core.save.commit import CommitRequest, CommitResult, Provenance, commit_checkpoint
from ckpt_callbacks.core.save.policy import SavePolicy
from ckpt_callbacks.core.save.retention import RetentionCandidate, RetentionPolicy
from ckpt_callbacks.core.save.saver import Saver, SaveStats, copy_now_addresses
from ckpt_callbacks.core.save.transaction import Transaction, piece_path
from ckpt_callbacks.core.state.capture import RNG_STATE, Stateful, capture
from ckpt_callbacks.core.state.rng import capture_rng_state, restore_rng_state
from ckpt_callbacks.core.state.stateful_loaders import keep_rng_through_next_iterator, saved_mid_epoch
from ckpt_callbacks.core.storage.store import CheckpointStore, make_store
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError, InvalidOperationError

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointInfo", "CheckpointManager", "SaveStats", "Transaction"]

logger = logging.getLogger("ckpt_callbacks")

# What `save_only_model` leaves out: the state needed only to continue training (RNG is never added then).
TRAINING_ONLY_PIECES = frozenset({"optimizer", "scheduler", "scaler", "lr_scheduler", "grad_scaler"})


class CheckpointManager:
    """Checkpoints of one run in `args.output_dir` (or `store`)."""

    def __init__(
        self,
        args: CheckpointArguments | None = None,
        *,
        engine: str | type[CheckpointEngine] | None = None,
        store: CheckpointStore | None = None,
        default_engine: str = "safetensors",
        collective: Collective | None = None,
        recognize_foreign: Callable[[Path], bool] | None = None,
        engine_config: EngineConfig | None = None,
    ) -> None:
        self.args = args if args is not None else CheckpointArguments()
        if store is None:
            if self.args.output_dir is None:
                raise ValueError("CheckpointManager needs output_dir: set CheckpointArguments(output_dir='runs/my-run').")
            store = make_store(self.args.output_dir)
        self.store = store
        self.engine_class = _engine_class(engine or self.args.engine or default_engine)
        # The engine's typed options (its `Config` dataclass), for every engine instance of this run's checkpoints.
        self.engine_config = engine_config
        self.collective = collective if collective is not None else default_collective()
        self.metric_rule: MetricRule = metric_rule_for(self.args)
        # `recognize_foreign(path)`: a `checkpoint-{step}` folder without a manifest that is the framework's own
        # (listed as foreign, counted by retention, resumable unverified), e.g. one the stock Trainer wrote.
        self.catalog = Catalog(store, self.metric_rule, recognize_foreign)
        self._best_tracker = BestTracker(self.metric_rule)
        self.policy = SavePolicy(self.args, self._best_tracker)
        self.preemption = PreemptionFlag()
        self.retention = RetentionPolicy(self.args.save_total_limit, self.args.save_best_limit, self.metric_rule)
        self.resumed_from_step: int | None = None
        # Steps retention never deletes, beyond the newest and the best by manifest (e.g. the framework's own best).
        self.protected_steps: set[int] = set()
        # Whether retention keeps the checkpoint this run resumed from (off where a framework's own rotation rule,
        # which counts it like any other, applies: the HF Trainer's `save_total_limit`).
        self.protect_resumed_from = True
        self._saver = Saver(async_save=self.args.async_save and self.engine_class.supports_host_staging,
                            max_in_flight=self.args.max_in_flight, on_save_error=self.args.on_save_error)
        self._background_saver: Saver | None = None  # `save_written(background=True)`, made when first used
        self._last_saver = self._saver
        self._open_transaction: Transaction | None = None
        self._prepared_for_writing = False
        self._best_known = False
        self._provenance: Provenance | None = None
        self._provenance_lock = threading.Lock()
        self._provenance_started = False
        self._start_time = time.time()

    # ----------------------------------------------------------------- when to save (plain loops)

    def should_save_step(self, step: int, *, max_steps: int | None = None) -> bool:
        """Whether `save_strategy`/`save_steps`/`save_time_interval`, or a preemption signal received since
        `handle_signals()`, call for a save after optimizer step `step`."""
        if max_steps is not None:
            self.policy.set_max_steps(max_steps)
        self.expect_saves()
        return self.policy.on_step_end(step) or self.preempted

    def should_save_epoch(self) -> bool:
        self.expect_saves()
        return self.policy.on_epoch_end()

    def should_save_evaluation(self, metrics: Mapping[str, float], step: int) -> bool:
        """Record an evaluation for best tracking; True when `save_strategy="best"` and it is a new best."""
        self.know_best()
        return self.policy.on_evaluate(metrics, step)

    def handle_signals(self) -> PreemptionFlag:
        """For plain loops: from now on SIGTERM/SIGUSR1 only set `preempted` (when `save_on_signal`), so the
        loop saves at the next step boundary and stops. Read the flag once per step, so that a signal landing
        between the save and the stop is handled at the next step instead of stopping without a save::

            stop = manager.preempted
            if stop or manager.should_save_step(step):
                manager.save(step, state)
            if stop:
                break
            ...
            manager.close()                  # the last save is durable
            sys.exit(manager.exit_code)      # 128 + signum after a preemption stop, else 0

        A second signal of the same kind is not caught again: it ends the process as usual."""
        if self.args.save_on_signal:
            self.preemption.install()
        return self.preemption

    @property
    def preempted(self) -> bool:
        return self.preemption.requested

    @property
    def exit_code(self) -> int:
        """0, or 128 + the signal number once a preemption signal was received (143 for SIGTERM)."""
        return self.preemption.exit_code

    # ----------------------------------------------------------------- saving

    def begin(self, step: int, *, epoch: float | None = None, defer_staging: bool = False,
              copy_now: Iterable[torch.Tensor] = ()) -> Transaction:
        """Open the checkpoint of `step`; commit it with `commit()` or by leaving a `with` block cleanly.

        `defer_staging`, `copy_now`: see `save`."""
        if self._open_transaction is not None:
            raise InvalidOperationError(
                f"begin({step}) while the checkpoint of step {self._open_transaction.step} is still open: "
                "commit or abort it first.",
                step=step,
            )
        if step < 0:
            raise ValueError(f"step={step} must be >= 0.")
        started = time.perf_counter()
        if self._background_saver is not None:
            self._background_saver.wait()  # one commit at a time: both writers' collectives use the same group
        self._saver.make_room()
        self._last_saver = self._saver
        self._prepare_for_writing()  # on the caller's thread, so the cleanup cannot race with later work
        tx = Transaction(self, step, epoch)
        tx.started = started
        tx.defer_staging = defer_staging
        tx.copy_now = copy_now_addresses(copy_now)
        self._open_transaction = tx
        return tx

    def save(
        self,
        step: int,
        state: Mapping[str, Any],
        *,
        metrics: Mapping[str, Any] | None = None,
        epoch: float | None = None,
        metadata: Mapping[str, Any] | None = None,
        capture_rng: bool = True,
        defer_staging: bool = False,
        copy_now: Iterable[torch.Tensor] = (),
    ) -> None:
        """Checkpoint `state` at `step` in one call. When it returns, the checkpoint holds the state as it was
        at the call, so the caller may update the live objects right away, async or not.

        `capture_rng=False` leaves out this process's RNG piece, for callers that store RNG themselves.

        `defer_staging=True` (for adapters, which see the optimizer step coming) returns before the tensors
        are copied: the copy runs in the background, and the caller must call `wait_for_staging()` before it
        next modifies any saved tensor in place (before the optimizer step). Tensors under 256 KiB (such as
        BatchNorm statistics, which the next forward pass updates) are still copied before returning, and so
        are the tensors in `copy_now` (pass a model's `buffers()`: the forward pass may update any of them)."""
        with self.begin(step, epoch=epoch, defer_staging=defer_staging, copy_now=copy_now) as tx:
            tx.capture_rng = capture_rng
            tx.save_state(state)
            if metrics:
                tx.save_metrics(metrics)
            if metadata:
                tx.metadata.update(metadata)

    def save_written(
        self,
        step: int,
        write_files: Callable[[Path], None],
        *,
        states: Iterable[str] | Callable[[Path], Iterable[str]],
        epoch: float | None = None,
        metrics: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        background: bool = False,
    ) -> None:
        """Commit a checkpoint whose files a framework writes itself: `write_files(staging_folder)` is called on
        every rank (it may be collective, e.g. a DCP save of a sharded model) and writes into the hidden staging
        folder; then, as for every save, the files are fsynced, sealed in a manifest and published atomically as
        `checkpoint-{step}`, and retention runs. Synchronous by default: the framework writes live state. `states`
        names what was written (`manifest.states`), or is a function naming it from the staging folder once
        `write_files` returned (rank 0's answer is sealed); the manager's engine is recorded as the one that reads
        it back.

        `background=True` (honoured with `async_save`): `write_files` reads only a copy the caller already made
        (e.g. host copies of the shards), so the writing and the commit run on the writer thread, as an async save
        (`wait()` makes it durable). Its collectives run there, on the manager's own group, one save at a time.

        Example:
            >>> manager.save_written(40, lambda folder: trainer.save_checkpoint(folder / "checkpoint.ckpt"),
            ...                      states=["checkpoint.ckpt"], epoch=1.0)
        """
        started = time.perf_counter()  # the wait below is time the caller spends on checkpointing too
        self.wait()  # every earlier save is committed first: checkpoints appear in step order, one commit at a time
        self._prepare_for_writing()
        numeric = {str(k): float(v) for k, v in (metrics or {}).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.best_tracker.observe(numeric, step)
        self.policy.record_save(step)
        named: list[str] = [] if callable(states) else list(states)
        write = _then_named(write_files, states, named) if callable(states) else write_files
        request = CommitRequest(
            step=step, epoch=epoch, pieces={}, metrics=numeric, metadata=dict(metadata or {}),
            engine_class=self.engine_class, engine_config=self.engine_config, store=self.store,
            collective=self.collective, provenance=self._provenance_once(), expected_size=self._expected_size(),
            started=started, write_files=write, states=named)
        job = partial(self._commit_and_retain, request)
        if background and self.args.async_save:
            self._last_saver = self._written_saver()
            self._last_saver.submit(step, job, started=started)
        else:
            self._last_saver = self._saver
            self._saver.run_inline(step, job, started=started)

    def _written_saver(self) -> Saver:
        """The writer of `save_written(background=True)`: async whatever the engine (the caller staged the copy)."""
        if self._background_saver is None:
            self._background_saver = Saver(async_save=True, max_in_flight=1, on_save_error=self.args.on_save_error)
        return self._background_saver

    def prepare_staging(self, state: Mapping[str, Any], *, name: str | None = None) -> None:
        """Allocate, in the background, the host buffers the next async save of `state` will copy into, so the
        first save reuses memory already in place instead of faulting in fresh pages while training waits.
        Training is not held up; the next `save` waits for the allocation. A no-op for synchronous saves."""
        self._saver.prepare({piece_path(key, name): value for key, value in capture(state).items()})

    def wait_for_staging(self) -> None:
        """Block until the host copy of a `save(..., defer_staging=True)` is complete: from then on the live
        tensors may change. Cheap when there is nothing to wait for; raises if the copy failed."""
        self.expect_saves()
        self._saver.wait_for_staging()

    def expect_saves(self) -> None:
        """Training that saves runs from here: reserve, in the background, the host buffers the first async save
        of the state the last `load` restored will copy into (once; nothing otherwise). `should_save_step`,
        `should_save_epoch`, `wait_for_staging` and the adapters' run start call it, so a resumed run's first
        save reuses memory already in place, while a script that only loads reserves nothing. The manifest's
        provenance (package versions, the git commit read from `.git`) is gathered on a thread from here too, so the
        first save does not wait for it."""
        self._saver.start_expected()
        if not self._provenance_started:
            self._provenance_started = True
            threading.Thread(target=self._provenance_once, name="ckpt-provenance", daemon=True).start()

    def wait(self) -> None:
        """Block until every async save is durable; raise if one failed (log it with `on_save_error="warn"`)."""
        self._saver.wait()
        if self._background_saver is not None:
            self._background_saver.wait()

    def close(self) -> None:
        """Flush pending saves and release the output folder."""
        try:
            self._saver.close()
            if self._background_saver is not None:
                self._background_saver.close()
        finally:
            self.preemption.uninstall()
            self.store.release_writer_lock()
            self._prepared_for_writing = False  # a later save takes the lock again

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def is_saving(self) -> bool:
        return self._saver.is_saving or (self._background_saver is not None and self._background_saver.is_saving)

    @property
    def last_save(self) -> SaveStats | None:
        return self._last_saver.last_save

    # The transaction's side (`TransactionOwner`).

    def snapshot_piece(self, transaction: Transaction, relpath: str, value: Any) -> Any | None:
        if self.args.save_only_model and relpath in TRAINING_ONLY_PIECES:
            return None
        return self._saver.snapshot(value, relpath, defer=transaction.defer_staging, copy_now=transaction.copy_now)

    def score_key(self) -> str:
        if self.args.metric_for_best_model is None and self.args.greater_is_better is None:
            raise ValueError(
                "save_score() needs to know whether a higher score is better: set "
                "CheckpointArguments(metric_for_best_model=...) (e.g. 'loss'), or greater_is_better=True/False.")
        return self.metric_rule.key

    def commit_transaction(self, tx: Transaction) -> None:
        try:
            pieces = dict(tx.pieces)
            if tx.capture_rng and not self.args.save_only_model:
                pieces[self._rng_piece()] = capture_rng_state()
            self.best_tracker.observe(tx.metrics, tx.step)
            self.policy.record_save(tx.step)
            request = CommitRequest(
                step=tx.step, epoch=tx.epoch, pieces=pieces, metrics=dict(tx.metrics), metadata=dict(tx.metadata),
                engine_class=self.engine_class, engine_config=self.engine_config, store=self.store,
                collective=self.collective,
                provenance=self._provenance_once(), expected_size=self._expected_size(), started=tx.started)
            self._saver.submit(tx.step, partial(self._commit_and_retain, request), started=tx.started)
        finally:
            self.abort_transaction(tx)

    def abort_transaction(self, tx: Transaction) -> None:
        if self._open_transaction is tx:
            self._open_transaction = None
            self._saver.discard_snapshots()

    def _commit_and_retain(self, request: CommitRequest) -> CommitResult:
        result = commit_checkpoint(request)
        if self.collective.rank == 0:
            self._apply_retention(self.retention)
        return result

    def _provenance_once(self) -> Provenance:
        with self._provenance_lock:  # gathered once, here or on the thread `expect_saves` starts
            if self._provenance is None:
                self._provenance = Provenance(library_versions(), git_commit(), self._start_time)
            return self._provenance

    def _expected_size(self) -> int:
        """Bytes the next checkpoint will likely need: the size of the last one committed."""
        last = self.last_save
        if last is not None and last.bytes_written:
            return last.bytes_written
        latest = self.latest()
        return latest.size if latest is not None else 0

    def _rng_piece(self) -> str:
        return RNG_STATE if self.collective.world_size == 1 else f"{RNG_STATE}_{self.collective.rank}"

    def _prepare_for_writing(self) -> None:
        """Once per manager: take the writer lock and clean what interrupted writers left behind."""
        if self._prepared_for_writing:
            return
        if self.collective.rank == 0:
            self.store.acquire_writer_lock()
            removed = self.store.clean_leftovers()
            if removed:
                logger.warning("Removed %d unfinished checkpoint folder(s) left by an interrupted run: %s",
                               len(removed), ", ".join(removed))
        self._prepared_for_writing = True

    # ----------------------------------------------------------------- listing

    def list(self) -> builtins.list[CheckpointInfo]:
        """Committed checkpoints whose manifest parses and whose files are all present at the right size,
        oldest first. Staging folders, damaged checkpoints and anything without a manifest are never listed."""
        return self.catalog.list()

    def latest(self) -> CheckpointInfo | None:
        return self.catalog.latest()

    def best(self) -> CheckpointInfo | None:
        """The best checkpoint by `metric_for_best_model` (or saved score); ties go to the earlier step."""
        return self.catalog.best()

    @property
    def best_tracker(self) -> BestTracker:
        """The best metric seen by this run, seeded from the checkpoints already in the folder when first asked."""
        self.know_best()
        return self._best_tracker

    def know_best(self) -> None:
        """Seed best tracking from the checkpoints already in the folder (once): a resumed run keeps its best."""
        if self._best_known:
            return
        self._best_known = True
        best = self.catalog.best()
        if best is not None and (value := self.metric_rule.value_in(best.metrics)) is not None:
            self._best_tracker.reset_from([(best.step, value)])

    def delete(self, step: int) -> None:
        """Delete committed checkpoint `step` (after pending saves finished), invisibly to readers."""
        self.wait()
        if any(info.step == step for info in self.list()):
            self.store.delete(layout.checkpoint_name(step))

    # ----------------------------------------------------------------- loading

    def load(
        self,
        checkpoint: CheckpointInfo | str | os.PathLike[str] | int | None,
        state: Mapping[str, Any],
        *,
        name: str | None = None,
        map_location: Any = "cpu",
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Restore each object of `state` in place from `checkpoint` (an info, a path, a step, or None for the
        latest, as `load_last` chooses it). Returns the metadata: step, epoch, metrics, user metadata, and the
        raw loaded states."""
        requested = LAST if checkpoint is None else checkpoint
        fallback = self.args.fallback_to_verified and checkpoint is None
        return self.catalog.resume(requested, partial(self._load_candidate, state=state, name=name,
                                                      map_location=map_location, restore_rng=restore_rng),
                                   fallback=fallback)

    def load_last(self, state: Mapping[str, Any], **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """Restore from the newest committed checkpoint; `CheckpointNotFoundError` when there is none.

        A newest checkpoint that fails verification raises `CheckpointCorruptError` naming the file; with
        `fallback_to_verified`, the newest one that verifies is loaded instead (and the fallback logged)."""
        meta = self.catalog.resume(LAST, partial(self._load_candidate, state=state, **kwargs),
                                   fallback=self.args.fallback_to_verified)
        return meta["step"], meta

    def _load_candidate(self, candidate: ResumeCandidate, *, state: Mapping[str, Any], name: str | None = None,
                        map_location: Any = "cpu", restore_rng: bool = True) -> dict[str, Any]:
        info = candidate.info
        if info is None:
            raise CheckpointNotFoundError(f"{candidate.path}: not a committed checkpoint of this library (no "
                                          "manifest).", path=candidate.path)
        directory = self.store.local_dir(info.name) if self._in_store(info) else Path(info.path)
        engine_class = self.engine_class_for(info.manifest.engine)
        config = self.engine_config if engine_class is self.engine_class else None
        engine = engine_class(config, rank=self.collective.rank, world_size=info.manifest.world_size)
        engine.process_group = getattr(self.collective, "group", None)
        relpaths = {key: piece_path(key, name) for key in state}
        loaded = restore_checkpoint(engine, directory, info.manifest, state, relpaths,
                                    verify=self.args.verify_on_load, map_location=map_location)
        # What the run's next save of these objects holds (its shapes, to reserve staging buffers for).
        self._saver.expect({relpaths[key]: target.state_dict() if isinstance(target, Stateful) else loaded[key]
                            for key, target in state.items()})
        rng_piece = self._rng_piece()
        if restore_rng and rng_piece in info.manifest.states:
            rng_state = engine.load(rng_piece)
            restore_rng_state(rng_state)
            for key, target in state.items():
                if saved_mid_epoch(loaded[key]):  # a StatefulDataLoader: its iterator draws from the restored RNG
                    keep_rng_through_next_iterator(target, rng_state)
        self.resumed_from_step = info.step
        return {"step": info.step, "epoch": info.epoch, "metrics": dict(info.metrics),
                "metadata": dict(info.manifest.user_metadata), "state": loaded}

    def _in_store(self, info: CheckpointInfo) -> bool:
        return info.path == self.store.location(info.name)

    def engine_class_for(self, name: str) -> type[CheckpointEngine]:
        try:
            return get_engine_class(name)
        except ValueError as exc:
            raise CheckpointError(f"The checkpoint was written by engine '{name}': {exc}") from None

    # ----------------------------------------------------------------- retention

    def prune(self, keep_last: int | None = None, keep_best: int | None = None, *,
              dry_run: bool = False) -> builtins.list[int]:
        """Apply a retention policy now (the CLI's `prune`); returns the deleted steps (with `dry_run`, the steps
        it would delete, deleting nothing)."""
        policy = RetentionPolicy(keep_last, keep_best, self.metric_rule)
        return self._retention_plan(policy)[0] if dry_run else self._apply_retention(policy)

    def _retention_plan(self, policy: RetentionPolicy) -> tuple[builtins.list[int], dict[int, str]]:
        """The steps `policy` deletes now, oldest first, and the folder name of every candidate. Committed
        checkpoints and foreign ones the catalog recognizes count; damaged ones are never candidates."""
        listing = self.catalog.scan()
        candidates = [RetentionCandidate(info.step, self.metric_rule.value_in(info.metrics)) for info in listing.committed]
        candidates += [RetentionCandidate(foreign.step, None) for foreign in listing.foreign]
        names = {info.step: info.name for info in listing.committed} | {f.step: f.name for f in listing.foreign}
        protected = set(self.protected_steps)
        if self.resumed_from_step is not None and self.protect_resumed_from:
            protected.add(self.resumed_from_step)
        return policy.steps_to_delete(candidates, protected), names

    def _apply_retention(self, policy: RetentionPolicy) -> builtins.list[int]:
        doomed, names = self._retention_plan(policy)
        deleted = []
        for step in doomed:
            try:
                self.store.delete(names[step])
            except OSError as exc:
                # The new checkpoint is committed; an old one that cannot be deleted costs disk space, not safety.
                logger.error("Could not delete %s for save_total_limit/save_best_limit: %s", names[step], exc)
                continue
            deleted.append(step)
        return deleted


def _then_named(write_files: Callable[[Path], None], name_states: Callable[[Path], Iterable[str]],
                named: list[str]) -> Callable[[Path], None]:
    """`write_files`, then the states it wrote named into `named` (which the commit reads when it seals, after)."""
    def write_and_name(folder: Path) -> None:
        write_files(folder)
        named.extend(name_states(folder))

    return write_and_name


def _engine_class(engine: str | type[CheckpointEngine]) -> type[CheckpointEngine]:
    return engine if isinstance(engine, type) else get_engine_class(engine)
