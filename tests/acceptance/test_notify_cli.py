"""Notifications survive a process killed mid-delivery: the real CLI, SIGKILL, a restart."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import Cluster, eventually, wait_status

NOTIFY_ENV = {
    "ERRANDS_NOTIFY_ALLOW_NETWORKS": "127.0.0.0/8",
    "ERRANDS_NOTIFY_LEASE_S": "1",
    "ERRANDS_NOTIFY_POLL_S": "0.1",
}


class Receiver:
    """A webhook receiver in a thread; the first request is held until ``release`` is set."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []
        self.arrived = threading.Event()
        self.release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver.requests.append({k.lower(): v for k, v in self.headers.items()})
                first = len(receiver.requests) == 1
                receiver.arrived.set()
                if first:
                    receiver.release.wait(30)
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def test_a_delivery_cut_off_by_sigkill_is_sent_again_after_restart(
    cluster: Cluster, receiver: Receiver
) -> None:
    proc, client = cluster.serve(env=NOTIFY_ENV)
    r = client.post("/v1/endpoints", json={"url": receiver.url, "events": ["task.completed"]})
    assert r.status_code == 201, r.text
    task_id = client.post("/v1/tasks", json={"type": "echo", "input": {"n": 1}}).json()["id"]
    wait_status(client, task_id, "completed")
    assert receiver.arrived.wait(20), "the first delivery never arrived"
    proc.signal(signal.SIGKILL)  # killed while the receiver holds the request
    proc.popen.wait(10)
    receiver.release.set()
    _, client = cluster.serve(env=NOTIFY_ENV)
    eventually(lambda: client.get(f"/v1/tasks/{task_id}").json()["notification_sent"], what="notified")
    ids = [h["webhook-id"] for h in receiver.requests]
    assert len(ids) == 2 and ids[0] == ids[1]
    (message,) = client.get("/v1/messages", params={"task_id": task_id}).json()["messages"]
    assert message["id"] == ids[0] and message["state"] == "delivered" and message["attempts"] == 2


def test_a_hook_whose_process_died_before_it_was_recorded_runs_again(
    cluster: Cluster, tmp_path: Path
) -> None:
    log = tmp_path / "hook.log"
    env = {**NOTIFY_ENV, "SAMPLE_HOOK_LOG": str(log), "SAMPLE_HOOK_CRASH": "1"}
    proc, client = cluster.serve("--app", "sample_app:app", env=env)
    task_id = client.post("/v1/tasks", json={"type": "quick"}).json()["id"]
    assert proc.popen.wait(20) == -signal.SIGKILL  # the hook killed its own process
    _, client = cluster.serve("--app", "sample_app:app", env=env)
    calls = eventually(lambda: log.exists() and len(lines := log.read_text().splitlines()) >= 2 and lines)
    first, second = (line.split() for line in calls)
    assert first[0] == second[0] and (first[1], second[1]) == ("1", "2") and first[2] == task_id
    # Recorded as done this time: no third call.
    eventually(
        lambda: (
            client.get("/v1/messages", params={"task_id": task_id}).json()["messages"][0]["state"]
            == "delivered"
        ),
        what="the hook recorded as done",
    )
    assert len(log.read_text().splitlines()) == 2
