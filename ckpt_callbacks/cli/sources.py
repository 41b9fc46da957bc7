"""What the `ckpt-callbacks` command is pointed at: this library's checkpoints through the core, foreign ones here.

This library's checkpoints are read through the core, which owns every rule about them:

- a run folder through `Catalog.scan()` (`core/read/catalog.py`): the same committed checkpoints as
  `CheckpointManager.list()`, the damaged ones with what is wrong, and the leftovers of interrupted writers;
- one checkpoint folder through `read_checkpoint_info`, its pieces through its engine (`load`, `describe`,
  `files_of`), its files checked by `core/read/verify.find_problems`;
- a `.ckpt` file with its manifest embedded (the Lightning plugin's) through `core/format/single_file.py`.

Only the readers of foreign formats live here: stock Trainer folders (`hf-trainer`; `hf-weights` for a
`save_pretrained` or export folder) through the `hf` engine's description methods (`pieces`, `files_of`,
`describe`), and Lightning `.ckpt` files (or any torch file of tensors). Without a manifest they are checked by
structure: every file loads, torch files' zip CRCs match.

Tensors come from safetensors or `torch.load(weights_only=True)`, metadata from JSON, so no code stored in a
file ever runs. Describing is cheap (safetensors headers, memory-mapped torch files).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import stat
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.core.best import MetricRule
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines import CheckpointEngine, get_engine_class
from ckpt_callbacks.core.format.engines.hf_engine import (
    PRETRAINED_PIECE,
    HFEngine,
    is_stock_trainer_checkpoint,
)
from ckpt_callbacks.core.format.engines.torch_engine import load_lazily
from ckpt_callbacks.core.format.manifest import Manifest
from ckpt_callbacks.core.format.single_file import read_embedded_manifest, verify_file
from ckpt_callbacks.core.read.catalog import Catalog, CheckpointInfo, Listing, read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.core.storage.store import LocalStore
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError

__all__ = [
    "KIND_HF_TRAINER", "KIND_HF_WEIGHTS", "KIND_LIGHTNING", "KIND_MANIFEST", "KIND_TORCH_FILE", "Checkpoint",
    "Damaged", "FileProblem", "HFFolderCheckpoint", "Leftover", "ManifestCheckpoint", "RunFolder",
    "TorchFileCheckpoint", "VerifyReport", "as_state_dict", "by_step", "cannot_read", "check_readable", "file_label",
    "folder_names", "is_checkpoint", "open_checkpoint", "problem_from", "scan_run_folder",
]

KIND_MANIFEST = "ckpt_callbacks"
KIND_HF_TRAINER = "hf-trainer"
KIND_HF_WEIGHTS = "hf-weights"
KIND_LIGHTNING = "lightning"
KIND_TORCH_FILE = "torch-file"

TORCH_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
RUN_FILE_SUFFIX = ".ckpt"  # single-file checkpoints listed in a run folder (Lightning's ModelCheckpoint)
_HF_MARKING_PIECES = ("model", "adapter", "trainer_state")  # pieces that make a folder a Hugging Face checkpoint

# What a leftover of an interrupted writer is, and who removes it (the rules of `LocalStore.clean_leftovers`,
# which runs at the first save of every run in the folder, and of `layout.is_stale_leftover` for single files).
STAGING_NOTE = "an interrupted save, never visible as a checkpoint; removed by the next save in this folder"
STAGING_FILE_NOTE = ("an interrupted single-file save (its process is gone), never visible as a checkpoint; removed "
                     "by the next save in this folder")
LIVE_STAGING_FILE_NOTE = ("a single-file save of a process that is still running (or of another host), not a "
                          "checkpoint yet; left to its writer")
TRASH_NOTE = "a deleted checkpoint whose files could not all be removed; the next run retries"
NO_MANIFEST_NOTE = (f"no {layout.MANIFEST_NAME} and not a stock Trainer checkpoint: a save or upload that never "
                    "completed, or a folder another tool wrote; never listed, resumed from or deleted")

Progress = Callable[[int], object]


@dataclass
class FileProblem:
    file: str  # relative to the checkpoint's parent: "checkpoint-20/model.safetensors"
    reason: str
    message: str


@dataclass
class VerifyReport:
    """What `verify` found in one checkpoint (or one leftover)."""

    name: str
    path: str
    format: str  # "ckpt_callbacks/safetensors", "hf-trainer", "lightning", ... ("staging", "trash", "unknown")
    status: str  # "ok", "failed", "uncommitted" (a leftover of a save) or "leftover" (of a delete)
    check: str  # "checksum", "size", "structure" or "none"
    files_checked: int = 0
    bytes_checked: int = 0
    problems: list[FileProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Checkpoint(ABC):
    """One checkpoint of any kind: its metadata, its named states, and checks."""

    kind: str
    engine: str | None = None
    manifest: Manifest | None = None

    def __init__(self, path: Path) -> None:
        self.path = path
        self.step: int | None = None
        self.epoch: float | None = None
        self.metrics: dict[str, float] = {}

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def format(self) -> str:
        return f"{self.kind}/{self.engine}" if self.engine else self.kind

    @property
    @abstractmethod
    def size(self) -> int:
        """Bytes on disk."""

    @abstractmethod
    def states(self) -> list[str]:
        """Names of the pieces of state it holds ("model", "optimizer", "rng", ...)."""

    @abstractmethod
    def load(self, state: str) -> Any:
        """A piece of state with real tensors."""

    @abstractmethod
    def verify(self, mode: str, progress: Progress, pieces: Collection[str] | None = None) -> VerifyReport:
        """Check it (`mode` "checksum" or "size" where a manifest allows); `progress(bytes)` as it goes.

        `pieces`: check only the files of these pieces and the files `pretrained_files` names (what an export
        reads); by default everything."""

    def describe(self, state: str) -> Any:
        """A piece of state, cheaply: tensors may come back as `TensorSpec`s."""
        return self.load(state)

    def pretrained_files(self) -> list[Path]:
        """Files `from_pretrained` needs beside the weights (config, tokenizer, ...), as the `hf` engine knows them:
        an export copies them."""
        if not self.path.is_dir():
            return []
        engine = HFEngine()
        engine.open(str(self.path))
        return [self.path / name for name in engine.files_of(PRETRAINED_PIECE)]

    def weights_state(self) -> str:
        """The piece holding the model weights: "model", or the only piece besides RNG state."""
        states = self.states()
        if "model" in states:
            return "model"
        others = [s for s in states if not s.startswith("rng")]
        if len(others) == 1:
            return others[0]
        raise CheckpointError(
            f"{self.name}: no 'model' state, and several others ({', '.join(states)}). "
            "Pass --state NAME to choose the one that holds the weights.",
            path=str(self.path),
        )

    def weights(self, state: str | None = None) -> dict[str, torch.Tensor]:
        """The model weights as a flat name -> tensor dict (a Lightning checkpoint's `state_dict`)."""
        piece = state or self.weights_state()
        if piece not in self.states():
            raise CheckpointError(
                f"{self.name} holds no '{piece}' state (it holds: {', '.join(self.states()) or 'nothing'}).",
                path=str(self.path),
            )
        return as_state_dict(self.load(piece), where=f"{self.name}/{piece}")

    def _report(self, status: str, check: str) -> VerifyReport:
        return VerifyReport(name=self.name, path=str(self.path), format=self.format, status=status, check=check)


class ManifestCheckpoint(Checkpoint):
    """A checkpoint committed by this library, as the core's catalog describes it."""

    kind = KIND_MANIFEST

    def __init__(self, info: CheckpointInfo) -> None:
        super().__init__(Path(info.path))
        self.info = info
        self.manifest = info.manifest
        self.engine = info.engine
        self.step, self.epoch, self.metrics = info.step, info.epoch, dict(info.metrics)

    @classmethod
    def at(cls, path: Path) -> ManifestCheckpoint:
        """The committed checkpoint in folder `path`; a damaged manifest raises what is wrong with it."""
        return cls(read_checkpoint_info(path))

    @property
    def size(self) -> int:
        return self.info.size

    def states(self) -> list[str]:
        return list(self.info.manifest.states)

    def load(self, state: str) -> Any:
        engine = self._open_engine()
        check_readable(self.path, engine.files_of(state))
        return engine.load(state, "cpu")

    def describe(self, state: str) -> Any:
        engine = self._open_engine()
        check_readable(self.path, engine.files_of(state))
        return engine.describe(state)

    def verify(self, mode: str, progress: Progress, pieces: Collection[str] | None = None) -> VerifyReport:
        """Every file the manifest lists (or those of `pieces`), one at a time (for progress); every bad one named."""
        report = self._report("ok", mode)
        manifest = self.info.manifest
        for entry in self._entries(pieces):
            one_file = dataclasses.replace(manifest, files=[entry])
            report.problems += [problem_from(error, self.path) for error in find_problems(self.path, one_file, mode)]
            report.files_checked += 1
            report.bytes_checked += entry.size
            progress(entry.size)
        report.status = "failed" if report.problems else "ok"
        return report

    def _entries(self, pieces: Collection[str] | None) -> list[Any]:
        files = self.info.manifest.files
        if pieces is None:
            return list(files)
        engine = self._open_engine()
        wanted = {name for piece in pieces for name in engine.files_of(piece)}
        wanted |= {path.name for path in self.pretrained_files()}
        chosen = [entry for entry in files if entry.path in wanted]
        return chosen or list(files)  # an engine that cannot say which files a piece has: check them all

    def _open_engine(self) -> CheckpointEngine:
        manifest = self.info.manifest
        try:
            engine_class = get_engine_class(manifest.engine)
        except ValueError:
            raise CheckpointError(
                f"{self.name} was written by engine '{manifest.engine}', which is not registered in this "
                "process. Pass --import MODULE naming the module that defines it.",
                path=str(self.path),
            ) from None
        engine = engine_class(world_size=manifest.world_size)
        engine.open(str(self.path))
        return engine


class HFFolderCheckpoint(Checkpoint):
    """A stock Trainer `checkpoint-N` folder, or a `save_pretrained`/export folder: no manifest."""

    engine = None

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._engine = HFEngine()  # which pieces of the stock layout are present, and their files
        self._engine.open(str(path))
        self.kind = KIND_HF_TRAINER if self._engine.has("trainer_state") else KIND_HF_WEIGHTS
        self.step = layout.parse_checkpoint_step(path.name)
        self._read_trainer_state()

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def states(self) -> list[str]:
        return self._engine.pieces()

    def load(self, state: str) -> Any:
        check_readable(self.path, self._engine.files_of(state))
        return self._engine.load(state, "cpu")

    def describe(self, state: str) -> Any:
        check_readable(self.path, self._engine.files_of(state))
        return self._engine.describe(state)

    def verify(self, mode: str, progress: Progress, pieces: Collection[str] | None = None) -> VerifyReport:
        report = self._report("ok", "structure")
        states = self.states()
        if pieces is None:
            required = ["model", "trainer_state"] if self.kind == KIND_HF_TRAINER else ["model"]
            if "adapter" in states:
                required = [piece if piece != "model" else "adapter" for piece in required]
            report.problems += [self._missing(piece) for piece in required if piece not in states]
            checked = states
        else:
            checked = [piece for piece in states if piece in pieces or piece == PRETRAINED_PIECE]
        for piece in checked:
            files = [self.path / name for name in self._engine.files_of(piece)]
            if piece == "training_args":
                report.notes.append("training_args.bin not loaded: a full pickle of TrainingArguments (nothing reads it to resume)")
            else:
                report.problems += _structure_problems(files, functools.partial(self.load, piece), self.path)
                report.files_checked += len(files)
            size = sum(f.stat().st_size for f in files if f.is_file())
            report.bytes_checked += size
            progress(size)
        report.notes.insert(0, _structure_note(self.kind))
        report.status = "failed" if report.problems else "ok"
        return report

    def _missing(self, piece: str) -> FileProblem:
        names = {piece: self._engine.files_of(piece)}
        if piece == "model":  # the stock layout has three ways to hold the weights
            names[piece] = [layout.HF_MODEL_FILE, layout.HF_MODEL_INDEX_FILE, layout.LEGACY_MODEL_FILE]
        expected = ", ".join(names[piece][:-1]) + " or " + names[piece][-1] if len(names[piece]) > 1 else names[piece][0]
        return FileProblem(f"{self.name}/{expected}", "missing",
                           f"{self.name}: {expected} missing: the save was interrupted or files were deleted. "
                           "Resume from another checkpoint.")

    def _read_trainer_state(self) -> None:
        try:
            trainer_state = self._engine.load("trainer_state")
        except (CheckpointError, OSError, ValueError, RecursionError):
            return  # verify reports an unreadable trainer state; listing shows what the name says
        if not isinstance(trainer_state, dict):
            return
        if isinstance(trainer_state.get("global_step"), int):
            self.step = trainer_state["global_step"]
        if isinstance(trainer_state.get("epoch"), (int, float)):
            self.epoch = float(trainer_state["epoch"])
        for entry in trainer_state.get("log_history") or []:
            if isinstance(entry, dict) and entry.get("step") == self.step:
                self.metrics.update({k: float(v) for k, v in entry.items() if k.startswith("eval_") and _is_number(v)})


class TorchFileCheckpoint(Checkpoint):
    """A Lightning `.ckpt` (a dict with `state_dict`, `optimizer_states`, ...) or a torch file of tensors.

    `CheckpointIOPlugin` writes such files with their manifest inside (an extra record of the zip); when it is
    there, `verify` checks the file's size and checksum against it (`core/format/single_file.verify_file`)."""

    engine = None

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.manifest = read_embedded_manifest(path)
        data = load_lazily(path)
        if isinstance(data, Mapping) and "state_dict" in data:
            self.kind = KIND_LIGHTNING
            self._data: dict[str, Any] = dict(data)
            self.step = _int_or_none(data.get("global_step"))
            self.epoch = None if _int_or_none(data.get("epoch")) is None else float(data["epoch"])
            self.metrics = _lightning_metrics(data)
        else:
            self.kind = KIND_TORCH_FILE
            self._data = {"model": data}
        if self.manifest is not None:
            self.step, self.epoch = self.manifest.step, self.manifest.epoch
            self.metrics.update(self.manifest.metrics)

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def states(self) -> list[str]:
        return list(self._data)

    def load(self, state: str) -> Any:
        return self._data[state]

    def weights_state(self) -> str:
        return "state_dict" if self.kind == KIND_LIGHTNING else "model"

    def pretrained_files(self) -> list[Path]:
        return []

    def verify(self, mode: str, progress: Progress, pieces: Collection[str] | None = None) -> VerifyReport:
        if self.manifest is not None:
            report = self._report("ok", mode)
            try:
                verify_file(self.path, mode)
            except CheckpointCorruptError as exc:
                report.problems.append(problem_from(exc, self.path))
            except OSError as exc:
                report.problems.append(problem_from(exc, self.path, self.path))
            report.files_checked, report.bytes_checked = 1, self.size
            progress(self.size)
            report.status = "failed" if report.problems else "ok"
            return report
        report = self._report("ok", "structure")
        report.problems = _structure_problems([self.path], lambda: self.weights(), self.path)
        report.files_checked, report.bytes_checked = 1, self.size
        progress(self.size)
        report.notes.append(_structure_note(self.kind))
        report.status = "failed" if report.problems else "ok"
        return report


# ------------------------------------------------------------------------------------------ opening


def open_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at `path` (a folder or a torch file); `CheckpointNotFoundError` if it is none.

    A folder with a manifest is this library's, read through the core whatever is wrong with the manifest
    (a damaged one raises what is wrong with it)."""
    if path.is_file():
        if path.suffix in TORCH_FILE_SUFFIXES:
            return TorchFileCheckpoint(path)
        if path.name == layout.MANIFEST_NAME:
            return ManifestCheckpoint.at(path.parent)
    elif path.is_dir():
        if layout.MANIFEST_NAME in folder_names(path):
            return ManifestCheckpoint.at(path)
        if _looks_like_hf_folder(path):
            return HFFolderCheckpoint(path)
    raise CheckpointNotFoundError(
        f"{path}: not a checkpoint (no {layout.MANIFEST_NAME}, no Hugging Face weights, not a torch file such as "
        "Lightning's .ckpt).",
        path=str(path),
    )


def is_checkpoint(path: Path) -> bool:
    """Whether `path` itself is one checkpoint (as opposed to a run folder holding several)."""
    if path.is_file():
        return path.suffix in TORCH_FILE_SUFFIXES or path.name == layout.MANIFEST_NAME
    return path.is_dir() and (layout.MANIFEST_NAME in folder_names(path) or _looks_like_hf_folder(path))


def check_readable(folder: Path, names: list[str]) -> None:
    """Open each existing file of a piece before its reader does: a file that cannot be read is then named with
    the reason (the safetensors reader reports a permission problem as a missing file)."""
    for name in names:
        path = folder / name
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            continue  # the piece's reader says what is missing
        except OSError as exc:
            raise CheckpointCorruptError(f"{path}: {cannot_read(exc)}", path=str(path), reason="unreadable") from None


def folder_names(path: Path) -> list[str]:
    """The entries of folder `path`; a folder that cannot be read is a `CheckpointError` saying so and what to do."""
    try:
        return sorted(os.listdir(path))
    except OSError as exc:
        raise CheckpointError(f"{path}: {cannot_read(exc)}", path=str(path)) from None


@dataclass
class Damaged:
    """An entry of a run folder that looks like a checkpoint but cannot be trusted or read: never listed."""

    name: str
    path: str
    step: int | None
    error: CheckpointError

    @property
    def reason(self) -> str:
        return getattr(self.error, "reason", "") or "unreadable"

    @property
    def status(self) -> str:
        """What `list` calls it: incomplete (files missing or resized), unreadable, or damaged (anything else)."""
        if self.reason in ("missing", "size mismatch"):
            return "incomplete"
        return "unreadable" if self.reason == "unreadable" else "damaged"


@dataclass
class Leftover:
    """What an interrupted writer left in a run folder: never a checkpoint."""

    name: str
    kind: str  # "staging" (of a save), "trash" (of a delete) or "no manifest" (a checkpoint-N folder without one)
    note: str

    @property
    def uncommitted(self) -> bool:
        return self.kind != "trash"


@dataclass
class RunFolder:
    """What a run folder holds, as the core's catalog sees it, plus the single-file checkpoints beside it."""

    path: Path
    listing: Listing
    checkpoints: list[Checkpoint]  # committed ones (the catalog's), stock Trainer folders and .ckpt files, by step
    damaged: list[Damaged]
    leftovers: list[Leftover]

    def marks(self, rule: MetricRule | None) -> tuple[str | None, str | None]:
        """The names of the best and the latest checkpoint.

        Of this library's checkpoints, the best is the catalog's (`CheckpointManager.best()` with the same rule);
        only in a folder without any, the same `MetricRule` ranks the stock Trainer's and Lightning's. The latest
        is the newest listed checkpoint (damaged ones never count), the first a resume would take."""
        stepped = [checkpoint for checkpoint in self.checkpoints if checkpoint.step is not None] or self.checkpoints
        latest = stepped[-1].name if stepped else None
        if rule is None:
            return None, latest
        if self.listing.committed:
            best = Catalog(LocalStore(self.path), rule).best(self.listing.committed)
            return (None if best is None else best.name), latest
        scored = [(index, value) for index, checkpoint in enumerate(self.checkpoints)
                  if (value := rule.value_in(checkpoint.metrics)) is not None]
        ranked = rule.ranked(scored)
        return (self.checkpoints[ranked[0]].name if ranked else None), latest

    @property
    def unreadable(self) -> list[Damaged]:
        return [entry for entry in self.damaged if entry.status == "unreadable"]


def scan_run_folder(folder: Path) -> RunFolder:
    """Every checkpoint directly under `folder`: the catalog's (committed, damaged, stock Trainer folders,
    leftovers) and the `.ckpt` files."""
    store = LocalStore(folder)
    listing = Catalog(store, _NO_RULE, recognize_foreign=_is_stock_trainer_checkpoint).scan()
    run = RunFolder(folder, listing, [], [], [])
    run.checkpoints += [ManifestCheckpoint(info) for info in listing.committed]
    run.damaged += [Damaged(d.name, d.path, d.step, d.error) for d in listing.damaged]
    for foreign in listing.foreign:
        _open_into(run, Path(foreign.path), foreign.step, HFFolderCheckpoint)
    for name in store.list_names():
        path = folder / name
        if name.endswith(RUN_FILE_SUFFIX) and not layout.is_leftover(name) and _is_regular_file(path):
            _open_into(run, path, None, TorchFileCheckpoint)
    run.leftovers += [_leftover(folder, name) for name in listing.leftovers]
    run.leftovers += [Leftover(name, "no manifest", NO_MANIFEST_NOTE) for name in listing.uncommitted]
    run.checkpoints.sort(key=by_step)
    run.damaged.sort(key=lambda d: (d.step is None, d.step or 0, d.name))
    return run


def by_step(checkpoint: Checkpoint) -> tuple[bool, int, str]:
    """Sort key: by step, checkpoints without one last."""
    return checkpoint.step is None, checkpoint.step or 0, checkpoint.name


_NO_RULE = MetricRule("score", True)  # scanning ranks nothing; `RunFolder.marks` ranks with the rule asked for


def _open_into(run: RunFolder, path: Path, step: int | None, kind: Callable[[Path], Checkpoint]) -> None:
    try:
        run.checkpoints.append(kind(path))
    except CheckpointError as exc:
        run.damaged.append(Damaged(path.name, str(path), step, exc))
    except OSError as exc:
        error = CheckpointCorruptError(f"{path}: {cannot_read(exc)}", path=str(path), reason="unreadable")
        run.damaged.append(Damaged(path.name, str(path), step, error))


def _leftover(folder: Path, name: str) -> Leftover:
    if name.startswith(layout.TRASH_PREFIX):
        return Leftover(name, "trash", TRASH_NOTE)
    if _is_regular_file(folder / name):
        return Leftover(name, "staging", STAGING_FILE_NOTE if layout.is_stale_leftover(name) else LIVE_STAGING_FILE_NOTE)
    return Leftover(name, "staging", STAGING_NOTE)


def _is_stock_trainer_checkpoint(folder: Path) -> bool:
    try:
        return is_stock_trainer_checkpoint(folder)
    except OSError:
        return False  # then listed as a folder without a manifest


def _is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _looks_like_hf_folder(path: Path) -> bool:
    engine = HFEngine()
    engine.open(str(path))
    return any(engine.has(piece) for piece in _HF_MARKING_PIECES)


# ------------------------------------------------------------------------------------------ reading


def as_state_dict(value: Any, *, where: str) -> dict[str, torch.Tensor]:
    """`value` as a flat name -> tensor dict; a Lightning checkpoint dict gives its `state_dict`."""
    if isinstance(value, Mapping) and isinstance(value.get("state_dict"), Mapping):
        value = value["state_dict"]
    if not isinstance(value, Mapping) or not value:
        raise CheckpointError(f"{where}: not a dict of tensors. Pass --state NAME to choose the piece with the weights.")
    not_tensors = [str(k) for k, v in value.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{where}: {len(not_tensors)} entries are not tensors (e.g. '{not_tensors[0]}'), so it is not a model "
            "state dict. Pass --state NAME to choose the piece with the weights."
        )
    return {str(k): v for k, v in value.items()}


# ------------------------------------------------------------------------------------- verification


def _structure_problems(files: list[Path], load: Callable[[], Any], root: Path) -> list[FileProblem]:
    """Load a piece in full (and check the CRCs of torch zip files); every failure as a problem."""
    problems = [_crc_problem(path, root) for path in files if _is_zip(path)]
    found = [p for p in problems if p is not None]
    if found:
        return found
    try:
        load()
    except CheckpointError as exc:
        return [problem_from(exc, root)]
    except OSError as exc:
        return [problem_from(exc, root, files[0])]
    except ValueError as exc:
        label = file_label(files[0], root)
        return [FileProblem(label, "unreadable", f"{label}: unreadable ({exc}).")]
    return []


def _crc_problem(path: Path, root: Path) -> FileProblem | None:
    label = file_label(path, root)
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except OSError as exc:
        return problem_from(exc, root, path)
    except zipfile.BadZipFile as exc:
        return FileProblem(label, "unreadable", f"{label}: not a readable torch file ({exc}).")
    if bad_member is None:
        return None
    return FileProblem(label, "checksum mismatch",
                       f"{label}: CRC mismatch in its record {bad_member}: the file is damaged. "
                       "Resume from another checkpoint.")


def _is_zip(path: Path) -> bool:
    try:
        return path.suffix in TORCH_FILE_SUFFIXES and path.is_file() and zipfile.is_zipfile(path)
    except OSError:
        return True  # then opening it reports why it cannot be read


def _structure_note(kind: str) -> str:
    writer = {KIND_HF_TRAINER: "the stock Trainer", KIND_LIGHTNING: "Lightning"}.get(kind, "another tool")
    return (f"structure only: no manifest (written by {writer}), so there are no recorded sizes or checksums to "
            "compare; every file was loaded and torch files' CRCs checked")


def problem_from(error: CheckpointError | OSError, root: Path, file: Path | None = None) -> FileProblem:
    """A failed check of checkpoint `root` as a report line: the file it names (or `file`), why, and the message."""
    if isinstance(error, OSError):
        label = file_label(error.filename or file or root, root)
        return FileProblem(label, "unreadable", f"{label}: {cannot_read(error)}")
    label = file_label(error.path or file or root, root)
    return FileProblem(label, getattr(error, "reason", "") or "unreadable", str(error))


def cannot_read(exc: OSError) -> str:
    """What to tell a user about a file that cannot be read (prefix it with the file's name)."""
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    return f"cannot be read ({cause}). Make it readable (check its permissions and the disk), then retry."


def file_label(path: str | os.PathLike[str], root: Path) -> str:
    """`path` relative to the parent of checkpoint `root`, as messages name files: checkpoint-20/model.safetensors."""
    try:
        return Path(path).resolve().relative_to(root.resolve().parent).as_posix()
    except ValueError:
        return str(path)


def _lightning_metrics(data: Mapping[str, Any]) -> dict[str, float]:
    """The monitored score that Lightning's `ModelCheckpoint` stored in the file, when there is one."""
    metrics = {}
    for state in (data.get("callbacks") or {}).values():
        if isinstance(state, Mapping) and state.get("monitor") and state.get("current_score") is not None:
            metrics[str(state["monitor"])] = float(state["current_score"])
    return metrics


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


