"""Names on disk: committed checkpoints, staging folders and trash.

A committed checkpoint is `checkpoint-{step}`, exactly the stock Trainer's name,
so `transformers.trainer_utils.get_last_checkpoint` and stock resume find it.
Work in progress lives under names starting with a dot, which neither the
Trainer's regex `^checkpoint-(\\d+)$`, nor its rotation glob `checkpoint-*`,
nor `ls` by default, ever match.
"""

from __future__ import annotations

import re
import uuid

CHECKPOINT_PREFIX = "checkpoint"
MANIFEST_NAME = "manifest.json"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LOCK_NAME = ".ckpt_callbacks.lock"

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


def parse_checkpoint_step(name: str) -> int | None:
    """The step of a committed checkpoint folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def staging_name(step: int) -> str:
    return staging_name_for(checkpoint_name(step))


def staging_name_for(final_name: str) -> str:
    """A hidden, unique name to build `final_name` under before renaming it into place."""
    return f"{STAGING_PREFIX}{final_name}-{uuid.uuid4().hex[:8]}"


def trash_name(name: str) -> str:
    return f"{TRASH_PREFIX}{name}-{uuid.uuid4().hex[:8]}"


def is_leftover(name: str) -> bool:
    """Staging or trash folders: never a checkpoint, safe to delete when no writer is active."""
    return name.startswith(STAGING_PREFIX) or name.startswith(TRASH_PREFIX)
