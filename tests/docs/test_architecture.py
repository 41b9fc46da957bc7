"""docs/architecture.md names real modules, and every core module is on it (the page cannot drift silently)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = (ROOT / "docs" / "architecture.md").read_text()


def named_paths() -> set[Path]:
    """Paths written out on the page (`ckpt_callbacks/...`), plus the module names of each table row's package."""
    paths = {ROOT / match for match in re.findall(r"`(ckpt_callbacks/[\w/]+(?:\.py)?)`", PAGE)}
    for package, modules in re.findall(r"^\| `(ckpt_callbacks/[\w/]+/)` \| ([^|]*) \|", PAGE, flags=re.M):
        paths |= {ROOT / package / name for name in re.findall(r"`([\w]+\.py|[\w]+/)`", modules)}
    return paths


def test_every_module_the_architecture_page_names_exists() -> None:
    missing = sorted(str(path.relative_to(ROOT)) for path in named_paths() if not path.exists())
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"


def test_every_core_module_is_on_the_architecture_page() -> None:
    named = named_paths()
    core = [path for path in (ROOT / "ckpt_callbacks" / "core").rglob("*.py")
            if path.name != "__init__.py" and "engines" not in path.parts]
    unnamed = sorted(str(path.relative_to(ROOT)) for path in core if path not in named)
    assert not unnamed, f"core modules missing from docs/architecture.md: {unnamed}"
