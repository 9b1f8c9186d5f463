"""An errands process frozen in the middle of a write transaction (SIGSTOP) holds the other
nodes back for ERRANDS_PG_STALL_TIMEOUT_S at most; after SIGCONT or SIGKILL the log has no gap,
no duplicate and no reordering within a task, and no acknowledged task is lost."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from tests.acceptance.conftest import Cluster, Proc, eventually, sse_lines
from tests.conftest import ADMIN_KEY, run_sync

pytestmark = pytest.mark.postgres

STALL_S = 2.0
ENV = {"ERRANDS_PG_STALL_TIMEOUT_S": str(STALL_S), "ERRANDS_WATCH_KEEPALIVE_S": "1"}
LIFE = ["task.created", "task.processing", "task.completed"]


def query(url: str, sql: str, *args: Any) -> list[Any]:
    async def run() -> list[Any]:
        conn = await asyncpg.connect(url)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    rows: list[Any] = run_sync(run())
    return rows


def local_ports(pid: int) -> set[int]:
    """The local ports of the TCP sockets process ``pid`` holds (its database connections)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def sessions_of(db: str, pid: int) -> list[Any]:
    """(backend pid, state, backend_xid, wait_event_type, wait_event) of the sessions of
    errands' that process ``pid`` has."""
    return query(
        db,
        "SELECT pid, state, backend_xid::text, wait_event_type, wait_event FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = 'errands' "
        "AND client_port = ANY($1::int[])",
        sorted(local_ports(pid)),
    )


class Submitter(threading.Thread):
    """Submits quick tasks to one node, each with an id of its own, again until acknowledged."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=httpx.Timeout(5, read=60)
        )
        self.acked: list[str] = []
        self.tried: list[str] = []
        self.unexpected: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with self.client:
            self._submit()

    def _submit(self) -> None:
        n = 0
        while not self.stopping.is_set():
            task_id = f"a-{n}"
            self.tried.append(task_id)
            while not self.stopping.is_set():
                try:
                    r = self.client.post("/v1/tasks", json={"id": task_id, "type": "quick"})
                except httpx.HTTPError:
                    continue  # the node died or was cut off: the caller resubmits elsewhere
                if r.status_code in (200, 202):
                    self.acked.append(task_id)
                    break
                if r.status_code != 503:  # 503: the write was cut off; try again
                    self.unexpected.append(f"{r.status_code} {r.text}")
            n += 1


class SetWatch(threading.Thread):
    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.events: list[tuple[float, int, str, str]] = []  # (arrived, seq, task id, type)
        self.start_seq: int | None = None
        self.stopping = False

    def run(self) -> None:
        for event, data, seq in sse_lines(self.url, "/v1/watch", None):
            if event == "tasks.snapshot":
                self.start_seq = seq
            elif event.startswith("task."):
                body = orjson.loads(data)
                self.events.append((time.monotonic(), body["seq"], body["task"]["id"], body["type"]))
            if self.stopping:
                return

    def arrived(self, task_id: str, kind: str) -> float | None:
        return next((at for at, _, t, k in list(self.events) if t == task_id and k == kind), None)


def freeze_in_a_write(node: Proc, db: str, submitter: Submitter) -> tuple[int, str]:
    """SIGSTOP ``node`` until it is caught with a write transaction open (a session of its
    idle in a transaction that has an id); returns that session's backend pid and xid."""
    for _ in range(500):
        acked = len(submitter.acked)
        node.signal(signal.SIGSTOP)
        # What the server was running when the process stopped ends by itself: wait for that,
        # or until what is left waits (for the stopped process to read a result, or for a lock
        # that one of its own sessions holds).
        seen: list[Any] = []

        def settled(seen: list[Any] = seen) -> Any:
            seen[:] = sessions_of(db, node.pid)
            return seen and all(r[1] != "active" or r[3] in ("Client", "Lock") for r in seen) and seen

        try:
            sessions = eventually(settled, 10, what="the stopped node's sessions to settle")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {seen}") from None
        caught = [(r[0], r[2]) for r in sessions if r[1] == "idle in transaction" and r[2] is not None]
        if caught:
            return caught[0]
        node.signal(signal.SIGCONT)
        eventually(lambda n=acked: len(submitter.acked) > n + 2, 20, what="the node to write again")
    raise AssertionError("never caught the node in the middle of a write")


def check_log(db: str, watch: SetWatch, tasks: set[str]) -> None:
    """Every task's events in the log are its whole life, once each, in order; the set watch
    received exactly the log's events after it began, in order."""
    rows = query(db, "SELECT seq, task_id, type FROM errands_events ORDER BY seq")
    by_task: dict[str, list[str]] = {}
    for _, task_id, kind in rows:
        by_task.setdefault(task_id, []).append(kind)
    assert set(by_task) == tasks
    wrong = {t: kinds for t, kinds in by_task.items() if kinds != LIFE}
    assert wrong == {}
    assert watch.start_seq is not None
    logged = [(seq, task_id, kind) for seq, task_id, kind in rows if seq > watch.start_seq]
    assert [(seq, t, k) for _, seq, t, k in watch.events] == logged


@pytest.mark.parametrize("then", ["SIGCONT", "SIGKILL"])
def test_a_node_frozen_in_a_write_holds_the_others_back_only_for_the_bound(
    pg_cluster: Cluster, then: str
) -> None:
    app = ("--app", "sample_app:app")
    node_a, _ = pg_cluster.serve("--no-workers", *app, env=ENV)
    _, client_b = pg_cluster.serve("--no-workers", *app, env=ENV)
    pg_cluster.worker(*app, env=ENV)
    watch = SetWatch(str(client_b.base_url))
    watch.start()
    eventually(lambda: watch.start_seq is not None, what="the watch to start")
    submitter = Submitter(f"http://127.0.0.1:{pg_cluster.clients[0].base_url.port}")
    submitter.start()
    try:
        eventually(lambda: len(submitter.acked) >= 20, 30, what="node A to take tasks")
        frozen_pid, _xid = freeze_in_a_write(node_a, pg_cluster.db, submitter)
        frozen_at = time.monotonic()

        # The other node goes on while A stays stopped: its tasks' events reach its watch once
        # the server has ended A's transaction (ERRANDS_PG_STALL_TIMEOUT_S), and not before.
        b_tasks = [f"b-{i}" for i in range(5)]
        for task_id in b_tasks:
            assert client_b.post("/v1/tasks", json={"id": task_id, "type": "quick"}).status_code == 202
        eventually(
            lambda: all(watch.arrived(t, "task.completed") for t in b_tasks), 30, what="B's tasks to be seen"
        )
        first = min(watch.arrived(t, "task.created") or 0.0 for t in b_tasks) - frozen_at
        assert not query(pg_cluster.db, "SELECT 1 FROM pg_stat_activity WHERE pid = $1", frozen_pid)
        assert node_a.popen.poll() is None  # still there, still stopped
        print(f"\nB's first event reached its watch {first:.2f} s after A froze (the bound: {STALL_S} s)")

        node_a.signal(signal.SIGCONT if then == "SIGCONT" else signal.SIGKILL)
        if then == "SIGCONT":
            acked = len(submitter.acked)
            eventually(lambda: len(submitter.acked) > acked + 20, 30, what="node A to take tasks again")
    finally:
        submitter.stopping.set()
        submitter.join(70)
    assert submitter.unexpected == []
    # What A never acknowledged is submitted again, to B (submitting twice is safe).
    for task_id in sorted(set(submitter.tried) - set(submitter.acked)):
        assert client_b.post("/v1/tasks", json={"id": task_id, "type": "quick"}).status_code in (200, 202)
    everything = set(submitter.tried) | set(b_tasks)
    eventually(
        lambda: all(watch.arrived(t, "task.completed") for t in everything), 60, what="every task to complete"
    )
    watch.stopping = True
    check_log(pg_cluster.db, watch, everything)
