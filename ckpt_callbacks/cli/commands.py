"""`ckpt-callbacks`: list, inspect, verify, export, prune, diff and reseal checkpoints from a shell.

A thin reader over the core: which checkpoints a run folder holds, which count, and which is best and latest
come from the catalog (`core/read/catalog.py`), the same answer `CheckpointManager.list()`/`best()` give;
checks are `core/read/verify.py`'s; retention is the manager's; the export is `core/export.py`'s; a reseal
is `core/save/reseal.py`'s. `sources.py` opens every kind of checkpoint (this library's through the core, and
the foreign formats: the stock Trainer's folders, Lightning's `.ckpt`); `output.py` formats.

Tables go to stdout, `--json` prints one JSON document instead, progress bars go to stderr and only on a
terminal. Exit codes: 0 ok, 1 problems found (a failed check, a difference, a checkpoint or file that cannot
be read), 2 usage errors. No command ends in a traceback: an unreadable file or folder is named, with the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.cli.output import (
    format_metrics,
    format_number,
    format_shape,
    format_size,
    format_table,
    print_json,
    progress_bar,
    render_state,
    summarize_state,
)
from ckpt_callbacks.cli.sources import (
    KIND_HF_TRAINER,
    KIND_LIGHTNING,
    Checkpoint,
    Damaged,
    ManifestCheckpoint,
    RunFolder,
    VerifyReport,
    by_step,
    cannot_read,
    folder_names,
    is_checkpoint,
    open_checkpoint,
    problem_from,
    scan_run_folder,
)
from ckpt_callbacks.config import CheckpointArguments, parse_size
from ckpt_callbacks.core.best import DEFAULT_SCORE_KEY, MetricRule, metric_rule_for
from ckpt_callbacks.core.export import check_export_target, export_path_problem, export_safetensors
from ckpt_callbacks.core.format import layout
from ckpt_callbacks.core.manager import CheckpointManager
from ckpt_callbacks.core.save.reseal import ResealResult, plan_reseal, reseal_checkpoint
from ckpt_callbacks.core.storage.store import LocalStore
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError

__all__ = ["EXIT_OK", "EXIT_PROBLEMS", "EXIT_USAGE", "UsageError", "build_parser", "main"]

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
# What ranks checkpoints when --metric is not given: a `save_score`, then what Trainer evaluations write.
DEFAULT_METRICS = (DEFAULT_SCORE_KEY, "eval_loss")
MAX_METRIC_COLUMNS = 4
_HIDDEN_METRIC_SUFFIXES = ("_runtime", "_per_second")
_DIFF_CHUNK = 1 << 24
UNKNOWN_FORMAT = "unknown"  # the format of a checkpoint whose manifest cannot be read
_MARKS = {"incomplete": "INCOMPLETE (run verify)", "unreadable": "UNREADABLE (run verify)",
          "damaged": "DAMAGED (run verify)"}


class UsageError(Exception):
    """The command line asks for something impossible; exit code 2."""


# ----------------------------------------------------------------------------------------- list


def cmd_list(args: argparse.Namespace) -> int:
    folder = existing_folder(args.dir)
    run = scan_run_folder(folder)
    if not run.checkpoints and not run.damaged and is_checkpoint(folder):
        raise UsageError(f"{folder} is one checkpoint, not a run folder: list {folder.parent}, or inspect {folder}.")
    rule = metric_rule(args.metric, args.greater_is_better, run.checkpoints)
    best, latest = run.marks(rule)
    result = {
        "dir": str(folder),
        "metric": None if rule is None else {"name": rule.key, "greater_is_better": rule.greater_is_better},
        "checkpoints": [_list_row(c, best, latest) for c in run.checkpoints],
        "damaged": [_damaged_row(d) for d in run.damaged],
        "unreadable": [{"name": d.name, "error": str(d.error)} for d in run.unreadable],
        "uncommitted": [leftover.name for leftover in run.leftovers if leftover.uncommitted],
        "leftovers": [asdict(leftover) for leftover in run.leftovers],
    }
    if args.json:
        print_json(result)
    else:
        print(_render_list(result))
    return EXIT_OK


def _list_row(checkpoint: Checkpoint, best: str | None, latest: str | None) -> dict[str, Any]:
    return {
        "name": checkpoint.name, "path": str(checkpoint.path), "format": checkpoint.format,
        "step": checkpoint.step, "epoch": checkpoint.epoch, "metrics": checkpoint.metrics, "size": checkpoint.size,
        "status": "ok", "best": checkpoint.name == best, "latest": checkpoint.name == latest,
    }


def _damaged_row(damaged: Damaged) -> dict[str, Any]:
    return {"name": damaged.name, "path": damaged.path, "step": damaged.step, "status": damaged.status,
            "reason": damaged.reason, "error": str(damaged.error)}


def _render_list(result: Mapping[str, Any]) -> str:
    rows = result["checkpoints"]
    all_metrics = {name for row in rows for name in row["metrics"]}
    ranking = [result["metric"]["name"]] if result["metric"] else []
    metric_names = _metric_columns(all_metrics, ranking)
    table = [
        [row["name"], _text(row["step"]), format_number(row["epoch"]),
         *(format_number(row["metrics"].get(m)) for m in metric_names),
         format_size(row["size"]), row["format"], _marks(row)]
        for row in rows
    ]
    lines = [f"{result['dir']}: {len(rows)} checkpoint(s)"]
    if rows:
        lines.append(format_table(("name", "step", "epoch", *metric_names, "size", "format", ""), table))
    metric = result["metric"]
    if metric is not None and any(row["best"] for row in rows):
        lines.append(f"best by {metric['name']} ({'higher' if metric['greater_is_better'] else 'lower'} is better)")
    if len(all_metrics) > len(metric_names):
        lines.append(f"{len(all_metrics) - len(metric_names)} more metric(s) (timings, throughput) with --json")
    damaged = result["damaged"]
    if damaged:
        lines.append(f"{len(damaged)} damaged checkpoint(s), not listed above: never resumed from, never deleted "
                     "by retention")
        lines.append(format_table(None, [(d["name"], _text(d["step"]), _MARKS[d["status"]]) for d in damaged]))
        lines += [f"{d['status']}: {d['name']}: {d['error']}" for d in damaged]
    for leftover in result["leftovers"]:
        label = "uncommitted" if leftover["kind"] != "trash" else "leftover"
        lines.append(f"{label}: {leftover['name']} ({leftover['note']})")
    return "\n".join(lines)


def _metric_columns(names: set[str], ranking: list[str]) -> list[str]:
    """The ranking metric first, then quality metrics; timings and throughput only in --json."""
    present_ranking = [m for m in ranking if m in names]
    others = sorted(m for m in names - set(present_ranking) if not m.endswith(_HIDDEN_METRIC_SUFFIXES)
                    and not m.startswith("ckpt_") and m not in ("epoch", "step"))
    return (present_ranking + others)[:MAX_METRIC_COLUMNS]


def _marks(row: Mapping[str, Any]) -> str:
    return ", ".join(mark for mark in ("best", "latest") if row[mark])


# -------------------------------------------------------------------------------------- inspect


def cmd_inspect(args: argparse.Namespace) -> int:
    checkpoint = one_checkpoint(args.ckpt)
    states = args.state or checkpoint.states()
    summaries: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for state in states:
        try:
            summaries[state] = summarize_state(state, checkpoint.describe(state))
        except CheckpointError as exc:
            errors[state] = str(exc)
        except OSError as exc:
            errors[state] = f"{exc.filename or state}: {cannot_read(exc)}"
    result = {**_identity(checkpoint), "manifest": _manifest_metadata(checkpoint), "states": summaries, "errors": errors}
    if args.json:
        print_json(result)
    else:
        print(_render_inspect(result))
    return EXIT_PROBLEMS if errors else EXIT_OK


def _identity(checkpoint: Checkpoint) -> dict[str, Any]:
    return {"name": checkpoint.name, "path": str(checkpoint.path), "format": checkpoint.format,
            "kind": checkpoint.kind, "engine": checkpoint.engine, "step": checkpoint.step,
            "epoch": checkpoint.epoch, "metrics": checkpoint.metrics, "size": checkpoint.size}


def _manifest_metadata(checkpoint: Checkpoint) -> dict[str, Any] | None:
    return None if checkpoint.manifest is None else asdict(checkpoint.manifest)


def _render_inspect(result: Mapping[str, Any]) -> str:
    manifest = result["manifest"]
    fields = [("path", result["path"]), ("step", _text(result["step"])), ("epoch", format_number(result["epoch"])),
              ("metrics", format_metrics(result["metrics"])), ("size", format_size(result["size"]))]
    fields += _manifest_fields(manifest) if manifest else [("manifest", _no_manifest_note(result["kind"]))]
    lines = [f"{result['name']} ({result['format']})", format_table(None, fields, indent="  "), ""]
    for name, summary in result["states"].items():
        block = render_state(name, summary)
        if "\n" in block and lines[-1]:
            lines.append("")
        lines += [block, ""] if "\n" in block else [block]
    lines += [f"{name}: unreadable: {error}" for name, error in result["errors"].items()]
    return "\n".join(lines).rstrip()


def _manifest_fields(manifest: Mapping[str, Any]) -> list[tuple[str, str]]:
    files = manifest["files"]
    return [
        ("files", f"{len(files)}, {manifest['checksum_algorithm']} checksums in manifest format "
                  f"{manifest['format_version']}"),
        ("states", ", ".join(manifest["states"]) or "-"),
        ("saved", _time(manifest["save_time"]) + (f" (run started {_time(manifest['start_time'])})"
                                                  if manifest["start_time"] else "")),
        ("world size", str(manifest["world_size"])),
        ("git commit", manifest["git_commit"] or "-"),
        ("versions", ", ".join(f"{k} {v}" for k, v in sorted(manifest["versions"].items())) or "-"),
        ("metadata", str(manifest["user_metadata"]) if manifest["user_metadata"] else "-"),
    ]


def _no_manifest_note(kind: str) -> str:
    writer = {KIND_HF_TRAINER: "the stock Trainer", KIND_LIGHTNING: "Lightning"}.get(kind, "another tool")
    return f"none (written by {writer}): `verify` checks its structure only"


def _time(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).isoformat(sep=" ", timespec="seconds")


# --------------------------------------------------------------------------------------- verify


def cmd_verify(args: argparse.Namespace) -> int:
    path = existing_path(args.path)
    if path.is_file() and layout.MANIFEST_NAME in folder_names(path.parent):
        path = path.parent  # a file inside one of our checkpoints: check the whole checkpoint
    checkpoints, reports = _verify_targets(path)
    with progress_bar(sum(_size_or_zero(c) for c in checkpoints), "verify") as bar:
        reports = [_verify_one(c, args.check, bar.update) for c in checkpoints] + reports
    reports.sort(key=lambda r: r.status in ("uncommitted", "leftover"))
    verified = [r for r in reports if r.status in ("ok", "failed")]
    failed = [r for r in verified if r.status == "failed"]
    if args.json:
        print_json({"path": str(path), "ok": bool(verified) and not failed, "checkpoints": [asdict(r) for r in reports]})
    else:
        print(_render_verify(path, reports, verified, failed))
    return EXIT_OK if verified and not failed else EXIT_PROBLEMS


def _verify_targets(path: Path) -> tuple[list[Checkpoint], list[VerifyReport]]:
    """The checkpoints to check, and reports for what is damaged, cannot be read, or is an interrupted writer's.

    A folder holding checkpoints is a run folder even when it also holds weights of its own (a Trainer's
    `output_dir` after `save_model()`)."""
    if path.is_dir() and layout.MANIFEST_NAME not in folder_names(path):
        run = scan_run_folder(path)
        if run.checkpoints or run.damaged or run.leftovers or not is_checkpoint(path):
            incomplete = _reopened_incomplete(run.damaged)
            reports = [_damaged_report(d) for d in run.damaged if d.name not in incomplete]
            reports += [VerifyReport(leftover.name, str(path / leftover.name), leftover.kind.replace(" ", "-"),
                                     "uncommitted" if leftover.uncommitted else "leftover", "none",
                                     notes=[leftover.note]) for leftover in run.leftovers]
            return sorted([*run.checkpoints, *incomplete.values()], key=by_step), reports
    try:
        return [open_checkpoint(path)], []
    except CheckpointNotFoundError as exc:
        raise UsageError(f"{exc} Give a checkpoint folder, a run folder or a .ckpt file.") from None
    except CheckpointError as exc:
        return [], [_damaged_report(Damaged(path.name, str(path), layout.parse_checkpoint_step(path.name), exc))]


def _reopened_incomplete(damaged: Sequence[Damaged]) -> dict[str, Checkpoint]:
    """The damaged checkpoints whose manifest reads but whose files are missing or resized, opened again so that
    `verify` names every bad file of theirs, not only the first the catalog met."""
    reopened: dict[str, Checkpoint] = {}
    for entry in damaged:
        if entry.status == "incomplete":
            with contextlib.suppress(CheckpointError, OSError):
                reopened[entry.name] = ManifestCheckpoint.at(Path(entry.path))
    return reopened


def _verify_one(checkpoint: Checkpoint, mode: str, progress: Any, pieces: list[str] | None = None) -> VerifyReport:
    """One checkpoint's report; whatever stops its check is a failure of that checkpoint, and the others go on."""
    try:
        return checkpoint.verify(mode, progress, pieces)
    except (CheckpointError, OSError) as exc:
        problem = problem_from(exc, checkpoint.path)
    return VerifyReport(checkpoint.name, str(checkpoint.path), checkpoint.format, "failed", "none", problems=[problem])


def _damaged_report(damaged: Damaged) -> VerifyReport:
    problem = problem_from(damaged.error, Path(damaged.path))
    return VerifyReport(damaged.name, damaged.path, UNKNOWN_FORMAT, "failed", "none", problems=[problem])


def _render_verify(path: Path, reports: list[VerifyReport], verified: list[VerifyReport],
                   failed: list[VerifyReport]) -> str:
    lines = []
    for report in reports:
        status = report.status.upper() if report.status == "failed" else report.status
        lines.append(f"{status:<11}  {report.name}  {_verify_detail(report)}")
        lines += [f"    {problem.message}" for problem in report.problems]
        shown_in_detail = 1 if report.status != "failed" else 0
        lines += [f"    note: {note}" for note in report.notes[shown_in_detail:]]
    if not verified:
        lines.append(f"{path}: no checkpoint found to verify.")
    else:
        leftovers = len(reports) - len(verified)
        lines.append(f"{len(verified)} checkpoint(s) checked: {len(verified) - len(failed)} ok, {len(failed)} failed"
                     + (f"; {leftovers} uncommitted leftover(s), not failures" if leftovers else ""))
    return "\n".join(lines)


def _verify_detail(report: VerifyReport) -> str:
    if report.status in ("uncommitted", "leftover"):
        return report.notes[0]
    if report.status == "failed":
        return f"{len(report.problems)} bad file(s)"
    what = {"checksum": "sizes and checksums", "size": "sizes"}.get(report.check)
    if what is None:
        return report.notes[0] if report.notes else "ok"
    return f"{what} of {report.files_checked} file(s), {format_size(report.bytes_checked)}"


def _size_or_zero(checkpoint: Checkpoint) -> int:
    try:
        return checkpoint.size
    except OSError:
        return 0  # its check reports why it cannot be read


# --------------------------------------------------------------------------------------- export


@dataclass
class CopiedFiles:
    """Stands in for a config/tokenizer: `export_safetensors` calls `save_pretrained`, which copies the files."""

    files: list[Path]

    def save_pretrained(self, directory: str) -> None:
        for file in self.files:
            shutil.copy2(file, Path(directory) / file.name)


def cmd_export(args: argparse.Namespace) -> int:
    source = one_checkpoint(args.ckpt)
    out = Path(args.out)
    check_export_out(out, source.path, args.overwrite)
    try:
        parse_size(args.max_shard_size)
    except ValueError as exc:
        raise UsageError(str(exc).replace("max_shard_size=", "--max-shard-size ")) from None
    state = args.state or source.weights_state()
    if not args.no_verify:
        _verify_before_export(source, state)
    weights = strip_prefix(source.weights(state), args.strip_prefix)
    copied = source.pretrained_files()
    total = sum(t.numel() * t.element_size() for t in weights.values())
    with progress_bar(total, "export") as bar:
        def advance(written: int) -> None:  # file sizes, headers included: the bar stops at the tensors' total
            bar.update(min(written, bar.total - bar.n))

        export_safetensors(weights, out, max_shard_size=args.max_shard_size,
                           pretrained_objects=[CopiedFiles(copied)] if copied else [], progress=advance)
        bar.refresh()  # show where it ended, whatever the bar's redraw interval skipped
    files = sorted(p for p in out.iterdir() if p.is_file())
    result = {"source": str(source.path), "format": source.format, "out": str(out), "tensors": len(weights),
              "bytes": total, "stripped_prefix": args.strip_prefix, "verified": not args.no_verify,
              "files": [{"name": f.name, "size": f.stat().st_size} for f in files]}
    if args.json:
        print_json(result)
    else:
        print(f"exported {len(weights)} tensors ({format_size(total)}) of {source.name} ({source.format}) to {out}")
        print(format_table(("file", "size"), [(f["name"], format_size(f["size"])) for f in result["files"]], indent="  "))
    return EXIT_OK


def check_export_out(out: Path, source: Path, overwrite: bool) -> None:
    """Refuse an export target that the core refuses, and an earlier export unless `--overwrite` replaces it.

    The core decides: `export_path_problem` (the run folder holding the checkpoint, one of its parents, or a
    checkpoint in it) and `check_export_target` (only an empty folder or an earlier export of this library)."""
    if out.is_symlink():
        raise UsageError(f"{out} is a link; an export never replaces one. Choose a folder for the export.")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; choose a folder for the export.")
    if source.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"{out} holds the checkpoint being exported; choose another folder.")
    run = source.parent
    problem = export_path_problem(str(run.resolve()), str(out.resolve()))  # links and '..' cannot hide the run
    if problem is not None:
        problem = problem.replace("output_dir", "the run folder")
        raise UsageError(f"{out} {problem} (the run folder is {run}, which holds {source.name}); choose a folder "
                         f"of its own, e.g. {run / 'export'}. It is never replaced, --overwrite or not.")
    if not out.exists():
        return
    entries = folder_names(out)
    try:
        check_export_target(out)
    except CheckpointError:
        shown = ", ".join(repr(name) for name in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UsageError(
            f"{out} is not empty and was not written by an export of ckpt-callbacks (it holds {shown}): it is never "
            "replaced, --overwrite or not. Choose a new or empty folder, or move those files away.") from None
    if entries and not overwrite:
        raise UsageError(f"{out} is not empty. Choose a new folder, or pass --overwrite to replace it (it holds an "
                         "earlier export of ckpt-callbacks).")


def _verify_before_export(source: Checkpoint, state: str) -> None:
    """Check the files the export reads (the weights, and the config files copied beside them); refuse on damage."""
    with progress_bar(None, "verify") as bar:  # bytes checked: only the files the export reads
        report = _verify_one(source, "checksum", bar.update, pieces=[state])
    if report.status == "failed":
        problems = "\n".join(f"  {problem.message}" for problem in report.problems)
        raise CheckpointError(
            f"{source.name} failed verification, so nothing was exported:\n{problems}\nResume or export from another "
            "checkpoint; pass --no-verify to export what the files hold anyway.", path=str(source.path))


def strip_prefix(weights: dict[str, torch.Tensor], prefix: str | None) -> dict[str, torch.Tensor]:
    """Names without `prefix`, which every name must start with (Lightning's `model.` for `self.model`)."""
    if not prefix:
        return weights
    without = [name for name in weights if not name.startswith(prefix)]
    if without:
        raise UsageError(
            f"--strip-prefix {prefix!r}: {len(without)} of {len(weights)} tensor names do not start with it "
            f"(e.g. {without[0]!r}). Give the prefix every name shares, or leave the option out."
        )
    return {name[len(prefix):]: tensor for name, tensor in weights.items()}


# ----------------------------------------------------------------------------------------- diff


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = one_checkpoint(args.a), one_checkpoint(args.b)
    weights_a = strip_prefix(a.weights(args.state), args.strip_prefix)
    weights_b = strip_prefix(b.weights(args.state), args.strip_prefix)
    with progress_bar(sum(t.numel() * t.element_size() for t in weights_a.values()), "diff") as bar:
        result = compare_weights(weights_a, weights_b, args.atol, bar.update)
    result = {"a": str(a.path), "b": str(b.path), **result}
    if args.json:
        print_json(result)
    else:
        print(_render_diff(result))
    return EXIT_OK if result["identical"] else EXIT_PROBLEMS


def compare_weights(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], atol: float,
                    progress: Any) -> dict[str, Any]:
    """Names in one only, shape or dtype mismatches, and tensors whose max |a - b| exceeds `atol`."""
    differ, mismatched, equal = [], [], 0
    for name in sorted(a.keys() & b.keys()):
        ta, tb = a[name], b[name]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            mismatched.append({"name": name, "a": _tensor_text(ta), "b": _tensor_text(tb)})
        else:
            difference = max_abs_difference(ta, tb)
            if difference > atol or math.isnan(difference):
                differ.append({"name": name, "shape": list(ta.shape), "dtype": _dtype(ta), "max_abs_diff": difference})
            else:
                equal += 1
        progress(ta.numel() * ta.element_size())
    only_a, only_b = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
    identical = not (differ or mismatched or only_a or only_b)
    return {"identical": identical, "equal": equal, "differ": differ, "mismatched": mismatched,
            "only_in_a": only_a, "only_in_b": only_b}


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in float64, in chunks so that large tensors need little extra memory; 0.0 when equal."""
    if torch.equal(a, b):
        return 0.0
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    worst = 0.0
    for start in range(0, flat_a.numel(), _DIFF_CHUNK):
        chunk = flat_a[start:start + _DIFF_CHUNK].double() - flat_b[start:start + _DIFF_CHUNK].double()
        worst = max(worst, float(chunk.abs().max()))
    return worst


def _render_diff(result: Mapping[str, Any]) -> str:
    lines = [f"A: {result['a']}", f"B: {result['b']}"]
    if result["differ"]:
        rows = [(d["name"], format_shape(d["shape"]), d["dtype"], format_number(d["max_abs_diff"])) for d in result["differ"]]
        lines.append(format_table(("tensor", "shape", "dtype", "max abs diff"), rows))
    lines += [f"shape or dtype differs: {m['name']}: {m['a']} in A, {m['b']} in B" for m in result["mismatched"]]
    lines += [f"only in A: {name}" for name in result["only_in_a"]]
    lines += [f"only in B: {name}" for name in result["only_in_b"]]
    compared = result["equal"] + len(result["differ"])
    verdict = "identical" if result["identical"] else "different"
    lines.append(f"{verdict}: {compared} tensor(s) compared, {len(result['differ'])} differ, {result['equal']} equal")
    return "\n".join(lines)


def _tensor_text(tensor: torch.Tensor) -> str:
    return f"{format_shape(tensor.shape)} {_dtype(tensor)}"


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------- prune


def cmd_prune(args: argparse.Namespace) -> int:
    folder = existing_folder(args.dir)
    for flag, value in (("--keep-last", args.keep_last), ("--keep-best", args.keep_best)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} {value}: give a number >= 1 (the newest checkpoint is always kept).")
    if args.keep_last is None and args.keep_best is None:
        raise UsageError("say what to keep: --keep-last N, --keep-best N, or both.")
    run = scan_run_folder(folder)
    ranking = metric_arguments(args.metric, args.greater_is_better, run.checkpoints)
    arguments = (ranking or CheckpointArguments()).replace(output_dir=str(folder))
    manager = CheckpointManager(arguments)
    try:
        before = [info.step for info in manager.list()]
        deleted = manager.prune(args.keep_last, args.keep_best, dry_run=True) if args.dry_run else _prune_now(manager, args)
    finally:
        manager.close()
    left_alone = _left_alone(run)
    result = {"dir": str(folder), "dry_run": args.dry_run, "deleted": deleted,
              "kept": [step for step in before if step not in deleted], "left_alone": sorted(left_alone),
              "problems": {name: problem for name, problem in sorted(left_alone.items()) if problem}}
    if args.json:
        print_json(result)
    else:
        print(_render_prune(result))
    return EXIT_OK


def _left_alone(run: RunFolder) -> dict[str, str]:
    """What prune never deletes, with what is wrong where something is: damaged checkpoints, and anything
    without a manifest of this library (stock Trainer folders, .ckpt files, checkpoint-N folders without one)."""
    names = {damaged.name: str(damaged.error) for damaged in run.damaged}
    names.update({c.name: "" for c in run.checkpoints if not isinstance(c, ManifestCheckpoint)})
    names.update({leftover.name: "" for leftover in run.leftovers if leftover.kind == "no manifest"})
    return names


@contextlib.contextmanager
def _quiet_core_warnings() -> Iterator[None]:
    """Core log records below ERROR off: the command reports what they say; errors (a failed delete) still show."""
    core_logger = logging.getLogger("ckpt_callbacks")
    level = core_logger.level
    core_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        core_logger.setLevel(level)


def _prune_now(manager: CheckpointManager, args: argparse.Namespace) -> list[int]:
    take_writer_lock(manager.store.acquire_writer_lock, manager.store.root,
                     "Prune after it ends, or let that run's save_total_limit do it.")
    return manager.prune(args.keep_last, args.keep_best)


def take_writer_lock(acquire: Any, root: str, then: str) -> None:
    """Take a run folder's writer lock (`acquire`), or say that a training process holds it and what to do."""
    try:
        acquire()
    except CheckpointWriteError:
        raise  # the folder cannot be written at all: that error says why
    except CheckpointError:
        raise CheckpointError(f"{root} is being written by a running training process (its lock is held). {then}",
                              path=root) from None


def _render_prune(result: Mapping[str, Any]) -> str:
    verb = "would delete" if result["dry_run"] else "deleted"
    names = [layout.checkpoint_name(step) for step in result["deleted"]]
    kept = [layout.checkpoint_name(step) for step in result["kept"]]
    lines = [f"{verb}: {', '.join(names) or 'nothing'}", f"kept: {', '.join(kept) or 'nothing'}"]
    if result["left_alone"]:
        lines.append(f"left alone (damaged, or without a manifest; see `verify`): {', '.join(result['left_alone'])}")
        lines += [f"  {name}: {problem}" for name, problem in result["problems"].items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- reseal


def cmd_reseal(args: argparse.Namespace) -> int:
    path = existing_path(args.ckpt)
    if not path.is_dir():
        raise UsageError(f"{path} is a file; reseal works on a checkpoint folder holding {layout.MANIFEST_NAME} (a "
                         ".ckpt file carries its manifest inside: save it again instead).")
    if layout.MANIFEST_NAME not in folder_names(path):
        raise UsageError(f"{path} has no {layout.MANIFEST_NAME}: not a checkpoint of this library, so there is "
                         "nothing to reseal.")
    if args.dry_run:
        result = plan_reseal(path)
    else:
        with _run_folder_locked(path):
            result = reseal_checkpoint(path)
    report = _reseal_report(result, args.dry_run)
    if args.json:
        print_json(report)
    else:
        print(_render_reseal(report))
    return EXIT_OK


@contextlib.contextmanager
def _run_folder_locked(checkpoint: Path) -> Iterator[None]:
    """Hold the writer lock of the run folder around a `checkpoint-N` folder: no training process rotates or
    re-saves it meanwhile. A checkpoint folder of another name is not part of a run."""
    if layout.parse_checkpoint_step(checkpoint.name) is None:
        yield
        return
    store = LocalStore(checkpoint.parent)
    take_writer_lock(store.acquire_writer_lock, store.root, "Reseal after it ends.")
    try:
        yield
    finally:
        store.release_writer_lock()


def _reseal_report(result: ResealResult, dry_run: bool) -> dict[str, Any]:
    manifest = result.manifest
    return {"path": str(result.path), "dry_run": dry_run, "written": result.written, "unchanged": result.unchanged,
            "step": manifest.step, "engine": manifest.engine, "files": len(manifest.files), "added": result.added,
            "removed": result.removed, "changed": result.changed, "ignored": result.ignored}


def _render_reseal(report: Mapping[str, Any]) -> str:
    name = Path(report["path"]).name
    if report["unchanged"]:
        return f"{name}: nothing to reseal: its {layout.MANIFEST_NAME} already matches every file."
    verb = "would record" if report["dry_run"] else "resealed: its manifest now records"
    lines = [f"{name}: {verb} {report['files']} file(s) as they are now (step {report['step']}, engine "
             f"{report['engine']}; states, metrics and metadata kept)"]
    lines += [f"  {what}: {', '.join(report[what])}" for what in ("added", "removed", "changed") if report[what]]
    if report["ignored"]:
        lines.append(f"  not recorded (leftovers of interrupted writes): {', '.join(report['ignored'])}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- helpers


def metric_arguments(name: str | None, greater_is_better: bool | None,
                     checkpoints: Sequence[Checkpoint]) -> CheckpointArguments | None:
    """The flags that rank checkpoints: `--metric` (as `metric_for_best_model`), else the first of
    `DEFAULT_METRICS` that any checkpoint has; None when nothing ranks them. A saved score is ranked as the core
    ranks it when `metric_for_best_model` is unset."""
    if name is None:
        present = {metric for checkpoint in checkpoints for metric in checkpoint.metrics}
        name = next((metric for metric in DEFAULT_METRICS if metric in present), None)
        if name is None:
            return None
    metric = None if name == DEFAULT_SCORE_KEY else name
    return CheckpointArguments(metric_for_best_model=metric, greater_is_better=greater_is_better)


def metric_rule(name: str | None, greater_is_better: bool | None, checkpoints: Sequence[Checkpoint]) -> MetricRule | None:
    """The core's rule (`best.metric_rule_for`) for the flags of `metric_arguments`, as `CheckpointManager` uses it."""
    arguments = metric_arguments(name, greater_is_better, checkpoints)
    return None if arguments is None else metric_rule_for(arguments)


def existing_path(value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise UsageError(f"{value}: no such file or folder.")
    return path


def existing_folder(value: str) -> Path:
    path = existing_path(value)
    if not path.is_dir():
        raise UsageError(f"{value} is not a folder; give the run folder that holds checkpoint-* folders.")
    return path


def one_checkpoint(value: str) -> Checkpoint:
    """The checkpoint at `value`; a run folder is a usage error that names its newest checkpoint."""
    path = existing_path(value)
    if not is_checkpoint(path) and path.is_dir():
        checkpoints = scan_run_folder(path).checkpoints
        if checkpoints:
            raise UsageError(f"{path} is a run folder with {len(checkpoints)} checkpoint(s); pass one of them, "
                             f"e.g. {checkpoints[-1].path}")
    return open_checkpoint(path)


def _text(value: object) -> str:
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    common.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first, e.g. the module defining your own CheckpointEngine (repeatable)")
    parser = argparse.ArgumentParser(
        prog="ckpt-callbacks",
        description="List, inspect, verify, export, prune, diff and reseal checkpoints: this library's, the stock "
                    "transformers.Trainer's checkpoint-N folders, and Lightning .ckpt files.",
        epilog="Exit codes: 0 ok, 1 problems found, 2 usage errors.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(commands, common)
    _add_inspect(commands, common)
    _add_verify(commands, common)
    _add_export(commands, common)
    _add_prune(commands, common)
    _add_diff(commands, common)
    _add_reseal(commands, common)
    return parser


def _add_metric_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--metric", metavar="NAME",
                         help="metric that ranks checkpoints ('eval_' prefix optional); default: 'score' "
                              "(from save_score), else 'eval_loss', when checkpoints have it")
    command.add_argument("--greater-is-better", action=argparse.BooleanOptionalAction, default=None,
                         help="whether a larger metric is better; default: inferred as in transformers "
                              "(lower is better for names ending in 'loss')")


def _add_list(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser("list", parents=[common], help="the checkpoints of a run folder",
                                  description="The checkpoints in DIR: step, epoch, metrics, size, best and latest.")
    command.add_argument("dir", metavar="DIR", help="run folder (holding checkpoint-* folders or .ckpt files)")
    _add_metric_options(command)
    command.set_defaults(handler=cmd_list)


def _add_inspect(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "inspect", parents=[common], help="what one checkpoint holds",
        description="Tensors (name, shape, dtype), optimizer state, RNG state and manifest metadata of CKPT. "
                    "Tensors are described from file headers, not read.")
    command.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder or a .ckpt file")
    command.add_argument("--state", action="append", metavar="NAME",
                         help="show only this piece of state, e.g. model or optimizer (repeatable)")
    command.set_defaults(handler=cmd_inspect)


def _add_verify(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "verify", parents=[common], help="re-check sizes and checksums",
        description="Re-check the sizes and checksums recorded in the manifest of one checkpoint, or of every "
                    "checkpoint under a run folder, and name every bad file. Checkpoints without a manifest "
                    "(stock Trainer, Lightning) are checked by structure: every file loads, torch files' CRCs "
                    "match. Exit 1 when any check fails; an uncommitted staging leftover is not a failure.")
    command.add_argument("path", metavar="PATH", help="a checkpoint folder, a run folder or a .ckpt file")
    command.add_argument("--check", choices=("checksum", "size"), default="checksum",
                         help="checksum (default) reads every byte; size only compares file sizes")
    command.set_defaults(handler=cmd_verify)


def _add_export(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "export", parents=[common], help="write the model weights as sharded safetensors",
        description="Write the model weights of CKPT (any kind) to OUT as sharded safetensors with a "
                    "model.safetensors.index.json in the Hugging Face format; config and tokenizer files beside "
                    "the weights are copied, so from_pretrained(OUT) works for Hugging Face checkpoints.")
    command.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder or a .ckpt file")
    command.add_argument("out", metavar="OUT", help="folder to write (new or empty, or see --overwrite)")
    command.add_argument("--max-shard-size", default="5GB", metavar="S",
                         help="largest shard, Hugging Face syntax: '500MB', '5GB' or bytes (default 5GB)")
    command.add_argument("--strip-prefix", metavar="PREFIX",
                         help="remove PREFIX from every tensor name, e.g. 'model.' for a LightningModule "
                              "that holds its network in self.model")
    command.add_argument("--state", metavar="NAME",
                         help="the piece of state with the weights (default: model, or a .ckpt's state_dict)")
    command.add_argument("--overwrite", action="store_true",
                         help="replace OUT when it holds an earlier export of ckpt-callbacks (a folder it did not "
                              "write is never replaced)")
    command.add_argument("--no-verify", action="store_true",
                         help="export without checking the files first (by default a file that fails its size, "
                              "checksum or structure check stops the export, exit 1)")
    command.set_defaults(handler=cmd_export)


def _add_prune(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "prune", parents=[common], help="apply a retention policy now",
        description="Delete the checkpoints of DIR that a retention policy does not keep. The newest "
                    "checkpoint and the best one are always kept; --keep-last counts the best, as "
                    "save_total_limit does. Checkpoints without a manifest are never touched.")
    command.add_argument("dir", metavar="DIR", help="run folder")
    command.add_argument("--keep-last", type=int, metavar="N", help="keep at most N checkpoints, the newest (and the best)")
    command.add_argument("--keep-best", type=int, metavar="N", help="also keep the N best by --metric")
    _add_metric_options(command)
    command.add_argument("--dry-run", action="store_true", help="print what would be deleted, delete nothing")
    command.set_defaults(handler=cmd_prune)


def _add_diff(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "diff", parents=[common], help="compare the model weights of two checkpoints",
        description="The tensors that differ between the model weights of A and B, with the maximum absolute "
                    "difference of each; exit 1 when anything differs.")
    command.add_argument("a", metavar="A", help="a checkpoint folder or a .ckpt file")
    command.add_argument("b", metavar="B", help="a checkpoint folder or a .ckpt file")
    command.add_argument("--atol", type=float, default=0.0, help="treat differences up to ATOL as equal (default 0)")
    command.add_argument("--state", metavar="NAME", help="the piece of state to compare (default: the model weights)")
    command.add_argument("--strip-prefix", metavar="PREFIX", help="remove PREFIX from the tensor names of both")
    command.set_defaults(handler=cmd_diff)


def _add_reseal(commands: Any, common: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "reseal", parents=[common], help="accept a deliberately changed checkpoint",
        description="Record the files of CKPT as they are now in its manifest.json: every file with its size and "
                    "checksum; step, epoch, metrics, states, engine and metadata are kept. For a checkpoint you "
                    "changed on purpose (e.g. model.safetensors re-sharded into model-0000k-of-0000n.safetensors "
                    "+ index), which loads and verify otherwise refuse. Links, special files and states whose "
                    "files are gone are refused. Never reseal a checkpoint that verify reports damaged unless you "
                    "know why: resealing makes the damage pass every check.")
    command.add_argument("ckpt", metavar="CKPT", help="a checkpoint folder of this library (with manifest.json)")
    command.add_argument("--dry-run", action="store_true", help="print what would be recorded, write nothing")
    command.set_defaults(handler=cmd_reseal)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Reading a dcp checkpoint in one process is what a command-line tool does; torch warns about it each time.
    warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled|unavailable)")
    try:
        _import_modules(args.imports)
        with _quiet_core_warnings():  # what the core warns about (a damaged checkpoint skipped), the output reports
            return int(args.handler(args))
    except UsageError as exc:
        print(f"ckpt-callbacks {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CheckpointError as exc:
        print(f"ckpt-callbacks {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_PROBLEMS
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, and keep Python from complaining at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_PROBLEMS
    except OSError as exc:  # a file or folder that cannot be read or written, wherever it was met
        print(f"ckpt-callbacks {args.command}: {os_error_message(exc)}", file=sys.stderr)
        return EXIT_PROBLEMS


_OS_HINTS = {
    errno.EACCES: "Check its permissions (and those of the folders above it), then retry.",
    errno.EPERM: "Check its permissions (and those of the folders above it), then retry.",
    errno.ENOSPC: "Free disk space, then retry.",
    errno.EDQUOT: "Free disk space or raise your quota, then retry.",
    errno.EROFS: "The file system is read-only: choose a folder on a writable one.",
}


def os_error_message(exc: OSError) -> str:
    """`exc` as a user reads it: the file, what happened, what to do."""
    cause = os.strerror(exc.errno) if exc.errno else str(exc)
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{cause}. {_OS_HINTS.get(exc.errno or 0, 'Check the path and the disk, then retry.')}"


def _import_modules(modules: Sequence[str]) -> None:
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules next to where the command runs are found
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise UsageError(f"--import {module}: {exc}. Make the module importable (PYTHONPATH) or fix its name.") from None


if __name__ == "__main__":
    sys.exit(main())
