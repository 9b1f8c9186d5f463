"""Credits under SIGKILL, with the real CLI on both stores: however often the process dies as
tasks end (between a commit and its answer, between a task's end and what follows), every task
ends once, its cost reserved once and charged or given back once, and the ledger sums to the
balance after every crash."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest

from tests.acceptance.conftest import Cluster, eventually

pytestmark = pytest.mark.acceptance

FAST = {"ERRANDS_LEASE_S": "1", "ERRANDS_SWEEP_INTERVAL_S": "0.2", "ERRANDS_RETRY_BASE_S": "0.05"}
N = 60


def ended(client: httpx.Client) -> list[dict[str, Any]]:
    tasks: list[dict[str, Any]] = []
    for status in ("completed", "failed"):
        tasks += client.get("/v1/tasks", params={"status": status, "type": "priced", "limit": 200}).json()[
            "tasks"
        ]
    return tasks


def check_books(client: httpx.Client, granted: int) -> None:
    """The ledger sums to the balance and the reserved credits, and each ended task's cost was
    reserved once and settled once; what is reserved is what the unfinished tasks hold."""
    entries: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get("/v1/credits/ledger", params={"owner": "acct", "after": after, "limit": 500}).json()
        entries += page["entries"]
        if page["next_after"] is None:
            break
        after = page["next_after"]
    [balance] = client.get("/v1/credits").json()["balances"]
    assert sum(e["amount"] for e in entries) == balance["balance"]
    assert sum(e["held"] for e in entries) == balance["reserved"]
    done = ended(client)
    by_task: dict[str, list[str]] = {}
    for entry in entries:
        if entry["task_id"] is not None:
            by_task.setdefault(entry["task_id"], []).append(entry["kind"])
    for task in done:
        expected = ["reserve", "charge" if task["status"] == "completed" else "release"]
        assert by_task.get(task["id"]) == expected, (task["id"], task["status"], by_task.get(task["id"]))
    unfinished = N - len(done)
    assert balance["reserved"] == 3 * unfinished
    charged = 3 * sum(t["status"] == "completed" for t in done)
    assert balance["balance"] == granted - charged - 3 * unfinished


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_a_sigkill_as_tasks_end_neither_loses_nor_doubles_a_charge_or_a_refund(
    kind: str, cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    if kind == "postgres":
        cluster = request.getfixturevalue("pg_cluster")
    proc, client = cluster.serve("--app", "sample_app:app", env=FAST)
    client.post("/v1/credits", json={"owner": "acct", "amount": 1000}).raise_for_status()
    body = {
        "tasks": [
            {"type": "priced", "owner": "acct", "id": f"p{i}", "input": {"fail": i % 3 == 0}}
            for i in range(N)
        ]
    }
    answers = client.post("/v1/tasks/batch", json=body).json()["results"]
    assert [a["status"] for a in answers] == [202] * N
    for target in (N // 4, N // 2, (3 * N) // 4):
        eventually(lambda t=target, c=client: len(ended(c)) >= t, 60, what=f"{target} tasks to end")
        proc.signal(signal.SIGKILL)
        proc.popen.wait(10)
        proc, client = cluster.serve("--app", "sample_app:app", env=FAST)
        check_books(client, 1000)
    eventually(lambda: len(ended(client)) == N, 60, what="every task to end")
    check_books(client, 1000)
