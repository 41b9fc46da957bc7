"""Regenerate the parts of the documentation that are derived from code, so that they cannot drift.

    .venv/bin/python docs/gen_reference.py           # rewrite the generated regions in place
    .venv/bin/python docs/gen_reference.py --check   # exit 1 naming the stale pages (tests/docs runs this)

A generated region of a page sits between `<!-- BEGIN GENERATED: name -->` and
`<!-- END GENERATED: name -->`; everything outside the markers is written by hand.

- `flags` (flags.md): every `CheckpointArguments` field, from the dataclass and its metadata.
- `manifest` (format.md): every `manifest.json` field, from the `Manifest` dataclass.
- `cli-COMMAND` (cli.md): `ckpt-callbacks COMMAND --help`, from the argparse parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

from ckpt_callbacks import CheckpointArguments
from ckpt_callbacks.cli.commands import build_parser
from ckpt_callbacks.core.format.manifest import Manifest
from ckpt_callbacks.hf.arguments import TRAINER_FLAGS

DOCS = Path(__file__).resolve().parent
HELP_WIDTH = "100"
MANIFEST_FIELDS = {
    "format": "Always `\"ckpt_callbacks\"`: readers refuse any other JSON.",
    "format_version": "Version of this layout (1); a newer version than the reader knows is refused with a "
                      "message to upgrade.",
    "step": "Optimizer step of the checkpoint; equals the `N` of `checkpoint-N`.",
    "epoch": "Fractional epoch at the save (`1.5` = half way through the second epoch), or `null`.",
    "engine": "Name of the `CheckpointEngine` that wrote the files; the reader uses the same one.",
    "files": "Every file of the checkpoint except the manifest: `path` (relative, POSIX), `size` in bytes, "
             "`checksum`.",
    "checksum_algorithm": "`\"xxh3_128\"`: the hash of every `checksum`, as 32 hex digits.",
    "states": "Names of the pieces of state saved (`model`, `optimizer`, `rng`, `ema/model`, ...).",
    "metrics": "Numeric metrics given at save time (`eval_loss`, a `save_score`, ...): what ranks checkpoints.",
    "world_size": "Number of processes that saved it; multi-process checkpoints hold `rng_0` ... `rng_{N-1}`.",
    "versions": "Versions of Python, torch, ckpt-callbacks and the other libraries involved.",
    "git_commit": "Commit of the working directory's git repository at save time, or `null`.",
    "start_time": "When the manager (the run) started, seconds since the epoch.",
    "save_time": "When the checkpoint was sealed, seconds since the epoch.",
    "user_metadata": "Whatever JSON the caller put in `save(..., metadata=...)` or `tx.metadata`.",
}


def flags_region() -> str:
    fields = dataclasses.fields(CheckpointArguments)
    lines = ["| flag | default | from `TrainingArguments` |", "|---|---|---|"]
    lines += [f"| [`{f.name}`](#{f.name}) | `{_default(f)}` | {'yes' if f.name in TRAINER_FLAGS else ''} |"
              for f in fields]
    for f in fields:
        lines += ["", f"### `{f.name}`", "", _sentence(f.metadata["help"]), ""]
        # The annotation as written: HfArgumentParser replaces `Field.type` with resolved types in place.
        lines.append(f"Type `{CheckpointArguments.__annotations__[f.name]}`, default `{_default(f)}`.")
        if "choices" in f.metadata:
            lines[-1] += " One of " + ", ".join(f"`{c!r}`" for c in f.metadata["choices"]) + "."
        if f.name in TRAINER_FLAGS:
            lines[-1] += " `CheckpointCallback()` reads it from `TrainingArguments` unless you set it."
    return "\n".join(lines)


def manifest_region() -> str:
    names = [f.name for f in dataclasses.fields(Manifest)]
    missing, unknown = set(names) - set(MANIFEST_FIELDS), set(MANIFEST_FIELDS) - set(names)
    if missing or unknown:
        raise SystemExit(f"docs/gen_reference.py: describe the manifest fields {sorted(missing)} "
                         f"and drop {sorted(unknown)} in MANIFEST_FIELDS.")
    rows = [f"| `{name}` | {MANIFEST_FIELDS[name]} |" for name in MANIFEST_FIELDS]
    return "\n".join(["| field | meaning |", "|---|---|", *rows])


def cli_region(command: str) -> str:
    os.environ["COLUMNS"] = HELP_WIDTH  # argparse wraps help to the terminal width
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return "```text\n" + subparsers.choices[command].format_help().rstrip() + "\n```"


def _default(field: dataclasses.Field) -> str:
    return repr(field.default) if isinstance(field.default, str) else str(field.default)


def _sentence(text: str) -> str:
    return text if text.endswith(".") else text + "."


REGIONS: dict[str, Callable[[], str]] = {
    "flags": flags_region,
    "manifest": manifest_region,
    **{f"cli-{name}": (lambda name=name: cli_region(name))
       for name in ("list", "inspect", "verify", "export", "prune", "diff", "reseal")},
}
_REGION_RE = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                        re.S)


def render(text: str) -> str:
    """`text` with every generated region rewritten from code."""
    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in REGIONS:
            raise SystemExit(f"unknown generated region {name!r}; known: {', '.join(REGIONS)}")
        return match.group(1) + REGIONS[name]() + "\n" + match.group(4)

    return _REGION_RE.sub(replace, text)


def stale_pages() -> list[Path]:
    return [page for page in sorted(DOCS.rglob("*.md")) if render(page.read_text()) != page.read_text()]


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = stale_pages()
    if check:
        for page in stale:
            print(f"{page.relative_to(DOCS.parent)} is stale: run .venv/bin/python docs/gen_reference.py")
        return 1 if stale else 0
    for page in stale:
        page.write_text(render(page.read_text()))
        print(f"rewrote {page.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
