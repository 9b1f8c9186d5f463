"""Many nodes and workers on one PostgreSQL database, as real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.acceptance.conftest import Cluster, eventually, served_url, sse_lines, task_status
from tests.conftest import ADMIN_KEY

pytestmark = pytest.mark.postgres

FAST = {
    "ERRANDS_LEASE_S": "1.5",
    "ERRANDS_SWEEP_INTERVAL_S": "0.3",
    "ERRANDS_RETRY_BASE_S": "0.05",
    "ERRANDS_WATCH_KEEPALIVE_S": "1",
}


class Watcher(threading.Thread):
    """Watches every task on one node; when that node dies, resumes on the next one."""

    def __init__(self, urls: list[str]) -> None:
        super().__init__(daemon=True)
        self.urls = urls
        self.events: list[dict[str, Any]] = []
        self.snapshot_seq: int | None = None
        self.stop_flag = threading.Event()
        self.reconnects = 0

    def run(self) -> None:
        last: int | None = None
        node = 0
        while not self.stop_flag.is_set():
            try:
                for event, data, seq in sse_lines(self.urls[node], "/v1/watch", last):
                    if event == "tasks.snapshot":
                        self.snapshot_seq = seq
                    elif event.startswith("task."):
                        self.events.append(orjson.loads(data))
                    if seq is not None:
                        last = seq
                    if self.stop_flag.is_set():
                        return
            except httpx.HTTPError:
                pass
            self.reconnects += 1
            node = (node + 1) % len(self.urls)
            time.sleep(0.2)


def all_events(client: httpx.Client) -> list[dict[str, Any]]:
    tasks = client.get("/v1/tasks", params={"limit": 200}).json()["tasks"]
    out = []
    for task in tasks:
        out.extend(client.get(f"/v1/tasks/{task['id']}/events").json()["events"])
    return sorted(out, key=lambda e: e["seq"])


def test_two_nodes_two_workers_kill_a_worker_and_a_node(pg_cluster: Cluster, tmp_path: Path) -> None:
    app = ("--app", "sample_app:app")
    _, client_a = pg_cluster.serve("--no-workers", *app, env=FAST)
    node_b, client_b = pg_cluster.serve("--no-workers", *app, env=FAST)
    worker_1 = pg_cluster.worker(*app, env=FAST)
    worker_2 = pg_cluster.worker(*app, env=FAST)
    watcher = Watcher([str(client_b.base_url), str(client_a.base_url)])  # on B first: B will die
    watcher.start()
    eventually(lambda: watcher.snapshot_seq is not None, what="the watch to start")
    gate = tmp_path / "gate"
    held = [
        client_b.post("/v1/tasks", json={"type": "hold", "input": {"gate": str(gate)}}).json()["id"]
        for _ in range(4)
    ]
    quick = [client_b.post("/v1/tasks", json={"type": "quick"}).json()["id"] for _ in range(20)]
    eventually(
        lambda: all(task_status(client_a, t)["status"] == "completed" for t in quick), what="quick tasks"
    )
    eventually(
        lambda: all(task_status(client_a, t)["status"] == "processing" for t in held),
        what="held tasks to start",
    )
    holders = {task_status(client_a, t)["message"].split()[-1] for t in held}
    victim = worker_1 if str(worker_1.pid) in holders else worker_2
    victim.signal(signal.SIGKILL)
    node_b.signal(signal.SIGKILL)
    more = [client_a.post("/v1/tasks", json={"type": "quick"}).json()["id"] for _ in range(10)]
    gate.touch()
    everything = held + quick + more
    eventually(
        lambda: all(task_status(client_a, t)["status"] == "completed" for t in everything),
        timeout_s=60,
        what="every task to complete after the kills",
    )
    log = all_events(client_a)
    eventually(lambda: len(watcher.events) >= len([e for e in log if e["seq"] > (watcher.snapshot_seq or 0)]))
    watcher.stop_flag.set()
    seen = [e["seq"] for e in watcher.events]
    assert seen == sorted(set(seen)), "in order, no duplicate"
    assert seen == [e["seq"] for e in log if e["seq"] > (watcher.snapshot_seq or 0)], "no gap"
    assert watcher.reconnects >= 1
    for task_id in everything:
        kinds = [e["type"] for e in client_a.get(f"/v1/tasks/{task_id}/events").json()["events"]]
        assert kinds.count("task.completed") == 1, (task_id, kinds)
    survivor_pid = worker_2.pid if victim is worker_1 else worker_1.pid
    for task_id in held:
        if str(victim.pid) in " ".join(
            e["task"]["message"] or "" for e in client_a.get(f"/v1/tasks/{task_id}/events").json()["events"]
        ):
            assert task_status(client_a, task_id)["result"]["pid"] == survivor_pid


def _restart_postgres() -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None or os.geteuid() != 0, reason="needs root and pg_ctlcluster"
)
def test_a_postgres_restart_mid_run_loses_nothing(pg_cluster: Cluster) -> None:
    node, client = pg_cluster.serve("--app", "sample_app:app", env=FAST)
    pg_cluster.worker("--app", "sample_app:app", env=FAST)
    watcher = Watcher([str(client.base_url)])
    watcher.start()
    eventually(lambda: watcher.snapshot_seq is not None, what="the watch to start")
    before = [client.post("/v1/tasks", json={"type": "quick"}).json()["id"] for _ in range(10)]
    _restart_postgres()
    after: list[str] = []

    def submit_after_restart() -> bool:
        try:
            r = client.post("/v1/tasks", json={"type": "quick", "id": f"after-{len(after)}"})
        except httpx.HTTPError:
            return False
        if r.status_code in (200, 202):
            after.append(r.json()["id"])
        return len(after) >= 10

    eventually(submit_after_restart, timeout_s=60, what="the node to accept tasks again")
    everything = before + after
    eventually(
        lambda: all(task_status(client, t)["status"] == "completed" for t in everything),
        timeout_s=60,
        what="every task to complete after the restart",
    )
    ready = client.get("/readyz")
    assert ready.status_code == 200, f"{ready.text}\n{node.output()[-4000:]}"
    log = all_events(client)
    expected = [e["seq"] for e in log if e["seq"] > (watcher.snapshot_seq or 0)]
    eventually(
        lambda: [e["seq"] for e in watcher.events] == expected, timeout_s=30, what="the watcher to catch up"
    )
    watcher.stop_flag.set()
    assert "listening for events failed" in node.output()  # the restart was seen, and healed
    assert watcher.reconnects == 0  # the node stayed up: its watchers never noticed


@pytest.mark.parametrize("round_", range(3))
def test_nodes_started_all_at_once_on_a_fresh_database_all_come_up(pg_cluster: Cluster, round_: int) -> None:
    """Every node migrates, stores the shared secrets and generates what it needs at the same
    moment on an empty database: each must come up, and all must agree on the secrets (a token
    minted by one is accepted by every other)."""
    nodes = [pg_cluster.start("serve", "--port", "0", name="serve") for _ in range(3)]
    workers = [pg_cluster.start("worker", "--app", "sample_app:app", name="worker") for _ in range(3)]
    urls = [served_url(node, timeout_s=60) for node in nodes]
    for worker in workers:
        worker.wait_for(r"errands worker \S+ is running", timeout_s=60)
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    token = httpx.post(f"{urls[0]}/v1/tokens", json={"owner": "alice"}, headers=headers, timeout=10).json()[
        "token"
    ]
    for url in urls:
        r = httpx.get(f"{url}/v1/tasks", params={"access_token": token}, timeout=10)
        assert r.status_code == 200, r.text
    for proc in [*nodes, *workers]:
        assert "Traceback" not in proc.output()
