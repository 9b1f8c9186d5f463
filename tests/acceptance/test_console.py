"""The operations console in a real browser (Debian's Chromium, driven by Playwright) against the
real CLI: live list, filters, cancel and retry, owner tokens, and not one request outside errands.

``UPDATE_SCREENSHOTS=1`` writes the screenshots of the main views into ``docs/``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import Cluster, eventually, wait_status
from tests.acceptance.test_browser import browser  # noqa: F401 - the fixture
from tests.conftest import ADMIN_KEY

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    return DOCS if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path


@pytest.fixture
def page_of(browser: Any) -> Iterator[Any]:  # noqa: F811
    contexts = []

    def open_page(api: str, requested: list[str]) -> Any:
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        contexts.append(context)
        page = context.new_page()
        page.on("request", lambda request: requested.append(request.url))
        page.on("dialog", lambda dialog: dialog.accept())
        page.goto(f"{api}/console")
        return page

    yield open_page
    for context in contexts:
        context.close()


def shown(page: Any) -> list[str]:
    """The ids of the rows the list shows (the page's CSP allows no script from strings:
    conditions are polled from here)."""
    ids: list[str] = page.eval_on_selector_all("#tasks tbody tr", "rows => rows.map(r => r.dataset.id)")
    return ids


def sign_in(page: Any, token: str) -> None:
    page.fill("#token", token)
    page.click("#sign-in-form button")
    page.wait_for_selector("#view-tasks:not([hidden])", timeout=30_000)


def test_the_console_shows_tasks_live_and_acts_on_them(
    cluster: Cluster, page_of: Any, tmp_path: Path, shots: Path
) -> None:
    env = {"ERRANDS_PROGRESS_INTERVAL_S": "0", "ERRANDS_NOTIFY_ALLOW_NETWORKS": "127.0.0.0/8"}
    _, client = cluster.serve("--app", "sample_app:app", env=env)
    api = str(client.base_url).rstrip("/")
    requested: list[str] = []
    page = page_of(api, requested)
    sign_in(page, ADMIN_KEY)
    assert ADMIN_KEY not in page.url

    # A task submitted through the API appears without a reload, and its progress moves.
    client.post("/v1/tasks", json={"type": "steps", "id": "live-1", "input": {"dir": str(tmp_path)}})
    live = 'tr[data-id="live-1"]'
    page.wait_for_selector(f'{live}[data-status="processing"]', timeout=30_000)
    for step in (1, 2):
        (tmp_path / f"step-{step}").touch()
        page.wait_for_selector(f"{live} >> text=step {step} of 4", timeout=30_000)
    assert page.get_attribute(f"{live} .bar", "title") == "50%"
    page.wait_for_selector('.count[data-status="processing"] >> text=1', timeout=30_000)

    # A failed task, and a filter that narrows the list to it.
    ok_file = tmp_path / "ok"
    client.post("/v1/tasks", json={"type": "flaky", "id": "flaky-1", "input": {"ok_file": str(ok_file)}})
    wait_status(client, "flaky-1", "failed")
    page.wait_for_selector('tr[data-id="flaky-1"][data-status="failed"]', timeout=30_000)
    page.screenshot(path=str(shots / "console-tasks.png"))
    page.fill('#filters input[name="type"]', "flaky")
    page.click('#filters button[type="submit"]')
    eventually(lambda: shown(page) == ["flaky-1"], what="the list narrowed to the failed task")
    # A status filter: a task that comes into the status appears without a reload.
    page.fill('#filters input[name="type"]', "")
    page.select_option('#filters select[name="status"]', "failed")
    page.click('#filters button[type="submit"]')
    eventually(lambda: shown(page) == ["flaky-1"], what="the list of failed tasks")
    never = str(tmp_path / "never")
    client.post("/v1/tasks", json={"type": "flaky", "id": "flaky-2", "input": {"ok_file": never}})
    page.wait_for_selector('tr[data-id="flaky-2"][data-status="failed"]', timeout=30_000)
    assert shown(page) == ["flaky-2", "flaky-1"]

    # Retried from the console, it runs again (and now succeeds).
    page.click('tr[data-id="flaky-1"]')
    page.wait_for_selector("#retry", timeout=30_000)
    ok_file.touch()
    page.click("#retry")
    page.wait_for_selector("#task-status >> text=completed", timeout=30_000)
    assert client.get("/v1/tasks/flaky-1").json()["status"] == "completed"
    drawn = page.inner_text("#view-task")
    # Its parts are drawn, and those it has not (an error) are left out, not printed as "null".
    assert '"ok": true' in drawn and "[object" not in drawn and "null" not in drawn
    page.screenshot(path=str(shots / "console-task.png"), full_page=True)

    # Cancelled from the console, the running task ends cancelled.
    page.goto(f"{api}/console#/task/live-1")
    page.wait_for_selector("#cancel", timeout=30_000)
    # What it streamed so far, as it wrote it.
    page.click("#streams >> text=Show")
    page.wait_for_selector("#streams pre.stream >> text=step 2 done", timeout=30_000)
    page.click("#cancel")
    page.wait_for_selector("#task-status >> text=cancelled", timeout=30_000)
    assert client.get("/v1/tasks/live-1").json()["status"] == "cancelled"

    # The admin pages.
    endpoint = {"url": "http://127.0.0.1:9/errands", "description": "the shop", "events": ["task.completed"]}
    made = client.post("/v1/endpoints", json=endpoint)
    assert made.status_code == 201, made.text
    page.click('#nav a[data-view="charts"]')
    page.wait_for_selector("#chart svg", timeout=30_000)
    page.wait_for_selector("#timings >> text=flaky", timeout=30_000)
    page.screenshot(path=str(shots / "console-charts.png"))
    page.click('#nav a[data-view="endpoints"]')
    page.wait_for_selector("#endpoints >> text=127.0.0.1:9", timeout=30_000)
    page.click("#endpoints >> text=Disable")
    page.wait_for_selector("#endpoints >> text=Enable", timeout=30_000)
    assert client.get("/v1/endpoints").json()["endpoints"][0]["enabled"] is False
    page.screenshot(path=str(shots / "console-endpoints.png"))

    # Nothing was fetched from anywhere but errands.
    assert requested and all(url.startswith(api) for url in requested), requested


def test_an_owner_token_sees_its_own_tasks_and_no_admin_pages(cluster: Cluster, page_of: Any) -> None:
    _, client = cluster.serve("--app", "sample_app:app", "--no-workers")
    api = str(client.base_url).rstrip("/")
    for owner in ("alice", "bob"):
        client.post("/v1/tasks", json={"type": "quick", "id": f"{owner}-1", "owner": owner})
    token = client.post("/v1/tokens", json={"owner": "bob"}).json()["token"]
    requested: list[str] = []
    page = page_of(api, requested)
    sign_in(page, token)
    page.wait_for_selector('tr[data-id="bob-1"]', timeout=30_000)
    client.post("/v1/tasks", json={"type": "quick", "id": "bob-2", "owner": "bob"})
    client.post("/v1/tasks", json={"type": "quick", "id": "alice-2", "owner": "alice"})
    page.wait_for_selector('tr[data-id="bob-2"]', timeout=30_000)
    client.post("/v1/tasks", json={"type": "quick", "id": "bob-3", "owner": "bob"})
    page.wait_for_selector('tr[data-id="bob-3"]', timeout=30_000)  # after alice-2: it was not shown
    assert shown(page) == ["bob-3", "bob-2", "bob-1"]
    page.wait_for_selector('.count[data-status="pending"] >> text=3', timeout=30_000)  # bob's only
    for admin_page in ("charts", "endpoints"):
        assert not page.is_visible(f'#nav a[data-view="{admin_page}"]')
    page.goto(f"{api}/console#/endpoints")
    page.wait_for_selector("#view-tasks:not([hidden])", timeout=30_000)
    assert page.is_hidden("#view-endpoints")
    assert all(url.startswith(api) for url in requested), requested
