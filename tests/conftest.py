"""Fixtures shared by every level of the suite."""

from __future__ import annotations

import os

import pytest

ADMIN_KEY = "eka_test-admin-key"
SECRET = "test-token-secret"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings read ERRANDS_* variables; the developer's own must not leak into tests."""
    for name in list(os.environ):
        if name.startswith("ERRANDS_"):
            monkeypatch.delenv(name)
