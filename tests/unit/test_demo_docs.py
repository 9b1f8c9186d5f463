"""The docs list the demo's task types, all of them and no other (the README's first commands
run against the demo)."""

from __future__ import annotations

import re
from pathlib import Path

from errands import demo

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def test_the_docs_list_every_task_type_of_the_demo() -> None:
    section = OPERATIONS.read_text().split("### The demo app", 1)[1].split("\n\n", 3)[2]
    listed = re.findall(r"^\| `(\w+)` \|", section, re.M)
    assert sorted(listed) == sorted(demo.app.task_types)
