"""docs/guarantees.md names, for each guarantee, the tests that prove it: every one of them must exist."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TEST_REFERENCE = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def test_every_test_named_in_the_guarantees_exists() -> None:
    text = (REPO / "docs" / "guarantees.md").read_text()
    references = set(TEST_REFERENCE.findall(text))
    assert len(references) >= 40, "the guarantees page should name the tests that prove it"
    missing = [f"{path}::{name}" for path, name in sorted(references)
               if not (REPO / path).is_file() or not re.search(rf"^def {name}\(", (REPO / path).read_text(), re.M)]
    assert missing == [], f"docs/guarantees.md names tests that do not exist: {missing}"
