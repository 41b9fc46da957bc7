"""Reading every kind of checkpoint the `ckpt-callbacks` command is pointed at.

- `ckpt_callbacks`: a folder with this library's `manifest.json`, any engine;
- `hf-trainer`: a `checkpoint-N` folder of the stock `transformers.Trainer` (no manifest);
- `hf-weights`: a `save_pretrained` or export folder (weights, no trainer state);
- `lightning`: a `.ckpt` file of Lightning's `TorchCheckpointIO` (or any torch file of tensors).

This module only reads. Tensors come from safetensors or `torch.load(weights_only=True)`,
metadata from JSON, so no code stored in a file ever runs. `describe` is cheap (safetensors
headers, memory-mapped torch files): inspecting a large checkpoint does not read its tensors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines import CheckpointEngine, get_engine_class
from ckpt_callbacks.core.format.engines.hf_engine import HFEngine
from ckpt_callbacks.core.format.engines.torch_engine import load_lazily
from ckpt_callbacks.core.format.manifest import Manifest
from ckpt_callbacks.core.format.single_file import read_embedded_manifest, verify_file
from ckpt_callbacks.core.read.catalog import read_checkpoint_info
from ckpt_callbacks.core.read.verify import find_problems
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointError, CheckpointNotFoundError

KIND_MANIFEST = "ckpt_callbacks"
KIND_HF_TRAINER = "hf-trainer"
KIND_HF_WEIGHTS = "hf-weights"
KIND_LIGHTNING = "lightning"
KIND_TORCH_FILE = "torch-file"

TORCH_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, CheckpointError)

Progress = Callable[[int], object]


@dataclass
class FileProblem:
    file: str  # relative to the checkpoint's parent: "checkpoint-20/model.safetensors"
    reason: str
    message: str


@dataclass
class VerifyReport:
    """What `verify` found in one checkpoint (or one uncommitted leftover)."""

    name: str
    path: str
    format: str  # "ckpt_callbacks/safetensors", "hf-trainer", "lightning", ... ("staging", "unknown")
    status: str  # "ok", "failed" or "uncommitted"
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
    def verify(self, mode: str, progress: Progress) -> VerifyReport:
        """Check it (`mode` "checksum" or "size" where a manifest allows); `progress(bytes)` as it goes."""

    def describe(self, state: str) -> Any:
        """A piece of state, cheaply: tensors may come back as `TensorSpec`s."""
        return self.load(state)

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
    """A checkpoint committed by this library: `manifest.json` lists every file with size and checksum."""

    kind = KIND_MANIFEST

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        info = read_checkpoint_info(path)
        self.manifest = info.manifest
        self.engine = info.engine
        self.step, self.epoch, self.metrics = info.step, info.epoch, dict(info.metrics)

    @property
    def size(self) -> int:
        assert self.manifest is not None
        return self.manifest.total_size

    def states(self) -> list[str]:
        assert self.manifest is not None
        return list(self.manifest.states)

    def load(self, state: str) -> Any:
        return self._open_engine().load(state, "cpu")

    def describe(self, state: str) -> Any:
        engine = self._open_engine()
        try:
            return engine.describe(state)
        except _LOAD_ERRORS:
            return engine.load(state, "cpu")  # the engine's own reader raises the precise error

    def verify(self, mode: str, progress: Progress) -> VerifyReport:
        assert self.manifest is not None
        return verify_against_manifest(self._report("ok", mode), self.path, self.manifest, progress)

    def problems_by_size(self) -> list[FileProblem]:
        """Missing or resized files, found without reading them (what `list` shows)."""
        assert self.manifest is not None
        return [_file_problem(error, self.path) for error in find_problems(self.path, self.manifest, "size")]

    def _open_engine(self) -> CheckpointEngine:
        assert self.manifest is not None
        try:
            engine_class = get_engine_class(self.manifest.engine)
        except ValueError:
            raise CheckpointError(
                f"{self.name} was written by engine '{self.manifest.engine}', which is not registered in this "
                "process. Pass --import MODULE naming the module that defines it.",
                path=str(self.path),
            ) from None
        engine = engine_class(world_size=self.manifest.world_size)
        engine.open(str(self.path))
        return engine


class HFFolderCheckpoint(Checkpoint):
    """A stock Trainer `checkpoint-N` folder, or a `save_pretrained`/export folder: no manifest."""

    engine = None

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._engine = HFEngine()  # which pieces of the stock layout are present, and their files
        self._engine.open(str(path))
        self.kind = KIND_HF_TRAINER if (path / layout.HF_TRAINER_STATE_FILE).is_file() else KIND_HF_WEIGHTS
        self.step = layout.parse_checkpoint_step(path.name)
        self._read_trainer_state()

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    def states(self) -> list[str]:
        return self._engine.pieces()

    def load(self, state: str) -> Any:
        return self._engine.load(state, "cpu")

    def describe(self, state: str) -> Any:
        try:
            return self._engine.describe(state)
        except _LOAD_ERRORS:
            return self.load(state)  # the full reader raises the precise error

    def verify(self, mode: str, progress: Progress) -> VerifyReport:
        report = self._report("ok", "structure")
        required = ["model", "trainer_state"] if self.kind == KIND_HF_TRAINER else ["model"]
        states = self.states()
        if "adapter" in states:
            required = [piece if piece != "model" else "adapter" for piece in required]
        report.problems += [self._missing(piece) for piece in required if piece not in states]
        for piece in states:
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
        expected = {"model": f"{layout.HF_MODEL_FILE}, {layout.HF_MODEL_INDEX_FILE} or {layout.LEGACY_MODEL_FILE}",
                    "adapter": layout.HF_PEFT_MODEL_FILE, "trainer_state": layout.HF_TRAINER_STATE_FILE}
        return FileProblem(f"{self.name}/{expected[piece]}", "missing",
                           f"{self.name}: {expected[piece]} missing: the save was interrupted or files were deleted. "
                           "Resume from another checkpoint.")

    def _read_trainer_state(self) -> None:
        try:
            trainer_state = json.loads((self.path / layout.HF_TRAINER_STATE_FILE).read_text())
        except (OSError, ValueError, RecursionError):
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
    there, `verify` checks the file's size and checksum against it."""

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

    def verify(self, mode: str, progress: Progress) -> VerifyReport:
        if self.manifest is not None:
            report = self._report("ok", mode)
            try:
                verify_file(self.path, mode)
            except CheckpointCorruptError as exc:
                report.problems.append(_file_problem(exc, self.path))
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
    """The checkpoint at `path` (a folder or a torch file); `CheckpointNotFoundError` if it is none."""
    if path.is_file():
        if path.suffix in TORCH_FILE_SUFFIXES:
            return TorchFileCheckpoint(path)
        if path.name == layout.MANIFEST_NAME:
            return ManifestCheckpoint(path.parent)
    elif (path / layout.MANIFEST_NAME).is_file():
        return ManifestCheckpoint(path)
    elif _looks_like_hf_folder(path):
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
    return (path / layout.MANIFEST_NAME).is_file() or _looks_like_hf_folder(path)


@dataclass
class RunFolder:
    """What a run folder holds: checkpoints, entries that look like checkpoints but do not open, leftovers."""

    checkpoints: list[Checkpoint]
    unreadable: list[tuple[str, CheckpointError]]
    leftovers: list[str]


def scan_run_folder(folder: Path) -> RunFolder:
    """Every `checkpoint-N` folder, manifest folder and torch file (`.ckpt`) directly under `folder`."""
    run = RunFolder([], [], [])
    for entry in sorted(folder.iterdir()):
        if (entry.is_dir() and layout.is_leftover(entry.name)) or _is_single_file_leftover(entry):
            run.leftovers.append(entry.name)
        elif _is_run_entry(entry):
            try:
                run.checkpoints.append(open_checkpoint(entry))
            except CheckpointError as exc:
                run.unreadable.append((entry.name, exc))
    run.checkpoints.sort(key=lambda c: (c.step is None, c.step or 0, c.name))
    return run


def _is_single_file_leftover(entry: Path) -> bool:
    """`.{name}.tmp-{id}`: a single-file save (`core/single_file.py`) that never reached its rename."""
    return entry.is_file() and entry.name.startswith(".") and ".tmp-" in entry.name


def _is_run_entry(entry: Path) -> bool:
    if entry.is_file():
        return entry.suffix == ".ckpt"
    return layout.parse_checkpoint_step(entry.name) is not None or (entry / layout.MANIFEST_NAME).is_file()


def _looks_like_hf_folder(path: Path) -> bool:
    names = (layout.HF_MODEL_FILE, layout.HF_MODEL_INDEX_FILE, layout.LEGACY_MODEL_FILE, layout.HF_TRAINER_STATE_FILE,
             layout.HF_PEFT_MODEL_FILE)
    return path.is_dir() and any((path / name).is_file() for name in names)


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


def verify_against_manifest(report: VerifyReport, folder: Path, manifest: Manifest, progress: Progress) -> VerifyReport:
    """Check each file the manifest lists (one at a time, for progress); every bad file becomes a problem."""
    for entry in manifest.files:
        one_file = dataclasses.replace(manifest, files=[entry])
        report.problems += [_file_problem(error, folder) for error in find_problems(folder, one_file, report.check)]
        report.files_checked += 1
        report.bytes_checked += entry.size
        progress(entry.size)
    report.status = "failed" if report.problems else "ok"
    return report


def _structure_problems(files: list[Path], load: Callable[[], Any], root: Path) -> list[FileProblem]:
    """Load a piece in full (and check the CRCs of torch zip files); every failure as a problem."""
    problems = [_crc_problem(path, root) for path in files if _is_zip(path)]
    found = [p for p in problems if p is not None]
    if found:
        return found
    try:
        load()
    except CheckpointError as exc:
        return [_file_problem(exc, root)]
    except (OSError, ValueError) as exc:
        return [FileProblem(_label(files[0], root), "unreadable", f"{_label(files[0], root)}: unreadable ({exc}).")]
    return []


def _crc_problem(path: Path, root: Path) -> FileProblem | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
    except (OSError, zipfile.BadZipFile) as exc:
        return FileProblem(_label(path, root), "unreadable", f"{_label(path, root)}: not a readable torch file ({exc}).")
    if bad_member is None:
        return None
    return FileProblem(_label(path, root), "checksum mismatch",
                       f"{_label(path, root)}: CRC mismatch in its record {bad_member}: the file is damaged. "
                       "Resume from another checkpoint.")


def _is_zip(path: Path) -> bool:
    return path.suffix in TORCH_FILE_SUFFIXES and path.is_file() and zipfile.is_zipfile(path)


def _structure_note(kind: str) -> str:
    writer = {KIND_HF_TRAINER: "the stock Trainer", KIND_LIGHTNING: "Lightning"}.get(kind, "another tool")
    return (f"structure only: no manifest (written by {writer}), so there are no recorded sizes or checksums to "
            "compare; every file was loaded and torch files' CRCs checked")


def _file_problem(error: CheckpointError, root: Path) -> FileProblem:
    file = _label(Path(error.path), root) if error.path else root.name
    return FileProblem(file, getattr(error, "reason", "") or "unreadable", str(error))


def _label(path: Path, root: Path) -> str:
    """`path` relative to the checkpoint's parent, as messages name files: checkpoint-20/model.safetensors."""
    try:
        return path.resolve().relative_to(root.resolve().parent).as_posix()
    except ValueError:
        return str(path)


def _weight_map(index: Path) -> dict[str, str]:
    weight_map = json.loads(index.read_text())["weight_map"]
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index}: weight_map is not a mapping")
    return {str(k): str(v) for k, v in weight_map.items()}


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
