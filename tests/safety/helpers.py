"""Shared tools of the safety tests: runs written by the public manager, the real `ckpt-callbacks` command,
damage done to files the way a disk, a user or an attacker would, and privilege dropping for read errors.

Only public names of the library are used: `CheckpointManager`, `CheckpointArguments`, the exported errors,
the adapters, the console script and files on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from ckpt_callbacks import CheckpointArguments, CheckpointManager

REPO = Path(__file__).resolve().parents[2]
STEPS = (10, 20, 30)
NOBODY = 65534


# ------------------------------------------------------------------------------------------- the command


@dataclass
class CliResult:
    args: tuple[str, ...]
    code: int | None  # None: killed at the deadline
    out: str
    err: str
    seconds: float

    @property
    def text(self) -> str:
        return self.out + self.err

    def describe(self) -> str:
        return (f"`ckpt-callbacks {' '.join(self.args)}` -> exit {self.code} in {self.seconds:.1f}s\n"
                f"stdout: {self.out[-1500:]}\nstderr: {self.err[-2500:]}")


def cli_command() -> list[str]:
    """The installed console script next to this interpreter (the package layout may change; the script not)."""
    script = Path(sys.executable).with_name("ckpt-callbacks")
    return [str(script)] if script.exists() else [sys.executable, "-m", "ckpt_callbacks.cli"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of child processes: this worktree's package first, no bytecode written."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra or {})
    return env


def start_cli(*args: object, user: int | None = None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, tuple[str, ...]]:
    argv = tuple(map(str, args))
    proc = subprocess.Popen([*_as_user(user), *cli_command(), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env or child_env(), cwd=tempfile.gettempdir())
    return proc, argv


def finish(proc: subprocess.Popen, argv: tuple[str, ...], started: float, deadline: float) -> CliResult:
    try:
        out, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        code: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        code = None
    return CliResult(argv, code, out, err, time.monotonic() - started)


def run_cli(*args: object, timeout: float = 120, user: int | None = None) -> CliResult:
    started = time.monotonic()
    proc, argv = start_cli(*args, user=user)
    return finish(proc, argv, started, started + timeout)


def run_cli_many(commands: Sequence[Sequence[object]], *, timeout: float = 120, parallel: int = 3,
                 user: int | None = None) -> list[CliResult]:
    """Run several commands, `parallel` at a time (the machine has few cores; startup is mostly imports)."""
    results: list[CliResult | None] = [None] * len(commands)
    pending = list(enumerate(commands))
    running: list[tuple[int, subprocess.Popen, tuple[str, ...], float]] = []
    while pending or running:
        while pending and len(running) < parallel:
            index, command = pending.pop(0)
            proc, argv = start_cli(*command, user=user)
            running.append((index, proc, argv, time.monotonic()))
        index, proc, argv, started = running.pop(0)
        results[index] = finish(proc, argv, started, started + timeout)
    return [r for r in results if r is not None]


def assert_no_traceback(result: CliResult) -> None:
    assert "Traceback" not in result.text, "the command printed a Python traceback:\n" + result.describe()


def run_python(code: str, *args: object, timeout: float = 180, user: int | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -c code args...` in a child process (this worktree's package), killed after `timeout`."""
    return subprocess.run([*_as_user(user), sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env or child_env(), cwd=tempfile.gettempdir())


# --------------------------------------------------------------------------------------------- runs


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def write_run(folder: Path, steps: Sequence[int] = STEPS, *, engine: str = "safetensors",
              losses: Sequence[float] | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Checkpoints at `steps` written by the public manager; returns the model weights saved at each step."""
    model = tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    saved: dict[int, dict[str, torch.Tensor]] = {}
    args = CheckpointArguments(output_dir=str(folder), engine=engine, async_save=False)
    with CheckpointManager(args) as manager:
        for index, step in enumerate(steps):
            model(torch.randn(4, 6)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = {"eval_loss": losses[index]} if losses else None
            manager.save(step, {"model": model, "optimizer": optimizer}, metrics=metrics)
            saved[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return saved


def checkpoint_dirs(folder: Path) -> list[str]:
    return sorted((p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")),
                  key=lambda name: int(name.split("-")[1]) if name.split("-")[1].isdigit() else -1)


def manifest_files(checkpoint: Path) -> list[str]:
    return [entry["path"] for entry in json.loads((checkpoint / "manifest.json").read_text())["files"]]


# --------------------------------------------------------------------------------------------- damage


def xxh3_128_of(path: Path) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def reseal(checkpoint: Path, relpath: str) -> None:
    """Record `relpath`'s new size and xxh3_128 checksum in the manifest, so only its content is the problem."""
    manifest_path = checkpoint / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    target = checkpoint / relpath
    for entry in manifest["files"]:
        if entry["path"] == relpath:
            entry["size"], entry["checksum"] = target.stat().st_size, xxh3_128_of(target)
            break
    else:
        raise AssertionError(f"{relpath} is not in {manifest_path}")
    manifest_path.write_text(json.dumps(manifest, indent=2))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def tensor_data_offset(path: Path) -> int:
    """An offset inside tensor bytes: the end of a safetensors file, the middle of a torch zip's largest record."""
    if path.suffix == ".safetensors":
        return path.stat().st_size - 1
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(record.header_offset)
        header = f.read(30)
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return record.header_offset + 30 + name_length + extra_length + record.file_size // 2


def truncate_by_one(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 1)


def tree_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (or the file itself) with the sha256 of its bytes: to prove nothing changed."""
    if folder.is_file():
        return {folder.name: hashlib.sha256(folder.read_bytes()).hexdigest()}
    digest = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        digest[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "<dir>"
    return digest


# ------------------------------------------------------------------------------------ undeletable files


@contextmanager
def undeletable(folder: Path) -> Iterator[Path]:
    """A subfolder of `folder` holding a file that cannot be deleted until the block ends (wherever a rename
    moved it within `folder`'s parent).

    As root, `chmod` does not stop a delete, so the file is made immutable (`chattr +i`); otherwise the
    subfolder is made read-only (0o500). Skips the test when neither works here."""
    import pytest

    locked = folder / "locked"
    locked.mkdir()
    blocker = locked / "held.bin"
    blocker.write_bytes(b"held")
    try:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None:
                pytest.skip("running as root (chmod does not stop deletes) and chattr is not installed")
            proc = subprocess.run(["chattr", "+i", str(blocker)], capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"running as root and chattr +i is not supported here: {proc.stderr.strip()}")
        else:
            locked.chmod(0o500)
        try:
            blocker.unlink()
        except OSError:
            pass
        else:
            pytest.skip("could not make a file undeletable here (neither chattr +i nor a read-only folder holds)")
        yield locked
    finally:
        release_all(folder.parent)


def release_all(folder: Path) -> None:
    """Undo `undeletable` anywhere under `folder` (its files may have moved with a rename)."""
    for path in folder.rglob("held.bin"):
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.parent.chmod(0o700)


# ----------------------------------------------------------------------------------- unreadable files


def _as_user(user: int | None) -> list[str]:
    """A command prefix that runs the child as `user` (root only). `setpriv`, because subprocess's own `user=`
    cannot exec this interpreter here (EACCES on the way through /root, which setpriv's exec passes)."""
    if user is None or os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        import pytest

        pytest.skip("running as root, where chmod 000 does not stop reads, and setpriv is not installed")
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


@contextmanager
def shared_scratch() -> Iterator[Path]:
    """A scratch folder that an unprivileged child (uid 65534 when the tests run as root) can use.

    pytest's `tmp_path` lives under a root-only folder, so children that drop privileges cannot reach it."""
    folder = Path(tempfile.mkdtemp(prefix="ckpt-safety-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            try:
                path.chmod(0o700 if path.is_dir() else 0o600)
            except OSError:
                pass
        shutil.rmtree(folder, ignore_errors=True)


def reader_uid() -> int | None:
    """The uid children run as so that `chmod 000` stops them: nobody when the tests run as root."""
    return NOBODY if os.geteuid() == 0 else None


def hand_over(folder: Path) -> None:
    """Give `folder` to the unprivileged reader (root only), so that its own permission bits apply to it."""
    if os.geteuid() != 0:
        return
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, NOBODY, NOBODY, follow_symlinks=False)


def make_unreadable(path: Path) -> None:
    path.chmod(0o000)
