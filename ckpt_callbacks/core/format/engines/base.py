"""`CheckpointEngine`: the seam between the core and the bytes.

An engine turns one piece of state into files and back, nothing more. The core
calls `create(tag)` with the (staging) folder of a new checkpoint, `save(state,
relpath)` once per piece ("model", "optimizer", "rng", ...), then `commit(tag)`;
to read, it calls `open(tag)` and `load(relpath)`. Staging, atomic commit,
manifest and checksums, async writing, verification and retention all happen
around the engine in the core, so a user's engine gets them for free.

Subclassing registers an engine under its `name`:

    class NpyEngine(CheckpointEngine):
        name = "npy"
        def save(self, state, relpath): ...
        def load(self, relpath, map_location=None): ...

    CheckpointArguments(engine="npy")
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

__all__ = ["NOT_READ", "CheckpointEngine", "EngineConfig", "get_engine_class", "registered_engines"]

_REGISTRY: dict[str, type[CheckpointEngine]] = {}


@dataclass
class EngineConfig:
    """Typed options of an engine; subclasses declare their own `Config` dataclass."""


class CheckpointEngine(ABC):
    name: ClassVar[str]
    Config: ClassVar[type[EngineConfig]] = EngineConfig
    # Sharded engines (DCP) need every rank to save every piece; others write replicated pieces on rank 0.
    writes_on_every_rank: ClassVar[bool] = False
    # Whether async saving may snapshot the state into plain host tensors first (not for sharded DTensors).
    supports_host_staging: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:  # an abstract intermediate class: nothing to register
            return
        if not isinstance(name, str) or not name:
            raise ValueError(f"{cls.__qualname__}.name must be a non-empty string, got {name!r}.")
        existing = _REGISTRY.get(name)
        if existing is not None and _identity(existing) != _identity(cls):
            raise ValueError(
                f"A CheckpointEngine named {name!r} is already registered ({_identity(existing)}); "
                f"give {cls.__qualname__} another `name`."
            )
        _REGISTRY[name] = cls

    def __init__(self, config: EngineConfig | None = None, *, rank: int = 0, world_size: int = 1) -> None:
        self.config = config if config is not None else self.Config()
        self.rank = rank
        self.world_size = world_size
        self.process_group: Any = None  # set by the core for collective engines
        self._directory: Path | None = None

    @property
    def directory(self) -> Path:
        """The checkpoint folder that `save` and `load` resolve relative paths against."""
        if self._directory is None:
            raise RuntimeError(f"{type(self).__name__}: call create(tag) or open(tag) before save/load.")
        return self._directory

    def create(self, tag: str) -> None:
        """Begin writing a checkpoint into folder `tag` (a staging folder the core will commit)."""
        self._directory = Path(tag)
        self._directory.mkdir(parents=True, exist_ok=True)

    def open(self, tag: str) -> None:
        """Begin reading the checkpoint in folder `tag`."""
        self._directory = Path(tag)

    @abstractmethod
    def save(self, state: Any, relpath: str) -> None:
        """Write one piece of state (a nested structure of tensors and plain values) under `relpath`."""

    @abstractmethod
    def load(self, relpath: str, map_location: Any = None) -> Any:
        """Read back what `save(state, relpath)` wrote."""

    def commit(self, tag: str) -> None:
        """Every `save` of this checkpoint has returned: finish anything pending. The core then seals it."""

    def load_into(self, relpath: str, target: Any, map_location: Any = None) -> Any:
        """Restore `relpath` into the live `target` (in place when it has `load_state_dict`); return the state.

        Engines that need the target's own layout to read (DCP resharding) override this."""
        from ckpt_callbacks.core.state.capture import restore_into

        return restore_into(relpath, target, self.load(relpath, map_location))

    def read_ahead(self, relpath: str, target: Any, map_location: Any = None) -> Any:
        """What `load_into` would restore into `target`, read without touching `target`, or `NOT_READ` when
        this engine reads only as it restores. The core reads ahead while it verifies checksums, then
        restores with `capture.restore_into` once the checkpoint is known to be intact."""
        if type(self).load_into is not CheckpointEngine.load_into:
            return NOT_READ  # an engine with its own load_into may need the target to read
        return self.load(relpath, map_location)

    def has(self, relpath: str) -> bool:
        """Whether the open checkpoint holds `relpath` (used for checkpoints without a manifest)."""
        return bool(self.files_of(relpath)) and all((self.directory / f).is_file() for f in self.files_of(relpath))

    def files_of(self, relpath: str) -> list[str]:
        """The files (relative to the checkpoint folder) that hold piece `relpath`; by default every file of its
        folder whose name, up to the first dot, is the piece's name (`model.safetensors`, `model.json`)."""
        stem = Path(relpath).name
        folder = (self.directory / relpath).parent
        if not folder.is_dir():
            return []
        return sorted((folder / p.name).relative_to(self.directory).as_posix()
                      for p in folder.iterdir() if p.is_file() and p.name.split(".")[0] == stem)

    def describe(self, relpath: str) -> Any:
        """Piece `relpath` for showing, read as cheaply as the format allows: tensors may come back as
        `safetensors_io.TensorSpec`s (shape, dtype, size) or memory-mapped. By default the piece itself."""
        return self.load(relpath, "cpu")


NOT_READ = object()  # `read_ahead`: nothing was read ahead, call `load_into`


def _identity(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_engine_class(name: str) -> type[CheckpointEngine]:
    """The engine registered under `name`; a `ValueError` listing the known names otherwise."""
    _ensure_builtins_registered()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"engine={name!r} is not a registered CheckpointEngine. Known: {', '.join(sorted(_REGISTRY))}. "
            "Define a subclass of ckpt_callbacks.CheckpointEngine with that `name` (importing it registers it)."
        ) from None


def registered_engines() -> list[str]:
    _ensure_builtins_registered()
    return sorted(_REGISTRY)


def _ensure_builtins_registered() -> None:
    # Importing the package registers the built-in engines.
    import ckpt_callbacks.core.format.engines  # noqa: F401
