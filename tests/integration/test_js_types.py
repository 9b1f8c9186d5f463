"""errands.js's declarations (errands.d.ts) compile against how the docs use the client, with the
TypeScript compiler the suite installs (package.json; ``./dev test`` runs ``npm ci``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TSC = ROOT / "node_modules" / ".bin" / "tsc"


def test_the_declarations_of_errands_js_check_with_tsc() -> None:
    if not TSC.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("tsc is not installed (./dev test runs npm ci)")
        pytest.skip("tsc is not installed: run npm ci")
    checked = subprocess.run(
        [str(TSC), "-p", str(ROOT / "tests" / "js" / "tsconfig.json")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def test_the_declarations_are_served_beside_the_client(tmp_path: Path) -> None:
    from errands import Errands
    from errands.config import Settings
    from errands.runtime import Runtime
    from tests.integration.conftest import http

    runtime = Runtime(Errands(), Settings(db=f"sqlite:///{tmp_path / 'errands.db'}"))
    async with http(runtime, None) as client:
        answer = await client.get("/client/errands.d.ts")
    assert answer.status_code == 200 and "export function watchTask" in answer.text
