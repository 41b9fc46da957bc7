"""Every name this library gives a file or folder on disk, and how to tell them apart.

A committed checkpoint is `checkpoint-{step}`, exactly the stock Trainer's name,
so `transformers.trainer_utils.get_last_checkpoint` and stock resume find it.
Work in progress (a checkpoint folder, a single file, an export) is built under
a hidden staging name in the folder it will be renamed into; names start with
a dot, so neither the Trainer's regex `^checkpoint-(\\d+)$`, nor its rotation
glob `checkpoint-*`, nor `ls` by default, ever match them. A staging name
carries the writer's host and process id, so a later writer can tell a
leftover of a dead process from the work of a live one.

Also here: the stock Trainer's file names (the `hf` engine writes them), the
file inside a Lightning checkpoint folder, and the marker of an export.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
from functools import cache

__all__ = [
    "CHECKPOINT_PREFIX", "EXPORT_MARKER", "HF_CONFIG_FILE", "HF_MODEL_FILE", "HF_MODEL_INDEX_FILE",
    "HF_PEFT_CONFIG_FILE", "HF_PEFT_MODEL_FILE", "HF_PEFT_MODEL_INDEX_FILE", "HF_RNG_FILE_PREFIX",
    "HF_TORCH_FILES", "HF_TRAINER_STATE_FILE", "HF_TRAINING_ARGS_FILE", "LEGACY_MODEL_FILE",
    "LIGHTNING_CHECKPOINT_FILE", "LOCK_NAME", "MANIFEST_NAME", "STAGING_PREFIX", "TRASH_PREFIX", "UPLOAD_MARKER",
    "checkpoint_name", "hf_rng_file", "is_leftover", "is_stale_leftover", "parse_checkpoint_step",
    "parse_run_folder_version", "run_folder_version", "staging_file_name", "staging_name", "staging_name_for", "trash_name",
]

CHECKPOINT_PREFIX = "checkpoint"
MANIFEST_NAME = "manifest.json"
STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
LOCK_NAME = ".ckpt_callbacks.lock"
# In an object store, present while an upload is under way: an interrupted upload of this library still has it.
UPLOAD_MARKER = ".ckpt_callbacks-upload"
# Inside an export folder: proves the folder was written by this library, so a later export may replace it.
EXPORT_MARKER = ".ckpt_callbacks-export.json"
# The file inside `checkpoint-{step}/` that the Lightning adapter writes (stock loaders read it as is).
LIGHTNING_CHECKPOINT_FILE = "checkpoint.ckpt"

# The stock transformers.Trainer layout.
HF_MODEL_FILE = "model.safetensors"
HF_MODEL_INDEX_FILE = "model.safetensors.index.json"
HF_PEFT_MODEL_FILE = "adapter_model.safetensors"
HF_PEFT_MODEL_INDEX_FILE = "adapter_model.safetensors.index.json"
HF_PEFT_CONFIG_FILE = "adapter_config.json"
HF_CONFIG_FILE = "config.json"
HF_TRAINER_STATE_FILE = "trainer_state.json"
HF_TRAINING_ARGS_FILE = "training_args.bin"
HF_TORCH_FILES = {"optimizer": "optimizer.pt", "scheduler": "scheduler.pt", "scaler": "scaler.pt"}
HF_RNG_FILE_PREFIX = "rng_state"
LEGACY_MODEL_FILE = "pytorch_model.bin"

_CHECKPOINT_RE = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)$")
# What this library names work in progress: `.staging-{final name}-{host}-{pid}-{8 hex}` (and `.trash-...`);
# version 0.1 wrote `.staging-checkpoint-{step}-{8 hex}`. A user's `.staging-notes` matches neither.
_LEFTOVER_RE = re.compile(r"^\.(?:staging|trash)-(?P<rest>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")
_OLD_LEFTOVER_RE = re.compile(rf"^\.(?:staging|trash)-{CHECKPOINT_PREFIX}-\d+-[0-9a-f]{{8}}$")


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}-{step}"


def parse_checkpoint_step(name: str) -> int | None:
    """The step of a committed checkpoint folder name, or None for any other name."""
    match = _CHECKPOINT_RE.match(name)
    return int(match.group(1)) if match else None


def hf_rng_file(relpath: str) -> str:
    """The stock RNG file of a piece: 'rng' -> 'rng_state.pth' (one process), 'rng_3' -> 'rng_state_3.pth'."""
    return f"{HF_RNG_FILE_PREFIX}{relpath.removeprefix('rng')}.pth"


def staging_name(step: int) -> str:
    return staging_name_for(checkpoint_name(step))


def staging_name_for(final_name: str) -> str:
    """A hidden, unique name to build `final_name` (a file or a folder) under, before renaming it into place.

    Example:
        >>> staging_name_for("last.ckpt")
        '.staging-last.ckpt-node7-4242-1a2b3c4d'
    """
    return f"{STAGING_PREFIX}{final_name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def staging_file_name() -> str:
    """A hidden, unique name to write a file under before renaming it over its target, in the target's folder.

    It does not contain the target's name: Lightning numbers `hpc_ckpt_{N}.ckpt` files by the digits of every name
    in the folder that contains "ckpt_", so a file in flight (or left by a crash) named after its target would
    poison that numbering.

    Example:
        >>> staging_file_name()
        '.staging-node7-4242-1a2b3c4d'
    """
    return f"{STAGING_PREFIX}{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def run_folder_version(name: str, version: int) -> str:
    """The folder beside run folder `name` that a new run from scratch takes when `name` holds an earlier run's
    checkpoints (`ModelCheckpoint`'s `-v{N}` file names, for folders): 'checkpoints' -> 'checkpoints-v1'."""
    return f"{name}-v{version}"


def parse_run_folder_version(name: str, candidate: str) -> int | None:
    """N when `candidate` is `run_folder_version(name, N)`, else None."""
    match = re.fullmatch(rf"{re.escape(name)}-v(\d+)", candidate)
    return int(match.group(1)) if match else None


def trash_name(name: str) -> str:
    """The hidden name a folder gets just before it is deleted (it vanishes for readers in one rename)."""
    return f"{TRASH_PREFIX}{name}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_leftover(name: str) -> bool:
    """A staging or trash name this library gives: never a checkpoint; safe to delete once no writer uses it.

    Only the exact shapes `staging_name_for` and `trash_name` make (and those of version 0.1) count: a folder a
    user named `.staging-notes` is not ours."""
    return bool(_LEFTOVER_RE.match(name) or _OLD_LEFTOVER_RE.match(name))


def is_stale_leftover(name: str) -> bool:
    """A leftover whose writer is gone: written on this host by a process that no longer runs.

    For folders where no writer lock says who writes (single files beside a stock `ModelCheckpoint`): a leftover
    of another live process, or of another host, is not ours to delete."""
    match = _LEFTOVER_RE.match(name)
    if match is None or not (match.group("rest") == _host() or match.group("rest").endswith(f"-{_host()}")):
        return False
    return not _process_alive(int(match.group("pid")))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


@cache
def _host() -> str:
    # Folder-name safe: a host name may hold dots, never a slash; keep it short and plain.
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname())[:64] or "host"
