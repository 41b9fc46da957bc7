"""Issue 16: what a killed write leaves behind is reported truthfully by `list` and removed by the next writer.

The library writes under temporary names and renames into place: a single `.ckpt` file and the small files
written atomically beside it (today `core/single_file.py` and `core/durable.py`, two naming schemes), a
checkpoint folder (`.staging-checkpoint-{step}-{id}`) and an export (a staging folder beside `export_dir`).

The writes here are killed for real, in the middle, whatever names the library uses: the child process runs
under a file-size limit (RLIMIT_FSIZE) with SIGXFSZ at its default action, so the kernel kills it during the
write that crosses the limit, as SIGKILL would (no cleanup code runs). The tests then find every new hidden
entry, whatever its name, and check that `list` names it and that the next writer removes it.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import torch

from ckpt_callbacks import CheckpointArguments, CheckpointManager
from ckpt_callbacks.lightning import CheckpointIOPlugin
from tests.safety.helpers import assert_no_traceback, cli_command, run_cli, run_python, tiny_model, write_run

KILLED = -signal.SIGXFSZ

# argv: limit_bytes, mode, args... Limits are armed after imports and set-up, just before the write.
KILL_AT_FILE_SIZE = """
import resource, runpy, signal, sys
import torch
limit, mode, *rest = sys.argv[1:]

def arm():
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)  # Python ignores it; the kernel's default is to kill

if mode == "plugin":
    from ckpt_callbacks import CheckpointArguments
    from ckpt_callbacks.lightning import CheckpointIOPlugin
    path, values = rest[0], int(rest[1])
    plugin = CheckpointIOPlugin(CheckpointArguments(async_save=False))
    checkpoint = {"state_dict": {"w": torch.full((values,), 3.0)}, "global_step": 7, "epoch": 0}
    arm()
    plugin.save_checkpoint(checkpoint, path)
elif mode == "manager":
    from ckpt_callbacks import CheckpointArguments, CheckpointManager
    manager = CheckpointManager(CheckpointArguments(output_dir=rest[0], async_save=False))
    model = torch.nn.Linear(256, 256)
    arm()
    manager.save(40, {"model": model})
elif mode == "script":
    sys.argv = rest
    arm()
    runpy.run_path(rest[0], run_name="__main__")
print("the write finished under the limit", flush=True)
"""


def kill_during_write(limit: int, mode: str, *args: object) -> None:
    proc = run_python(KILL_AT_FILE_SIZE, limit, mode, *args)
    assert proc.returncode == KILLED, (
        f"the child was not killed in the middle of its write (exit {proc.returncode}):\n"
        f"{proc.stdout[-1000:]}\n{proc.stderr[-2000:]}")


def lightning_dict(value: float, step: int) -> dict:
    return {"state_dict": {"w": torch.full((64,), value)}, "global_step": step, "epoch": 0}


def hidden(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")}


def _lines_naming(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if name in line]


def test_killed_single_file_writes_leave_leftovers_that_list_reports_and_the_next_writer_removes(
        tmp_path: Path) -> None:
    folder = tmp_path / "ckpts"
    target = folder / "last.ckpt"
    plugin = CheckpointIOPlugin(CheckpointArguments(async_save=False))
    plugin.save_checkpoint(lightning_dict(1.0, 5), target)
    before = hidden(folder)
    size = target.stat().st_size

    # Killed while writing the checkpoint file itself (a large tensor crosses the limit), twice. (The manifest of a
    # single-file checkpoint is a record inside the file, so no second file is written that a kill could hit.)
    kill_during_write(size * 4, "plugin", target, size * 8)
    kill_during_write(size * 2, "plugin", target, size * 4)
    left = sorted(hidden(folder) - before)
    assert left, f"the killed saves left nothing behind in {folder} (nothing to check)"

    listed = run_cli("list", folder)
    assert_no_traceback(listed)
    for name in left:
        assert _lines_naming(listed.text, name), f"`list` does not report the leftover {name}:\n{listed.describe()}"

    # The next writer of this folder: a new run's plugin saving the same file.
    CheckpointIOPlugin(CheckpointArguments(async_save=False)).save_checkpoint(lightning_dict(2.0, 9), target)
    remaining = sorted(hidden(folder) - before)
    assert remaining == [], f"leftovers of killed writes survived the next save into {folder}: {remaining}"
    loaded = CheckpointIOPlugin(CheckpointArguments()).load_checkpoint(target)
    assert torch.equal(loaded["state_dict"]["w"], torch.full((64,), 2.0))

    again = run_cli("list", folder)
    assert_no_traceback(again)
    assert not [name for name in left if name in again.text], again.describe()


def test_killed_folder_save_is_reported_as_uncommitted_and_removed_by_the_next_save(tmp_path: Path) -> None:
    run = tmp_path / "run"
    write_run(run, steps=(10, 20))
    before = hidden(run)
    kill_during_write(64 * 1024, "manager", run)  # the 256 KB weight file crosses the limit
    left = sorted(hidden(run) - before)
    assert left, f"the killed save left nothing behind in {run}"

    listed = run_cli("list", run)
    assert_no_traceback(listed)
    for name in left:
        assert _lines_naming(listed.text, name), f"`list` does not report the leftover {name}:\n{listed.describe()}"
    assert "checkpoint-40" not in [line.split()[0] for line in listed.out.splitlines() if line.strip()]

    with CheckpointManager(CheckpointArguments(output_dir=str(run), async_save=False)) as manager:
        manager.save(30, {"model": tiny_model()})
    assert sorted(hidden(run) - before) == [], sorted(hidden(run) - before)


def test_killed_cli_export_leftover_beside_the_export_is_removed_by_the_next_export(tmp_path: Path) -> None:
    """The export is built under a hidden name in `OUT`'s parent folder, then renamed to `OUT`."""
    run = tmp_path / "run"
    with CheckpointManager(CheckpointArguments(output_dir=str(run), async_save=False)) as manager:
        manager.save(30, {"model": torch.nn.Linear(256, 256)})
    models = tmp_path / "models"
    models.mkdir()
    script = cli_command()
    assert len(script) == 1, "needs the ckpt-callbacks console script (a Python file) to run it under the limit"
    kill_during_write(64 * 1024, "script", script[0], "export", run / "checkpoint-30", models / "mine")
    left = sorted(hidden(models))
    assert left, f"the killed export left nothing behind in {models}"

    result = run_cli("export", run / "checkpoint-30", models / "mine")
    assert result.code == 0, result.describe()
    assert (models / "mine" / "model.safetensors").is_file()
    assert sorted(hidden(models)) == [], f"the killed export's leftovers survived the next export: {hidden(models)}"


assert sys.platform.startswith("linux"), "RLIMIT_FSIZE and SIGXFSZ semantics of these tests are Linux's"
