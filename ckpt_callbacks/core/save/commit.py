"""The commit of one checkpoint: write its pieces, seal them with a manifest, publish it. Nothing else.

`commit_checkpoint(request)` runs inline (sync saves) or on the writer thread
(async saves); everything it needs comes in the `CommitRequest`, and what it
did comes back as a `CommitResult`. With several processes it is collective:
rank 0 creates the staging folder and broadcasts it, every rank writes its
pieces (its own RNG file; sharded engines their shard), a barrier, rank 0
seals and publishes, a barrier. A failure anywhere removes the staging folder;
nothing becomes visible.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_callbacks.core.distributed.collective import Collective
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.engines import CheckpointEngine, EngineConfig
from ckpt_callbacks.core.format.manifest import Manifest, describe_files
from ckpt_callbacks.core.state.capture import RNG_STATE
from ckpt_callbacks.core.storage.durable import remove_tree_quietly, write_bytes_durably
from ckpt_callbacks.core.storage.errors import write_error
from ckpt_callbacks.core.storage.store import CheckpointStore
from ckpt_callbacks.core.storage.written_files import WrittenFiles, recording

__all__ = ["CommitRequest", "CommitResult", "Provenance", "commit_checkpoint"]


@dataclass(frozen=True)
class Provenance:
    """Where the checkpoint comes from, as the manifest records it."""

    versions: dict[str, str]
    git_commit: str | None
    start_time: float


@dataclass(frozen=True)
class CommitRequest:
    step: int
    epoch: float | None
    pieces: Mapping[str, Any]  # relpath -> state (host snapshots when async)
    metrics: Mapping[str, float]
    metadata: Mapping[str, Any]
    engine_class: type[CheckpointEngine]
    engine_config: EngineConfig | None
    store: CheckpointStore
    collective: Collective
    provenance: Provenance
    expected_size: int = 0  # bytes the checkpoint will likely take: refused before writing when they do not fit
    started: float = field(default_factory=time.perf_counter)
    # A framework that writes its own files (Lightning's DCP save of a sharded model, the stock Trainer's
    # FSDP/DeepSpeed save) writes them here instead of the engine: `write_files(staging)` runs on every rank, and
    # `states` names what it wrote (the manifest's `states`). The commit around it is the same.
    write_files: Callable[[Path], None] | None = None
    states: Sequence[str] = ()


@dataclass(frozen=True)
class CommitResult:
    step: int
    bytes_written: int
    seconds: float  # from the save call to the checkpoint being durable and visible


def commit_checkpoint(request: CommitRequest) -> CommitResult:
    """Write, seal and publish `request`'s checkpoint as `checkpoint-{step}`; collective with several processes."""
    collective, store = request.collective, request.store
    if collective.rank == 0:
        store.check_free_space(request.expected_size)
    try:
        staging = store.new_staging_dir(request.step) if collective.rank == 0 else None
    except OSError as exc:
        raise write_error(exc, Path(exc.filename or store.root), f"start checkpoint-{request.step}") from exc
    staging = collective.broadcast_object(staging)
    assert staging is not None
    written = WrittenFiles()  # checksums computed while writing
    size = 0
    try:
        _write_pieces(request, Path(staging), written)
        collective.barrier()
        if collective.rank == 0:
            size = _seal(request, Path(staging), written)
            store.publish(Path(staging), layout.checkpoint_name(request.step))
        collective.barrier()
    except BaseException:
        if collective.rank == 0:
            remove_tree_quietly(Path(staging))
        raise
    return CommitResult(request.step, size, time.perf_counter() - request.started)


def _write_pieces(request: CommitRequest, staging: Path, written: WrittenFiles) -> None:
    if request.write_files is not None:
        try:
            request.write_files(staging)
        except OSError as exc:
            raise write_error(exc, Path(exc.filename) if exc.filename else staging,
                              f"write checkpoint-{request.step}") from exc
        return
    collective = request.collective
    engine = request.engine_class(request.engine_config, rank=collective.rank, world_size=collective.world_size)
    engine.process_group = getattr(collective, "group", None)
    try:
        with recording(written):
            engine.create(str(staging))
            for relpath, state in request.pieces.items():
                if collective.rank == 0 or relpath.startswith(RNG_STATE) or engine.writes_on_every_rank:
                    engine.save(state, relpath)
            engine.commit(str(staging))
    except OSError as exc:
        failed = Path(exc.filename) if exc.filename else staging
        raise write_error(exc, failed, f"write checkpoint-{request.step}") from exc


def _seal(request: CommitRequest, staging: Path, written: WrittenFiles) -> int:
    """Write the manifest of everything in `staging`; returns the checkpoint's size."""
    try:
        files = describe_files(staging, exclude={layout.MANIFEST_NAME}, known_checksum=written.checksum_of)
        manifest = Manifest(
            step=request.step,
            engine=request.engine_class.name,
            files=files,
            epoch=request.epoch,
            metrics=dict(request.metrics),
            states=sorted(_all_states(request.pieces, request.collective.world_size) | set(request.states)),
            world_size=request.collective.world_size,
            versions=request.provenance.versions,
            git_commit=request.provenance.git_commit,
            start_time=request.provenance.start_time,
            user_metadata=dict(request.metadata),
        )
        write_bytes_durably(staging / layout.MANIFEST_NAME, manifest.to_json())
    except OSError as exc:
        raise write_error(exc, staging, f"seal checkpoint-{request.step}") from exc
    return manifest.total_size


def _all_states(pieces: Mapping[str, Any], world_size: int) -> set[str]:
    names = set(pieces)
    if world_size > 1 and any(name.startswith(f"{RNG_STATE}_") for name in names):
        names |= {f"{RNG_STATE}_{rank}" for rank in range(world_size)}
    return names
