"""Exit codes, usage errors, progress bars, and `--import` for a user's own engine."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios
from pathlib import Path

import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager

from .conftest import ManagerRuns, cli_command, run_cli

REPO = Path(__file__).resolve().parents[2]


def test_usage_errors_exit_2_and_say_what_to_do(manager_runs: ManagerRuns, tmp_path: Path) -> None:
    assert run_cli().code == 2
    missing = run_cli("verify", tmp_path / "nowhere")
    assert missing.code == 2 and "nowhere: no such file or folder." in missing.err
    run = manager_runs.run("safetensors")
    folder_given = run_cli("inspect", run)
    assert folder_given.code == 2
    assert f"is a run folder with 3 checkpoint(s); pass one of them, e.g. {run / 'checkpoint-30'}" in folder_given.err
    help_text = run_cli("--help")
    assert help_text.code == 0 and "Exit codes: 0 ok, 1 problems found, 2 usage errors." in help_text.out
    assert all(command in help_text.out for command in ("list", "inspect", "verify", "export", "prune", "diff"))


def _with_stderr_on_a_terminal(*args: object) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """Run the command with stderr on a pseudo-terminal; returns the process and what the terminal showed."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.run([*cli_command(), *map(str, args)], stdout=subprocess.PIPE, stderr=terminal, timeout=120)
    os.close(terminal)
    shown = b""
    try:
        while chunk := os.read(controller, 4096):
            shown += chunk
    except OSError:  # the terminal's other end is closed: everything has been read
        pass
    os.close(controller)
    return proc, shown


def test_progress_bars_go_to_stderr_only_on_a_terminal(manager_runs: ManagerRuns) -> None:
    run = manager_runs.run("safetensors")
    piped = run_cli("verify", run)
    assert piped.code == 0 and piped.err == ""
    proc, shown = _with_stderr_on_a_terminal("verify", run)
    assert proc.returncode == 0
    assert b"verify:" in shown and b"%|" in shown
    assert b"verify:" not in proc.stdout


def test_export_progress_comes_from_the_export_itself(manager_runs: ManagerRuns, tmp_path: Path) -> None:
    """The bar advances as `export_safetensors` reports each shard written (no watching of its staging folder)."""
    proc, shown = _with_stderr_on_a_terminal("export", manager_runs.run("safetensors") / "checkpoint-30",
                                             tmp_path / "out", "--max-shard-size", "100")
    assert proc.returncode == 0, shown.decode(errors="replace")
    assert b"export:" in shown and b"100%|" in shown
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1


def test_a_users_own_engine_is_read_after_import(tmp_path: Path) -> None:
    from tests.core.npy_engine import NpyEngine

    model = torch.nn.Linear(3, 2)
    with CheckpointManager(CheckpointArguments(output_dir=str(tmp_path / "run"), engine=NpyEngine.name,
                                               async_save=False)) as manager:
        manager.save(5, {"model": model})
    checkpoint = tmp_path / "run" / "checkpoint-5"
    assert run_cli("verify", checkpoint, cwd=REPO).code == 0  # checksums need no engine
    unknown = run_cli("export", checkpoint, tmp_path / "out", cwd=REPO)
    assert unknown.code == 1
    assert "written by engine 'npy', which is not registered in this process. Pass --import MODULE" in unknown.err
    imported = run_cli("export", checkpoint, tmp_path / "out", "--import", "tests.core.npy_engine", cwd=REPO)
    assert imported.code == 0, imported.err
    bad_module = run_cli("list", tmp_path / "run", "--import", "no_such_module_here")
    assert bad_module.code == 2 and "--import no_such_module_here" in bad_module.err
