"""examples/photography, run as its README says: the real ``errands`` CLI serves the example's app,
an admin grants a user credits and mints the user's token, and the user submits works over HTTP.
A completed work is charged; a failed, a timed-out and a cancelled one are given back; a submit
the balance cannot cover is refused; the ledger sums to the balance; the user's set watch brings
each work's progress and end as they happen. Then the example's page in a real browser."""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.conftest import Cluster, eventually
from tests.acceptance.test_browser import browser  # noqa: F401 - the fixture
from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.acceptance

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "photography"
USER = "user-7"


def serve_example(cluster: Cluster, env: dict[str, str] | None = None) -> tuple[str, httpx.Client]:
    """``errands serve --app app:app`` with the example on PYTHONPATH, as the README runs it."""
    _, admin = cluster.serve("--app", "app:app", env={"PYTHONPATH": str(EXAMPLE), **(env or {})})
    return str(admin.base_url).rstrip("/"), admin


def as_user(cluster: Cluster, api: str, admin: httpx.Client) -> httpx.Client:
    """The user's client: an owner token minted with the admin key, as the app's backend does."""
    minted = admin.post("/v1/tokens", json={"owner": USER, "ttl_s": 3600})
    assert minted.status_code == 201, minted.text
    assert minted.json()["owner"] == USER
    user = httpx.Client(
        base_url=api, headers={"Authorization": f"Bearer {minted.json()['token']}"}, timeout=10
    )
    cluster.clients.append(user)
    return user


def submit(user: httpx.Client, task_id: str, prompt: str, steps: int, step_s: float, **body: Any) -> int:
    """Submit a work as the user; the status of the answer."""
    work = {"prompt": prompt, "steps": steps, "step_s": step_s}
    answer = user.post("/v1/tasks", json={"type": "photography", "id": task_id, "input": work, **body})
    return answer.status_code


def credits(user: httpx.Client) -> tuple[int, int]:
    [mine] = user.get("/v1/credits").json()["balances"]
    return mine["balance"], mine["reserved"]


class SetWatch:
    """The user's watch of all their works (SSE, ``GET /v1/watch``), read in a thread until each
    awaited work has ended."""

    def __init__(self, user: httpx.Client, ends: set[str]) -> None:
        self.items: list[tuple[str, dict[str, Any]]] = []
        self.error: BaseException | None = None
        self._ends = ends
        self._thread = threading.Thread(target=self._read, args=(user,), daemon=True)
        self._thread.start()
        eventually(lambda: self.items or self.error, 20, what="the watch's snapshot")
        assert self.error is None, self.error
        assert self.items[0] == ("tasks.snapshot", {**self.items[0][1], "tasks": []})

    def _read(self, user: httpx.Client) -> None:
        try:
            with user.stream(
                "GET", "/v1/watch", params={"type": "photography"}, timeout=httpx.Timeout(10, read=30)
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                event, data = "", ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: "):
                        data = line[6:]
                    elif not line and data:
                        self.items.append((event, json.loads(data)))
                        event, data = "", ""
                        if self._ends <= self.ended():
                            return
        except BaseException as exc:  # handed to the test
            self.error = exc

    def ended(self) -> set[str]:
        final = ("task.completed", "task.failed", "task.timeout", "task.cancelled")
        return {data["task"]["id"] for event, data in self.items if event in final}

    def of(self, task_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [
            (event, data["task"]) for event, data in self.items if data.get("task", {}).get("id") == task_id
        ]

    def join(self) -> None:
        self._thread.join(60)
        assert self.error is None, self.error
        assert not self._thread.is_alive(), f"the watch saw only {self.ended()} end"


def test_works_are_charged_on_success_and_refunded_otherwise_and_watched_live(cluster: Cluster) -> None:
    api, admin = serve_example(cluster)
    granted = admin.post("/v1/credits", json={"owner": USER, "amount": 20, "note": "welcome"})
    assert granted.status_code == 200, granted.text
    assert granted.json()["balance"] == 20
    user = as_user(cluster, api, admin)
    assert credits(user) == (20, 0)
    watch = SetWatch(user, ends={"sunset", "long", "declined", "hurried"})

    # Two works reserve all 20 credits; a third cannot be covered: 402, and nothing is written.
    assert submit(user, "sunset", "a sunset over the sea", 5, 0.6) == 202
    assert submit(user, "long", "a city at night", 100, 0.5) == 202
    assert credits(user) == (0, 20)
    work = {"prompt": "an nsfw poster", "steps": 4, "step_s": 0.3}
    refused = user.post("/v1/tasks", json={"type": "photography", "id": "declined", "input": work})
    assert refused.status_code == 402, refused.text
    assert refused.json()["error"]["code"] == "insufficient_credits"
    assert user.get("/v1/tasks/declined").status_code == 404
    assert credits(user)[0] == 0

    # The completed work is charged: its credits leave the reserved ones, the balance stays.
    done = eventually(lambda: (t := user.get("/v1/tasks/sunset").json())["status"] == "completed" and t, 30)
    assert done["cost"] == 10 and done["progress"] == 100
    assert done["result"]["image"].startswith("data:image/svg+xml,")
    eventually(lambda: credits(user) == (0, 10), 10, what="the charge")

    # The running work, cancelled by its owner, gives its credits back.
    eventually(lambda: user.get("/v1/tasks/long").json()["progress"] > 0, 30, what="long to make progress")
    cancelled = user.post("/v1/tasks/long/cancel")
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["status"] == "cancelled"
    assert credits(user) == (10, 0)

    # The user buys more; the refused submit, sent again, is accepted now. The model declines it
    # half-way (failed, refunded); another, given 1 s an attempt, times out twice (refunded once).
    assert admin.post("/v1/credits", json={"owner": USER, "amount": 20}).json()["balance"] == 30
    assert submit(user, "declined", "an nsfw poster", 4, 0.3) == 202
    assert submit(user, "hurried", "a fox", 20, 0.5, timeout_s=1) == 202
    watch.join()

    declined, hurried = user.get("/v1/tasks/declined").json(), user.get("/v1/tasks/hurried").json()
    assert declined["status"] == "failed" and declined["error"]["code"] == "content_rejected"
    assert hurried["status"] == "timeout" and hurried["error"]["code"] == "timeout"
    assert hurried["attempt"] == 2
    eventually(lambda: credits(user) == (30, 0), 10, what="the refunds")

    # The ledger: every move once, summing to the balance and to what is reserved.
    ledger = user.get("/v1/credits/ledger", params={"limit": 500}).json()
    assert ledger["next_after"] is None
    entries = ledger["entries"]
    assert sum(e["amount"] for e in entries) == 30
    assert sum(e["held"] for e in entries) == 0
    moves: dict[str | None, list[str]] = {}
    for entry in entries:
        moves.setdefault(entry["task_id"], []).append(entry["kind"])
    assert moves == {
        None: ["grant", "grant"],
        "sunset": ["reserve", "charge"],
        "long": ["reserve", "release"],
        "declined": ["reserve", "release"],
        "hurried": ["reserve", "release"],
    }

    # The set watch brought each work's progress as it was made, and its end, live.
    sunset = watch.of("sunset")
    assert [e for e, _ in sunset][:2] == ["task.created", "task.processing"]
    assert sunset[-1][0] == "task.completed" and sunset[-1][1]["progress"] == 100
    steps = [t for e, t in sunset if e == "task.progress"]
    assert len(steps) >= 2, sunset
    assert [t["progress"] for t in steps] == sorted({t["progress"] for t in steps})
    assert all(t["message"].endswith(" of 5") for t in steps)
    assert "task.progress" in [e for e, _ in watch.of("long")]
    assert watch.of("long")[-1][0] == "task.cancelled"
    # The refused submit wrote nothing: the work's first event is the one of its second submit.
    declined_events = [e for e, _ in watch.of("declined")]
    assert declined_events[:2] == ["task.created", "task.processing"] and declined_events[-1] == "task.failed"
    assert set(declined_events[2:-1]) <= {"task.progress"}
    hurried_events = [e for e, _ in watch.of("hurried")]
    assert "task.retrying" in hurried_events and hurried_events[-1] == "task.timeout"
    seqs = [data["seq"] for _, data in watch.items]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[str, Callable[[str], str]]]:
    """The app's web server: the example's page, and ``/token``, which mints the signed-in user's
    owner token with the admin key (here the user is always USER)."""
    root = tmp_path / "site"
    root.mkdir()
    state: dict[str, str] = {}

    class Backend(SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/token":
                super().do_GET()
                return
            minted = httpx.post(
                state["api"] + "/v1/tokens",
                json={"owner": USER, "ttl_s": 3600},
                headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            )
            self.send_response(minted.status_code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(minted.content)))
            self.end_headers()
            self.wfile.write(minted.content)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Backend, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    origin = f"http://127.0.0.1:{server.server_address[1]}"

    def publish(api: str) -> str:
        """Serve page.html pointed at ``api`` (its one setting); answers the page's URL."""
        state["api"] = api
        page = (EXAMPLE / "page.html").read_text()
        assert 'content="http://127.0.0.1:8000"' in page
        (root / "page.html").write_text(page.replace('content="http://127.0.0.1:8000"', f'content="{api}"'))
        return f"{origin}/page.html"

    yield origin, publish
    server.shutdown()
    server.server_close()


def test_the_page_lists_the_users_works_live(
    cluster: Cluster,
    browser: Any,  # noqa: F811
    site: tuple[str, Callable[[str], str]],
) -> None:
    origin, publish = site
    api, admin = serve_example(cluster, env={"ERRANDS_CORS_ORIGINS": origin})
    admin.post("/v1/credits", json={"owner": USER, "amount": 30}).raise_for_status()
    user = as_user(cluster, api, admin)
    # A work made before the page opens is listed with its photo.
    assert submit(user, "earlier", "a harbour", 6, 0.5) == 202
    eventually(lambda: user.get("/v1/tasks/earlier").json()["status"] == "completed", 30)

    context = browser.new_context()
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(publish(api))
    page.wait_for_selector('#live[data-transport="sse"]', timeout=30_000)
    page.wait_for_selector('li[data-id="earlier"][data-status="completed"] img[src^="data:image/svg"]')
    page.wait_for_selector('#credits[data-balance="20"]')

    # A work the user submits elsewhere (another tab, the mini-program) appears, moves and completes.
    assert submit(user, "lighthouse", "a lighthouse", 6, 0.75) == 202
    row = 'li[data-id="lighthouse"]'
    page.wait_for_selector(f'{row}[data-status="processing"] >> text=/step [1-5] of 6/', timeout=30_000)
    assert page.locator("#works li").first.get_attribute("data-id") == "lighthouse"
    page.wait_for_selector(f'{row}[data-status="completed"] img[src^="data:image/svg"]', timeout=30_000)
    page.wait_for_selector('#credits[data-balance="10"]')

    # Through the page's form: a work at the default pace, a second one the balance cannot cover,
    # and the first cancelled: its credits come back.
    page.fill("#prompt", "a forest in the fog")
    page.click("#new-work button")
    made = page.locator("#works li.work", has_text="a forest in the fog")
    made.locator(".cancel").wait_for(state="visible")
    page.wait_for_selector('#credits[data-balance="0"]')
    page.fill("#prompt", "one more")
    page.click("#new-work button")
    page.wait_for_selector("#notice >> text=Not enough credits")
    made.locator(".cancel").click()
    page.wait_for_selector('#works li.work[data-status="cancelled"] >> text=credits were returned')
    page.wait_for_selector('#credits[data-balance="10"]')
    assert made.locator(".cancel").is_hidden()

    assert errors == []
    assert page.locator('#live[data-transport="sse"]').count() == 1, "no fallback where SSE works"
    strays = [u for u in requested if not u.startswith((api, origin, "data:"))]
    assert strays == [], strays
    context.close()


def test_where_watching_is_impossible_the_page_polls(
    cluster: Cluster,
    browser: Any,  # noqa: F811
    site: tuple[str, Callable[[str], str]],
) -> None:
    """A network that lets neither an event stream nor a WebSocket through: the page falls back
    to polling, and the user's works and credits still move."""
    origin, publish = site
    api, admin = serve_example(cluster, env={"ERRANDS_CORS_ORIGINS": origin})
    admin.post("/v1/credits", json={"owner": USER, "amount": 10}).raise_for_status()
    user = as_user(cluster, api, admin)
    context = browser.new_context()
    page = context.new_page()
    page.route("**/v1/watch*", lambda route: route.abort())
    page.route_web_socket("**/v1/ws*", lambda ws: ws.close())
    page.goto(publish(api))
    page.wait_for_selector('#live[data-transport="poll"]', timeout=30_000)
    page.wait_for_selector('#credits[data-balance="10"]')
    assert submit(user, "polled", "a quiet street", 4, 0.5) == 202
    page.wait_for_selector('li[data-id="polled"]', timeout=30_000)
    page.wait_for_selector('#credits[data-balance="0"]')
    page.wait_for_selector('li[data-id="polled"][data-status="completed"] img[src^="data:image/svg"]')
    context.close()
