"""The documentation runs: generated reference pages are current, and every complete program in it works.

Convention (also stated in docs/index.md): a fenced ```python or ```bash block whose first line is
`# runnable` is a complete program. The runnable blocks of one page run in order, each in its own
process, in one fresh temporary folder per page (so a bash block may use files an earlier block made).
Bash blocks run with `set -euo pipefail` and the virtualenv's bin folder first on PATH.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[2] / "docs"
MARKER = "# runnable"
_BLOCK_RE = re.compile(r"^```(?P<lang>python|bash)\n(?P<code>.*?)^```$", re.M | re.S)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    lang: str
    code: str


def runnable_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(str(page.relative_to(DOCS)), text[: m.start()].count("\n") + 1, m["lang"], m["code"])
            for m in _BLOCK_RE.finditer(text) if m["code"].startswith(MARKER + "\n")]


PAGES = sorted(p for p in DOCS.rglob("*.md") if runnable_blocks(p))


def test_every_getting_started_page_has_a_runnable_program() -> None:
    names = {str(p.relative_to(DOCS)) for p in PAGES}
    assert {"getting-started/hf.md", "getting-started/lightning.md", "getting-started/pytorch.md",
            "engines.md", "transactions.md", "cli.md"} <= names


def test_generated_reference_is_current() -> None:
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    stale = [str(p.relative_to(DOCS)) for p in generator.stale_pages()]
    assert stale == [], f"stale generated docs {stale}: run .venv/bin/python docs/gen_reference.py"


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(DOCS)) for p in PAGES])
def test_runnable_blocks_of_the_page_succeed(page: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    for index, block in enumerate(runnable_blocks(page)):
        script = tmp_path / f"block{index}.{'py' if block.lang == 'python' else 'sh'}"
        script.write_text(block.code if block.lang == "python" else "set -euo pipefail\n" + block.code)
        command = [sys.executable, script.name] if block.lang == "python" else ["bash", script.name]
        proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (
            f"{block.page}:{block.line} ({block.lang}) exited {proc.returncode}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
        )
