"""docs/support.md, pyproject.toml and scripts/oldest-versions.txt name the same floors (the tested ones)."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def oldest_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "scripts" / "oldest-versions.txt").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==([\w.]+)$", line.strip())
        if match:
            pins[match.group(1).lower().replace("_", "-")] = match.group(2)
    return pins


def declared_floors() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("hf", "lightning", "s3"):
        requirements += project["optional-dependencies"][extra]
    floors = {}
    for requirement in requirements:
        match = re.match(r"^([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([\w.]+)", requirement)
        assert match, f"{requirement!r} in pyproject.toml has no floor"
        floors[match.group(1).lower().replace("_", "-")] = match.group(2)
    return floors


def same_version(floor: str, pinned: str) -> bool:
    return pinned == floor or pinned.startswith(floor + ".") or floor == ".".join(pinned.split(".")[: floor.count(".") + 1])


def test_every_runtime_floor_is_the_version_the_oldest_stack_runs() -> None:
    pins, floors = oldest_pins(), declared_floors()
    for package, floor in floors.items():
        if package == "torch":
            continue  # the venv takes torch 2.13.0 from this machine's disk, installed before the pins
        assert package in pins, f"{package}>={floor} is declared but the oldest stack does not run it"
        assert same_version(floor, pins[package]), f"{package}: floor {floor}, oldest stack runs {pins[package]}"


def test_the_support_page_shows_every_oldest_version() -> None:
    rows = {}
    for name, floor in re.findall(r"^\| ([A-Za-z0-9_.-]+)[^|]* \| ([\w.]+) \|", (ROOT / "docs" / "support.md").read_text(), re.M):
        rows[name.lower().replace("_", "-")] = floor
    for package, version in oldest_pins().items():
        if package in ("moto", "pytest", "pytest-timeout"):
            continue
        assert rows.get(package) == version, f"docs/support.md does not show {package} {version} as the floor"
