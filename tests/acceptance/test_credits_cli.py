"""Credits under SIGKILL, with the real CLI on both stores: however often the process dies as
tasks end (between a commit and its answer, between a task's end and what follows), every task
ends once, its cost reserved once and charged or given back once, and the ledger sums to the
balance after every crash."""

from __future__ import annotations

import json
import signal
import subprocess
from typing import Any

import httpx
import pytest

from tests.acceptance.conftest import ERRANDS, Cluster, eventually, task_status

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


def ledger(client: httpx.Client) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get("/v1/credits/ledger", params={"owner": "acct", "after": after, "limit": 500}).json()
        entries += page["entries"]
        if page["next_after"] is None:
            return entries
        after = page["next_after"]


def books(client: httpx.Client) -> tuple[list[dict[str, Any]], dict[str, Any], list[dict[str, Any]]] | None:
    """The ledger, the balance and the ended tasks as of one moment: read between two reads of
    the ledger that agree (every move of credits adds an entry in the transaction that makes it,
    so nothing moved in between); ``None`` while tasks keep ending."""
    first = ledger(client)
    [balance] = client.get("/v1/credits").json()["balances"]
    done = ended(client)
    return (first, balance, done) if ledger(client) == first else None


def check_books(client: httpx.Client, granted: int) -> None:
    """The ledger sums to the balance and the reserved credits, and each ended task's cost was
    reserved once and settled once; what is reserved is what the unfinished tasks hold."""
    entries, balance, done = eventually(lambda: books(client), 60, what="the books between two moves")
    assert sum(e["amount"] for e in entries) == balance["balance"]
    assert sum(e["held"] for e in entries) == balance["reserved"]
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


COLUMNS = [
    "day", "owner", "type", "submitted", "completed", "failed", "timeout", "cancelled", "open",
    "charged", "held",
]  # fmt: skip


def test_grant_and_usage_from_the_cli(cluster: Cluster) -> None:
    _, client = cluster.serve("--app", "sample_app:app")
    env = {**cluster.env, "ERRANDS_URL": str(client.base_url)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ERRANDS, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    granted = run("grant", "acct", "10", "--note", "trial", "--json")
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout) | {"updated_at": None} == {
        "owner": "acct", "balance": 10, "reserved": 0, "updated_at": None
    }  # fmt: skip
    for i, fail in enumerate((False, True)):
        body = {"type": "priced", "id": f"u-{i}", "owner": "acct", "input": {"fail": fail}}
        assert client.post("/v1/tasks", json=body).status_code == 202
    for i, status in enumerate(("completed", "failed")):
        eventually(lambda i=i, status=status: task_status(client, f"u-{i}")["status"] == status, 60)
    usage = json.loads(run("usage", "--json").stdout)
    assert [(u["owner"], u["type"], u["submitted"], u["credits_charged"]) for u in usage] == [
        ("acct", "priced", 2, 3)
    ]
    assert usage[0]["statuses"]["completed"] == 1 and usage[0]["statuses"]["failed"] == 1
    table = run("usage", "--owner", "acct").stdout.splitlines()
    assert table[0].split() == COLUMNS
    assert table[1].split()[1:] == ["acct", "priced", "2", "1", "1", "0", "0", "0", "3", "0"]
    # A take-back below zero, a day not written as one: refused with the API's reason, exit 1.
    refused = run("grant", "acct", "-1000")  # a negative amount as written, no "--" needed
    assert refused.returncode == 1 and "has 7 credits" in refused.stderr
    bad_day = run("usage", "--since", "yesterday")
    assert bad_day.returncode == 1 and "YYYY-MM-DD" in bad_day.stderr
