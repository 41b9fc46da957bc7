"""Which checkpoints a run folder holds, which of them count, and which one a resume takes.

The only copy of these rules; the manager, both adapters and the CLI ask here:

- `list()`: committed checkpoints (a manifest that parses, every file present at its recorded size), oldest
  first. A `checkpoint-{step}` folder without a manifest is not listed: an upload that never reached its
  manifest (object stores), or a folder another tool wrote; a folder whose manifest is damaged, or whose files
  are missing or resized, is reported as damaged, never listed and never deleted by retention.
- `latest()`, `best()`: the newest, and the best by the run's `MetricRule` (ties to the earlier step).
- `resume(requested, attempt)`: the checkpoint a resume starts from. `attempt(candidate)` verifies (and may
  load) one candidate and raises `CheckpointCorruptError` when it is bad. A bad newest checkpoint is an error
  naming the file, unless `fallback_to_verified` asked for the newest one that passes, which is logged.
"""

from __future__ import annotations

import builtins
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from ckpt_callbacks.core.best import MetricRule
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.manifest import Manifest, parse_manifest
from ckpt_callbacks.core.storage.store import CheckpointStore
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError

__all__ = [
    "LAST", "BEST", "Catalog", "CheckpointInfo", "DamagedCheckpoint", "ForeignCheckpoint", "Listing",
    "ResumeCandidate", "read_checkpoint_info",
]

logger = logging.getLogger("ckpt_callbacks")

LAST = "last"
BEST = "best"
T = TypeVar("T")


@dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as its manifest describes it."""

    step: int
    path: str
    epoch: float | None
    metrics: dict[str, float]
    engine: str
    save_time: float
    size: int
    manifest: Manifest = field(repr=False, compare=False)

    @property
    def name(self) -> str:
        return layout.checkpoint_name(self.step)

    @classmethod
    def of(cls, manifest: Manifest, location: str) -> CheckpointInfo:
        return cls(step=manifest.step, path=location, epoch=manifest.epoch, metrics=dict(manifest.metrics),
                   engine=manifest.engine, save_time=manifest.save_time, size=manifest.total_size, manifest=manifest)


@dataclass(frozen=True)
class DamagedCheckpoint:
    """A `checkpoint-{step}` folder with a manifest that cannot be trusted: `error` says what is wrong."""

    step: int
    name: str
    path: str
    error: CheckpointError


@dataclass(frozen=True)
class ForeignCheckpoint:
    """A `checkpoint-{step}` folder without a manifest that an adapter recognizes (the stock Trainer wrote it)."""

    step: int
    name: str
    path: str


@dataclass
class Listing:
    """Everything a run folder holds, sorted by step: what `ckpt-callbacks list` shows."""

    committed: list[CheckpointInfo] = field(default_factory=list)
    damaged: list[DamagedCheckpoint] = field(default_factory=list)
    foreign: list[ForeignCheckpoint] = field(default_factory=list)
    uncommitted: list[str] = field(default_factory=list)  # checkpoint-N folders with no manifest, unrecognized
    leftovers: list[str] = field(default_factory=list)  # staging and trash names of interrupted writers


@dataclass(frozen=True)
class ResumeCandidate:
    """A checkpoint a resume may start from: a committed one (`info`), or a foreign one (`info` is None)."""

    step: int
    name: str
    path: str
    info: CheckpointInfo | None


class Catalog:
    """The checkpoints of one run folder (`store`), ranked by `rule`.

    `recognize_foreign(path)` (adapters): whether a `checkpoint-{step}` folder without a manifest is a checkpoint
    of the framework's own (listed as foreign, counted by retention, resumable unverified)."""

    def __init__(self, store: CheckpointStore, rule: MetricRule,
                 recognize_foreign: Callable[[Path], bool] | None = None) -> None:
        self.store = store
        self.rule = rule
        self.recognize_foreign = recognize_foreign
        self._reported: set[tuple[str, str]] = set()  # damaged checkpoints already logged (each once)

    # ------------------------------------------------------------------ listing

    def scan(self) -> Listing:
        listing = Listing()
        for name in self.store.list_names():
            if layout.is_leftover(name):
                listing.leftovers.append(name)
                continue
            step = layout.parse_checkpoint_step(name)
            if step is not None:
                self._classify(name, step, listing)
        listing.committed.sort(key=lambda info: info.step)
        listing.damaged.sort(key=lambda damaged: damaged.step)
        listing.foreign.sort(key=lambda foreign: foreign.step)
        return listing

    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first."""
        return self.scan().committed

    def latest(self) -> CheckpointInfo | None:
        committed = self.list()
        return committed[-1] if committed else None

    def best(self, committed: Sequence[CheckpointInfo] | None = None) -> CheckpointInfo | None:
        """The best checkpoint by the run's metric (or saved score); ties go to the earlier step."""
        infos = {info.step: info for info in (self.list() if committed is None else committed)}
        scored = [(step, value) for step, info in infos.items() if (value := self.rule.value_in(info.metrics)) is not None]
        ranked = self.rule.ranked(scored)
        return infos[ranked[0]] if ranked else None

    def info(self, checkpoint: int | str | os.PathLike[str]) -> CheckpointInfo:
        """The committed checkpoint of a step, or in a folder; damaged ones raise what is wrong with them."""
        if isinstance(checkpoint, int):
            name = layout.checkpoint_name(checkpoint)
            manifest = self._read_manifest(name)
            if manifest is None:
                raise CheckpointNotFoundError(f"No committed checkpoint of step {checkpoint} in {self.store.root}.",
                                              path=self.store.root, step=checkpoint)
            return CheckpointInfo.of(manifest, self._location(name))
        return read_checkpoint_info(Path(checkpoint))

    def _classify(self, name: str, step: int, listing: Listing) -> None:
        location = self._location(name)
        try:
            manifest = self._read_manifest(name)
            if manifest is None:
                if self.recognize_foreign is not None and self.recognize_foreign(Path(location)):
                    listing.foreign.append(ForeignCheckpoint(step, name, location))
                else:
                    listing.uncommitted.append(name)
                return
            if manifest.step != step:
                raise CheckpointCorruptError(
                    f"{name}/{layout.MANIFEST_NAME}: records step {manifest.step}, not {step}: the folder was renamed "
                    "or its manifest copied from another checkpoint.", path=location, step=step,
                    reason="malformed manifest")
            problems = self.store.size_problems(name, manifest)
            if problems:
                raise problems[0]
        except CheckpointError as exc:
            listing.damaged.append(DamagedCheckpoint(step, name, location, exc))
            if (name, str(exc)) not in self._reported:
                self._reported.add((name, str(exc)))
                logger.warning("Not listing %s, which cannot be trusted: %s", name, exc)
            return
        listing.committed.append(CheckpointInfo.of(manifest, location))

    def _read_manifest(self, name: str) -> Manifest | None:
        data = self.store.read_manifest(name)
        if data is None:
            return None
        return parse_manifest(data, source=f"{self._location(name)}/{layout.MANIFEST_NAME}")

    def _location(self, name: str) -> str:
        return self.store.location(name)

    # ------------------------------------------------------------------ resuming

    def resume(self, requested: str | int | os.PathLike[str] | CheckpointInfo, attempt: Callable[[ResumeCandidate], T],
               *, fallback: bool) -> T:
        """`attempt(candidate)` on the checkpoint `requested` names (`LAST`, `BEST`, a step, a folder or an info),
        and with `fallback` on the older ones in turn while it raises `CheckpointCorruptError`.

        The one rule for every resume: a bad checkpoint is an error naming the file, unless `fallback` asked for the
        newest one that passes (logged, with the checkpoint taken). `CheckpointNotFoundError` when there is none.
        """
        candidates, refused = self._candidates(requested, fallback=fallback)
        first_error: CheckpointError | None = None
        for candidate in candidates:
            error = refused.get(candidate.name)
            try:
                if error is not None:
                    raise error
                result = attempt(candidate)
            except CheckpointCorruptError as exc:
                if not fallback:
                    raise
                first_error = first_error or exc
                logger.warning("%s failed verification (%s); trying the checkpoint before it.", candidate.name, exc)
                continue
            if first_error is not None:
                logger.warning("fallback_to_verified: resuming from %s instead.", candidate.path)
            return result
        if first_error is not None:
            raise first_error
        raise CheckpointNotFoundError(
            f"No committed checkpoint in {self.store.root}. Start from scratch, or point output_dir at the run to "
            "resume.", path=self.store.root)

    def _candidates(self, requested: str | int | os.PathLike[str] | CheckpointInfo,
                    *, fallback: bool) -> tuple[builtins.list[ResumeCandidate], dict[str, CheckpointError]]:
        """The checkpoints to try, in order, and the errors of those already known to be damaged."""
        listing = self.scan()
        refused = {damaged.name: damaged.error for damaged in listing.damaged}
        every = sorted(
            [ResumeCandidate(i.step, i.name, i.path, i) for i in listing.committed]
            + [ResumeCandidate(d.step, d.name, d.path, None) for d in listing.damaged]
            + [ResumeCandidate(f.step, f.name, f.path, None) for f in listing.foreign],
            key=lambda c: c.step, reverse=True)
        if requested == LAST:
            return every, refused
        if requested == BEST:
            best = self.best(listing.committed)
            if best is None:
                raise CheckpointNotFoundError(
                    f"No checkpoint in {self.store.root} has a value of {self.rule.key!r} to rank it. Resume from "
                    "'last', or evaluate at the save steps.", path=self.store.root)
            ranked = self.rule.ranked((i.step, v) for i in listing.committed if (v := self.rule.value_in(i.metrics)) is not None)
            by_step = {c.step: c for c in every}
            return [by_step[step] for step in ranked], refused
        named = self._named_candidate(requested, every)
        older = [c for c in every if c.step < named.step] if fallback else []
        return [named, *older], refused

    def _named_candidate(self, requested: str | int | os.PathLike[str] | CheckpointInfo,
                         every: builtins.list[ResumeCandidate]) -> ResumeCandidate:
        if isinstance(requested, CheckpointInfo):
            return ResumeCandidate(requested.step, requested.name, requested.path, requested)
        if isinstance(requested, int):
            for candidate in every:
                if candidate.step == requested:
                    return candidate
            raise CheckpointNotFoundError(f"No checkpoint of step {requested} in {self.store.root}.",
                                          path=self.store.root, step=requested)
        path = Path(requested)
        for candidate in every:
            if _same_folder(candidate.path, path):
                return candidate
        info = read_checkpoint_info(path)  # a folder outside this run: committed, or an error saying why not
        return ResumeCandidate(info.step, path.name, str(path), info)


def read_checkpoint_info(directory: Path) -> CheckpointInfo:
    """The info of the committed checkpoint in folder `directory`; `CheckpointNotFoundError` (a
    `FileNotFoundError`) when it has no manifest, `CheckpointCorruptError` when the manifest is damaged."""
    from ckpt_callbacks.core.format.manifest import read_manifest_file

    if not directory.exists():
        raise CheckpointNotFoundError(f"{directory}: no such checkpoint folder. Check the path, or list the run's "
                                      "checkpoints with `ckpt-callbacks list`.", path=str(directory))
    manifest = read_manifest_file(directory / layout.MANIFEST_NAME)
    return CheckpointInfo.of(manifest, str(directory))


def _same_folder(a: str, b: Path) -> bool:
    if "://" in a:
        return a.rstrip("/") == str(b).rstrip("/")
    return os.path.realpath(a) == os.path.realpath(b)
