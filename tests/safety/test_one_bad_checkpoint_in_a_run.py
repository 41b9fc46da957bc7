"""Issue 16: one bad checkpoint must not break the run folder.

A run holds good checkpoints 10, 20, 30 and, newest by name, a `checkpoint-40` whose `manifest.json` is
hostile: nested 10^5 deep, a folder, or huge (150 MB, 2*10^6 entries). Every manager operation and every
CLI command must name `checkpoint-40` with what is wrong, skip it when listing and in retention, leave it
byte-identical, never print a traceback, and finish in bounded time (a size limit with a named error is fine).

The operations of each kind run as child processes, a few at a time, in one module fixture (startup is
mostly imports on a 2-core machine); each test then checks one operation's outcome.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.safety.helpers import (
    CliResult,
    assert_no_traceback,
    checkpoint_dirs,
    child_env,
    finish,
    start_cli,
    tree_digest,
    write_run,
)

HERE = Path(__file__).resolve().parent
BAD = "checkpoint-40"
KINDS = ("nested_1e5_deep", "manifest_is_a_folder", "huge_150MB")
# What a report must say is wrong, per kind (besides naming checkpoint-40).
REASONS = {
    "nested_1e5_deep": r"(?i)nest|deep|depth|recurs",
    "manifest_is_a_folder": r"(?i)folder|director|not a (regular )?file",
    "huge_150MB": r"(?i)too (large|big)|size limit|limit|exceed|larger than",
}
# Seconds all operations of a kind may take together (six child processes on a 2-core machine, mostly imports).
# The huge manifest is read by nobody when a size limit refuses it, so that kind takes seconds, not minutes.
DEADLINE = {"nested_1e5_deep": 240.0, "manifest_is_a_folder": 240.0, "huge_150MB": 45.0}
CLI_OPS = ("cli_list", "cli_inspect", "cli_verify", "cli_export", "cli_prune")


def huge_manifest(entries: int = 2_000_000) -> bytes:
    entry = (b'{"path": "shard-0000000.safetensors", "size": 1, '
             b'"checksum": "0123456789abcdef0123456789abcdef"}')
    head = (b'{"format": "ckpt_callbacks", "format_version": 1, "step": 40, "engine": "safetensors", '
            b'"states": ["model"], "files": [')
    return head + b",".join([entry] * entries) + b"]}"


def plant(run: Path, kind: str, shared_huge: Path) -> None:
    bad = run / BAD
    bad.mkdir()
    if kind == "nested_1e5_deep":
        (bad / "manifest.json").write_bytes(b"[" * 100_000)
    elif kind == "manifest_is_a_folder":
        (bad / "manifest.json").mkdir()
        (bad / "manifest.json" / "x").write_text("{}")
    else:
        os.link(shared_huge, bad / "manifest.json")  # one 150 MB file, linked into each copy of the run


@dataclass
class Outcome:
    run: Path
    bad_before: dict[str, str]
    manager: list[dict[str, Any]] = field(default_factory=list)
    manager_stderr: str = ""
    manager_finished: bool = True
    cli: dict[str, CliResult] = field(default_factory=dict)
    runs: dict[str, Path] = field(default_factory=dict)


def _run_kind(root: Path, kind: str, shared_huge: Path) -> Outcome:
    template = root / "template"
    write_run(template)
    runs = {}
    for name in ("read", "manager", "prune"):
        runs[name] = root / name
        shutil.copytree(template, runs[name])
        plant(runs[name], kind, shared_huge)
    outcome = Outcome(run=runs["read"], bad_before=_digest(runs["read"] / BAD, kind), runs=runs)
    read = runs["read"]
    commands = {
        "cli_list": ("list", read),
        "cli_inspect": ("inspect", read / BAD),
        "cli_verify": ("verify", read),
        "cli_export": ("export", read / BAD, root / "exported"),
        "cli_prune": ("prune", runs["prune"], "--keep-last", "1"),
    }
    started = time.monotonic()
    deadline = started + DEADLINE[kind]  # for all operations of this kind together
    manager_proc = subprocess.Popen([sys.executable, str(HERE / "manager_ops.py"), str(runs["manager"])],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    pending = list(commands.items())
    running: list[tuple[str, subprocess.Popen, tuple[str, ...], float]] = []
    while pending or running:
        while pending and len(running) < 2 and time.monotonic() < deadline:
            op, command = pending.pop(0)
            proc, argv = start_cli(*command)
            running.append((op, proc, argv, time.monotonic()))
        if not running:  # the deadline passed before these could start
            for op, command in pending:
                outcome.cli[op] = CliResult(tuple(map(str, command)), None, "", "not started: earlier operations "
                                            "used up the deadline", 0.0)
            break
        op, proc, argv, began = running.pop(0)
        outcome.cli[op] = finish(proc, argv, began, deadline)
    try:
        out, err = manager_proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        manager_proc.kill()
        out, err = manager_proc.communicate()
        outcome.manager_finished = False
    outcome.manager = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    outcome.manager_stderr = err[-3000:]
    return outcome


def _digest(path: Path, kind: str) -> dict[str, str]:
    if kind == "huge_150MB":  # hashing 150 MB three times is slow; a hard link's identity and size suffice
        stat = (path / "manifest.json").stat()
        return {"manifest.json": f"{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}"}
    return tree_digest(path)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    return {}


@pytest.fixture
def outcome(request: pytest.FixtureRequest, outcomes: dict[str, Outcome],
            tmp_path_factory: pytest.TempPathFactory) -> Outcome:
    kind = request.node.callspec.params["kind"]
    if kind not in outcomes:
        root = tmp_path_factory.mktemp("run")  # a neutral name: reports are searched for words saying what is wrong
        shared_huge = root / "huge-manifest.json"
        if kind == "huge_150MB":
            shared_huge.write_bytes(huge_manifest())
        outcomes[kind] = _run_kind(root, kind, shared_huge)
    return outcomes[kind]


def _manager_op(outcome: Outcome, op: str) -> dict[str, Any]:
    for line in outcome.manager:
        if line["op"] == op:
            return line
    done = [line["op"] for line in outcome.manager]
    raise AssertionError(
        f"manager operation {op!r} did not finish (killed: {not outcome.manager_finished}; finished: {done}); "
        f"stderr: {outcome.manager_stderr}")


def _says_what_is_wrong(text: str, kind: str) -> None:
    assert BAD in text, f"{BAD} is not named:\n{text[-3000:]}"
    assert re.search(REASONS[kind], text), f"what is wrong with {BAD} ({kind}) is not said:\n{text[-3000:]}"


def _assert_bad_untouched(outcome: Outcome, run: Path, kind: str) -> None:
    assert (run / BAD).exists(), f"{BAD} was deleted"
    assert _digest(run / BAD, kind) == outcome.bad_before, f"{BAD} was changed"


# ------------------------------------------------------------------------------------------- manager


@pytest.mark.parametrize("kind", KINDS)
def test_manager_list_skips_and_names_a_bad_manifest(outcome: Outcome, kind: str) -> None:
    line = _manager_op(outcome, "list")
    assert line["ok"], f"list() raised {line.get('error_type')}: {line.get('error', '')[:500]}"
    assert line["value"] == [10, 20, 30]
    _says_what_is_wrong("\n".join(line["logs"]), kind)


@pytest.mark.parametrize("kind", KINDS)
def test_manager_load_last_refuses_a_newest_bad_manifest_with_a_named_checkpoint_error(outcome: Outcome,
                                                                                       kind: str) -> None:
    line = _manager_op(outcome, "load_last")
    assert not line["ok"], f"load_last() silently loaded step {line.get('value')} past the damaged {BAD}"
    assert line["is_checkpoint_error"], f"load_last() raised {line['error_type']}, not a CheckpointError: {line['error'][:500]}"
    _says_what_is_wrong(line["error"], kind)


@pytest.mark.parametrize("kind", KINDS)
def test_manager_load_last_with_fallback_takes_checkpoint_30_and_says_why(outcome: Outcome, kind: str) -> None:
    line = _manager_op(outcome, "load_last_fallback")
    assert line["ok"], f"load_last(fallback) raised {line.get('error_type')}: {line.get('error', '')[:500]}"
    assert line["value"] == 30
    _says_what_is_wrong("\n".join(line["logs"]), kind)


@pytest.mark.parametrize("kind", KINDS)
def test_manager_save_applies_retention_around_a_bad_checkpoint_and_leaves_it(outcome: Outcome, kind: str) -> None:
    line = _manager_op(outcome, "save_with_retention")
    assert line["ok"], f"a save next to {BAD} raised {line.get('error_type')}: {line.get('error', '')[:500]}"
    run = outcome.runs["manager"]
    _assert_bad_untouched(outcome, run, kind)
    assert checkpoint_dirs(run) == ["checkpoint-30", BAD, "checkpoint-50"], checkpoint_dirs(run)


# ------------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("kind", KINDS)
def test_cli_list_names_the_bad_checkpoint_and_lists_the_good_ones(outcome: Outcome, kind: str) -> None:
    result = outcome.cli["cli_list"]
    assert result.code is not None, f"not finished within {DEADLINE[kind]}s for all operations:\n" + result.describe()
    assert_no_traceback(result)
    assert result.code in (0, 1), result.describe()
    _says_what_is_wrong(result.text, kind)
    assert "checkpoint-30" in result.out, result.describe()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_inspect_of_the_bad_checkpoint_exits_1_with_a_named_error(outcome: Outcome, kind: str) -> None:
    result = outcome.cli["cli_inspect"]
    assert result.code is not None, f"not finished within {DEADLINE[kind]}s for all operations:\n" + result.describe()
    assert_no_traceback(result)
    assert result.code == 1, result.describe()
    _says_what_is_wrong(result.text, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_verify_exits_1_naming_the_bad_checkpoint_and_checks_the_others(outcome: Outcome, kind: str) -> None:
    result = outcome.cli["cli_verify"]
    assert result.code is not None, f"not finished within {DEADLINE[kind]}s for all operations:\n" + result.describe()
    assert_no_traceback(result)
    assert result.code == 1, result.describe()
    _says_what_is_wrong(result.text, kind)
    for good in ("checkpoint-10", "checkpoint-20", "checkpoint-30"):
        assert good in result.out, f"verify did not report {good}:\n" + result.describe()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_export_of_the_bad_checkpoint_exits_non_zero_and_writes_nothing(outcome: Outcome, kind: str) -> None:
    result = outcome.cli["cli_export"]
    assert result.code is not None, f"not finished within {DEADLINE[kind]}s for all operations:\n" + result.describe()
    assert_no_traceback(result)
    assert result.code == 1, result.describe()
    _says_what_is_wrong(result.text, kind)
    assert not (outcome.run.parent / "exported").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_prune_applies_the_policy_to_the_good_ones_and_leaves_the_bad_one(outcome: Outcome, kind: str) -> None:
    result = outcome.cli["cli_prune"]
    assert result.code is not None, f"not finished within {DEADLINE[kind]}s for all operations:\n" + result.describe()
    assert_no_traceback(result)
    assert result.code == 0, result.describe()
    assert BAD in result.text, result.describe()
    run = outcome.runs["prune"]
    _assert_bad_untouched(outcome, run, kind)
    assert checkpoint_dirs(run) == ["checkpoint-30", BAD], checkpoint_dirs(run)
