"""Which checkpoint a stock resume starts from: the one the Trainer would pick, verified first.

`trainer.train(resume_from_checkpoint=...)` loads whatever files it finds: a
truncated optimizer file fails deep inside torch, a missing one is silently
skipped. The callback checks the chosen checkpoint against its manifest before
the stock loader runs, and names the bad file. With `fallback_to_verified`, it
resumes from the newest checkpoint that verifies instead. With several
processes, rank 0 checks and every rank follows its verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers.trainer_utils import get_last_checkpoint

from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.format.manifest import find_problems
from ckpt_callbacks.core.manager import CheckpointManager, read_checkpoint_info
from ckpt_callbacks.errors import CheckpointCorruptError, CheckpointNotFoundError

logger = logging.getLogger("ckpt_callbacks.hf")


def verified_resume_checkpoint(requested: Any, manager: CheckpointManager,
                               read_ahead: Callable[[str], None] | None = None) -> Any:
    """The `resume_from_checkpoint` value to hand the stock Trainer: `requested`, resolved and verified.

    `read_ahead(path)` is called with the checkpoint as soon as it is known (before its verification ends, and
    again with a fallback): it may start reading files in the background, but must not restore anything.

    `True` resolves as the stock Trainer does (`get_last_checkpoint` of the checkpoint folder). A folder
    without a manifest (written by the stock Trainer) is passed through unverified.

    Collective with several processes (every rank calls it, as every rank calls `train`): rank 0 reads and
    checksums the files once, instead of every rank reading all of them, and broadcasts the outcome, so
    every rank resumes from the same checkpoint or raises the same error (none is left waiting in training).
    """
    if requested is None or requested is False:
        return requested  # the same on every rank (all run the same script): nothing to agree on
    collective = manager.collective
    if collective.world_size == 1:
        return _resolve_and_verify(requested, manager, read_ahead)
    verdict: tuple[Any, Exception | None] | None = None
    if collective.rank == 0:
        try:
            verdict = (_resolve_and_verify(requested, manager, read_ahead), None)
        except Exception as exc:  # every rank must learn of it, or the others would wait for rank 0 forever
            verdict = (None, exc)
    resolved, error = collective.broadcast_object(verdict)
    if error is not None:
        raise error
    if collective.rank != 0 and read_ahead is not None and isinstance(resolved, str):
        read_ahead(resolved)
    return resolved


def _resolve_and_verify(requested: Any, manager: CheckpointManager, read_ahead: Callable[[str], None] | None) -> Any:
    root = manager.store.root
    if requested is True and "://" in root:
        return requested  # the stock Trainer resumes from local folders only; let it say so
    path = get_last_checkpoint(root) if requested is True else str(requested)
    if path is None:
        return requested  # the stock Trainer raises its own "No valid checkpoint found" error
    if read_ahead is not None:
        read_ahead(path)  # overlaps the checksums below; restored only after they pass
    problems = checkpoint_problems(path, manager.args.verify_on_load)
    if not problems:
        return path
    if manager.args.fallback_to_verified:
        fallback = _newest_verified_before(path, manager)
        if fallback is not None:
            logger.warning("%s failed verification (%s); resuming from %s instead.", path, problems[0], fallback)
            if read_ahead is not None:
                read_ahead(fallback)
            return fallback
    raise problems[0]


def checkpoint_problems(path: str, verify_on_load: str) -> list[CheckpointCorruptError]:
    """Every bad file of the checkpoint in `path` (empty when intact or when it has no manifest to check)."""
    try:
        info = read_checkpoint_info(Path(path))
    except CheckpointNotFoundError:
        logger.info("%s has no manifest (not written by ckpt_callbacks); resuming from it unverified.", path)
        return []
    except CheckpointCorruptError as exc:
        return [exc]
    return find_problems(Path(path), info.manifest, verify_on_load)


def _newest_verified_before(path: str, manager: CheckpointManager) -> str | None:
    failed_step = layout.parse_checkpoint_step(Path(path).name)
    for info in reversed(manager.list()):
        if failed_step is not None and info.step >= failed_step:
            continue
        if not checkpoint_problems(info.path, manager.args.verify_on_load):
            return info.path
    return None
