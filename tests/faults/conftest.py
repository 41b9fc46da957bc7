"""Fixtures that inject real faults: size-limited and read-only tmpfs mounts (root only), and real training
processes of every front end to signal and kill (`training_processes`)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.training_processes import TrainingProcesses


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[str, str], Path]]:
    """Mount a tmpfs of a given size (e.g. "2m") and options; unmounted after the test."""
    mounted: list[Path] = []

    def mount(size: str, options: str = "") -> Path:
        target = tmp_path / f"disk{len(mounted)}"
        target.mkdir()
        opts = f"size={size}" + (f",{options}" if options else "")
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def remount_read_only(target: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)


@pytest.fixture(scope="session")
def training_processes() -> Iterator[TrainingProcesses]:
    """One fork server for the session: transformers and Lightning are imported once, not per process."""
    processes = TrainingProcesses()
    yield processes
    processes.close()


class KillDelays:
    """Random waits before each SIGKILL of a kill harness, stretched while kills land too early.

    On a loaded machine a training process may need longer than the usual window to reach its first write;
    then every kill would land before any write and prove nothing. A kill after which nothing was written
    (no new checkpoint, no leftover) widens the window of the next ones, up to `longest` seconds.
    """

    def __init__(self, seed: object, shortest: float, longest: float, cap: float = 5.0) -> None:
        self.rng = random.Random(str(seed))
        self.shortest, self.longest, self.cap = shortest, longest, cap

    def next(self) -> float:
        return self.rng.uniform(self.shortest, self.longest)

    def after_kill(self, wrote_something: bool) -> None:
        if not wrote_something:
            self.longest = min(self.longest * 1.5, self.cap)
