"""Run the benchmark suite: `.venv/bin/python benchmarks/run.py [--quick] [--only stall,disk] [--sizes 45M,124M]`.

Each scenario runs per model size in a fresh subprocess (so memory figures and
failures stay separate), prints its table, and the whole run is written to
`benchmarks/results/{timestamp}.json` and `benchmarks/results/latest.json`.
Scenarios that report seconds per GB at several sizes get a cross-size table
(the largest over the smallest: a cost that grows linearly stays near 1).
`--table FILE` prints the table of an earlier run again (Markdown with `--markdown`).
`--sizes tiny --repeats 1` runs any scenario on a 1.7M-parameter GPT-2: a smoke run
of the scripts (seconds), whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from benchmarks.common import RESULTS, SIZES, quiet  # noqa: E402

# name -> (module, runs per figure in a full run, in a --quick run, sizes it runs at)
SCENARIOS: dict[str, tuple[str, int, int, tuple[str, ...]]] = {
    "stall": ("benchmarks.stall", 5, 2, ("45M", "124M")),
    "overhead": ("benchmarks.overhead", 3, 1, ("45M", "124M")),
    "disk": ("benchmarks.disk", 5, 2, ("45M", "124M")),
    "resume": ("benchmarks.resume", 5, 2, ("45M", "124M")),
    "resume_in_train": ("benchmarks.resume_in_train", 5, 2, ("45M", "124M")),
    "memory": ("benchmarks.memory", 10, 4, ("124M",)),
    "export": ("benchmarks.export", 5, 2, ("45M", "124M", "350M")),
    "lightning": ("benchmarks.lightning_io", 5, 2, ("45M", "124M")),
    "peers": ("benchmarks.peers", 5, 2, ("45M", "124M", "350M")),
    "peer_loads": ("benchmarks.peer_loads", 5, 2, ("350M",)),
    "first_save": ("benchmarks.first_save", 5, 2, ("45M", "350M")),
    "loaded": ("benchmarks.loaded", 5, 2, ("tiny", "45M")),
    "gpu": ("benchmarks.gpu", 5, 2, ("124M", "350M")),
    "sharded": ("benchmarks.sharded", 5, 2, ("45M",)),
    "writer_mode": ("benchmarks.writer_mode", 5, 2, ("124M",)),
}
# Run only when named with --only: the measurement behind a settled design choice (a writer thread, not a process),
# and the loads of `peers` alone (a rerun of that part).
NOT_IN_FULL_RUN = frozenset({"writer_mode", "peer_loads"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs, the 45M model only (a smoke run, ~10 min)")
    parser.add_argument("--only", default="", help=f"comma-separated scenarios: {', '.join(SCENARIOS)}")
    parser.add_argument("--sizes", default="", help=f"comma-separated model sizes: {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=0, help="runs per figure (default: per scenario)")
    parser.add_argument("--table", type=Path, nargs="+", help="print the tables of earlier results files and exit")
    parser.add_argument("--markdown", action="store_true", help="print tables as Markdown")
    parser.add_argument("--scenario", help=argparse.SUPPRESS)  # internal: run one scenario in this process
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.table:
        for results_file in options.table:
            print_tables(json.loads(results_file.read_text())["results"], markdown=options.markdown)
        return
    if options.scenario:
        run_in_process(options.scenario, options.size, options.repeats, options.out)
        return
    run_suite(options)


def run_suite(options: argparse.Namespace) -> None:
    names = [n for n in options.only.split(",") if n] or [n for n in SCENARIOS if n not in NOT_IN_FULL_RUN]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    wanted_sizes = [s for s in options.sizes.split(",") if s] or (["45M"] if options.quick else list(SIZES))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run: dict[str, Any] = {"started": stamp, "machine": machine(), "quick": options.quick, "results": []}
    for name in names:
        module, full, quick, sizes = SCENARIOS[name]
        repeats = options.repeats or (quick if options.quick else full)
        chosen = [s for s in wanted_sizes if s in SIZES] if options.sizes else [s for s in wanted_sizes if s in sizes]
        for size in chosen or ([sizes[0]] if options.quick else []):
            out = RESULTS / f".{name}-{size}.json"
            started = time.perf_counter()
            print(f"-- {name} {size}: {repeats} run(s) per figure ...", flush=True)
            command = [sys.executable, __file__, "--scenario", name, "--size", size, "--repeats", str(repeats), "--out", str(out)]
            done = subprocess.run(command, cwd=ROOT.parent)
            if done.returncode != 0 or not out.exists():
                run["results"].append({"scenario": name, "size": size, "error": f"exit status {done.returncode}"})
                print(f"   {name} {size} FAILED (exit status {done.returncode})", flush=True)
                continue
            result = json.loads(out.read_text())
            out.unlink()
            result["wall_seconds"] = time.perf_counter() - started
            run["results"].append(result)
            print_tables([result], markdown=options.markdown)
            _write(run, stamp)
        summary = per_gb_summary(name, [r for r in run["results"] if r.get("scenario") == name])
        if summary is not None:
            run.setdefault("summaries", []).append(summary)
            print_tables([summary], markdown=options.markdown)
    _write(run, stamp)
    print(f"\nResults: {RESULTS / f'{stamp}.json'} (also latest.json)")


def run_in_process(name: str, size: str, repeats: int, out: Path) -> None:
    quiet()
    module = importlib.import_module(SCENARIOS[name][0])
    result = module.run(size, repeats)
    out.write_text(json.dumps(result, indent=2, default=float))


def _write(run: dict[str, Any], stamp: str) -> None:
    text = json.dumps(run, indent=2, default=float)
    (RESULTS / f"{stamp}.json").write_text(text)
    (RESULTS / "latest.json").write_text(text)


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def per_gb_summary(name: str, results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Seconds per GB at each size for the figures a scenario reports so (`per_gb`), and the largest over the
    smallest: flat (near 1) when the cost grows linearly with the state, a cliff otherwise."""
    sized = [r for r in results if r.get("per_gb")]
    if len(sized) < 2:
        return None
    figures = [f for f in sized[0]["per_gb"] if all(f in r["per_gb"] for r in sized)]
    rows = [{"name": f"{figure} [{r['size']}]", "median": r["per_gb"][figure], "runs": [], "unit": "s/GB", "note": ""}
            for figure in figures for r in sized]
    ratios = []
    for figure in figures:
        values = [r["per_gb"][figure] for r in sized]
        ratios.append({"name": f"{figure}: s/GB, largest / smallest over {', '.join(r['size'] for r in sized)}",
                       "value": max(values) / min(values) if min(values) > 0 else float("nan"), "target": 1.5,
                       "higher_is_better": False, "met": max(values) <= 1.5 * min(values)})
    return {"scenario": f"{name} per GB", "title": f"({name}) seconds per GB of state, across sizes",
            "size": " / ".join(r["size"] for r in sized),
            "rows": rows, "ratios": ratios}


def print_tables(results: list[dict[str, Any]], *, markdown: bool = False) -> None:
    for result in results:
        if "error" in result:
            print(f"\n{result['scenario']} {result['size']}: {result['error']}")
            continue
        if "skipped" in result:
            print(f"\n{result['scenario']} {result['size']}: skipped ({result['skipped']})")
            continue
        size_note = f"{result['size']} GPT-2, {result['bytes'] / 1e9:.2f} GB" if "bytes" in result else result["size"]
        runs = max((len(r["runs"]) for r in result["rows"]), default=0)
        count = f", {runs} runs" if runs else ""
        print(f"\n{'#### ' if markdown else ''}{result['title']} ({size_note}{count})\n")
        lines = [("", "median", "runs")] + [(r["name"], _fmt(r["median"], r["unit"]), " ".join(_fmt(v, r["unit"]) for v in r["runs"]))
                                           for r in result["rows"]]
        _print_lines([line[:2] for line in lines] if markdown else lines, markdown)  # Markdown: medians only
        if result.get("ratios"):
            ratio_lines = [("ratio", "value", "target")] + [
                (r["name"], f"{r['value']:.3f}", _target(r)) for r in result["ratios"]]
            print()
            _print_lines(ratio_lines, markdown)


def _target(entry: dict[str, Any]) -> str:
    if entry["target"] is None:
        return ""
    sign = ">=" if entry["higher_is_better"] else "<="
    return f"{sign} {entry['target']:.3g}: {'met' if entry['met'] else 'NOT met'}"


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "GB":
        return f"{value:.2f} GB"
    if unit == "GB/s":
        return f"{value:.2f} GB/s"
    if unit == "steps/s":
        return f"{value:.0f}/s"
    if unit == "s/GB":
        return f"{value:.3f} s/GB"
    return f"{value:.3g} {unit}"


def _print_lines(lines: list[tuple[str, ...]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(lines[0]) + " |")
        print("|" + "---|" * len(lines[0]))
        for line in lines[1:]:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())


if __name__ == "__main__":
    main()
