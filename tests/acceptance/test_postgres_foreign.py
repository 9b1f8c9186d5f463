"""Nobody else's transaction holds errands back: while another application keeps a transaction
open on the same PostgreSQL server for 30 s, every event of tasks run by a separate worker
process reaches a watch of the task, a set watch and an outbound endpoint as usual; when it
ends, nothing arrives twice."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import Cluster, eventually, sse_lines
from tests.conftest import PG_ADMIN_URL
from tests.foreign import KINDS, Foreign

pytestmark = pytest.mark.postgres

HOLD_S = 30.0
ENV = {
    "ERRANDS_NOTIFY_ALLOW_NETWORKS": "127.0.0.0/8",
    "ERRANDS_WATCH_KEEPALIVE_S": "1",
}
#: Every event of one task run by the sample app's "hold" handler, in order.
LIFE = ["task.created", "task.processing", "task.progress", "task.completed"]


class Arrivals:
    """Events as a consumer received them, with the time each arrived."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[float, str, str, int]] = []  # (arrived, task id, type, seq)

    def add(self, task_id: str, kind: str, seq: int) -> None:
        with self.lock:
            self.seen.append((time.monotonic(), task_id, kind, seq))

    def of(self, task_id: str) -> list[tuple[float, str, int]]:
        with self.lock:
            return [(at, kind, seq) for at, t, kind, seq in self.seen if t == task_id]

    def arrived(self, task_id: str, kind: str) -> float | None:
        return next((at for at, k, _ in self.of(task_id) if k == kind), None)

    def duplicates(self) -> list[Any]:
        with self.lock:
            keys = [(t, kind, seq) for _, t, kind, seq in self.seen]
        return sorted({k for k in keys if keys.count(k) > 1})


class Watching(threading.Thread):
    """One SSE watch (of one task or of a set), until it ends or is stopped."""

    def __init__(self, base_url: str, path: str) -> None:
        super().__init__(daemon=True)
        self.base_url, self.path = base_url, path
        self.arrivals = Arrivals()
        self.ready = threading.Event()
        self.stopping = False

    def run(self) -> None:
        for event, data, _seq in sse_lines(self.base_url, self.path, None):
            if event.endswith("snapshot"):
                self.ready.set()
            elif event.startswith("task."):
                body = orjson.loads(data)
                self.arrivals.add(body["task"]["id"], body["type"], body["seq"])
            if self.stopping:
                return


class Endpoint:
    """An outbound endpoint's receiver, answering 200 at once."""

    def __init__(self) -> None:
        self.arrivals = Arrivals()
        self.ids: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = orjson.loads(self.rfile.read(int(self.headers.get("content-length", "0"))))
                task = body["data"]["task"]
                endpoint.ids.append(self.headers["webhook-id"])
                endpoint.arrivals.add(task["id"], body["type"], task["seq"])
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint() -> Iterator[Endpoint]:
    e = Endpoint()
    yield e
    e.close()


def run_one(client: httpx.Client, set_watch: Watching, endpoint: Endpoint, tmp: Path, name: str) -> float:
    """One task through its whole life, run by the separate worker; returns the longest time
    any consumer waited for its completion after the handler was let go."""
    gate = tmp / f"gate-{name}"
    submitted = client.post("/v1/tasks", json={"id": name, "type": "hold", "input": {"gate": str(gate)}})
    task_id = submitted.json()["id"]
    eventually(lambda: set_watch.arrivals.arrived(task_id, "task.progress"), 10, what=f"{name} to start")
    one = Watching(str(client.base_url), f"/v1/tasks/{task_id}/watch")
    one.start()
    assert one.ready.wait(10), "the task watch did not start"
    gate.touch()
    released = time.monotonic()
    consumers = {"task watch": one.arrivals, "set watch": set_watch.arrivals, "endpoint": endpoint.arrivals}
    eventually(
        lambda: (
            all(a.arrived(task_id, "task.completed") for a in consumers.values())
            # ...and the event that says the endpoint has it
            and set_watch.arrivals.arrived(task_id, "task.notified")
        ),
        10,
        what=f"every consumer to receive {name}'s completion",
    )
    one.join(10)
    expected = {"task watch": LIFE[3:], "set watch": [*LIFE, "task.notified"], "endpoint": LIFE}
    for what, arrivals in consumers.items():
        assert [kind for _, kind, _ in arrivals.of(task_id)] == expected[what], what
    return max((a.arrived(task_id, "task.completed") or 0.0) - released for a in consumers.values())


@pytest.mark.parametrize("kind", KINDS)
def test_a_foreign_transaction_holds_nothing_back(
    pg_cluster: Cluster, endpoint: Endpoint, tmp_path: Path, kind: str
) -> None:
    app = ("--app", "sample_app:app")
    _, client = pg_cluster.serve("--no-workers", *app, env=ENV)
    pg_cluster.worker(*app, env=ENV)
    assert client.post("/v1/endpoints", json={"url": endpoint.url, "events": ["task.*"]}).status_code == 201
    set_watch = Watching(str(client.base_url), "/v1/watch")
    set_watch.start()
    assert set_watch.ready.wait(10)
    usual = [run_one(client, set_watch, endpoint, tmp_path, f"before-{i}") for i in range(3)]

    foreign = Foreign(pg_cluster.db, PG_ADMIN_URL, kind).open()
    held_since = time.monotonic()
    during: list[float] = []
    try:
        while time.monotonic() - held_since < HOLD_S:
            during.append(run_one(client, set_watch, endpoint, tmp_path, f"during-{len(during)}"))
            assert foreign.is_open
    finally:
        foreign.end()
    assert len(during) >= 3

    # Once it has ended: one more task goes through, and nothing arrived twice.
    run_one(client, set_watch, endpoint, tmp_path, "after")
    set_watch.stopping = True
    for what, arrivals in (("set watch", set_watch.arrivals), ("endpoint", endpoint.arrivals)):
        assert arrivals.duplicates() == [], what
    assert len(endpoint.ids) == len(set(endpoint.ids))
    print(
        f"\n{kind}: completion reached every consumer in {statistics.median(usual) * 1000:.0f} ms "
        f"(median) before, {statistics.median(during) * 1000:.0f} ms while held ({len(during)} tasks, "
        f"longest {max(during) * 1000:.0f} ms)"
    )
