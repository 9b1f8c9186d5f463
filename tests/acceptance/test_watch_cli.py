"""Watching through the real CLI and the SDK against real ``errands serve`` processes."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from typing import Any

from errands import Client
from tests.acceptance.conftest import ERRANDS, Cluster, eventually, task_status
from tests.conftest import ADMIN_KEY


def test_errands_watch_follows_a_task_and_exits_by_outcome(cluster: Cluster) -> None:
    _, client = cluster.serve()
    env = {**cluster.env, "ERRANDS_URL": str(client.base_url)}
    ok = client.post("/v1/tasks", json={"type": "sleep", "input": {"seconds": 1}}).json()
    result = subprocess.run(
        [ERRANDS, "watch", ok["id"]], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "completed" in result.stderr and "100%" in result.stderr
    bad = client.post("/v1/tasks", json={"type": "fail", "input": {"message": "no luck"}}).json()
    result = subprocess.run(
        [ERRANDS, "watch", bad["id"]], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "failed" in result.stderr and "no luck" in result.stderr
    waited = subprocess.run(
        [ERRANDS, "submit", "sleep", "--input", '{"seconds": 0.5}', "--wait"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert waited.returncode == 0 and '"status": "completed"' in waited.stdout


def test_the_sdk_watch_survives_a_server_crash_and_restart(cluster: Cluster) -> None:
    fast = {"ERRANDS_LEASE_S": "1", "ERRANDS_SWEEP_INTERVAL_S": "0.2", "ERRANDS_RETRY_BASE_S": "0.05"}
    first, client = cluster.serve(env=fast)
    port = client.base_url.port
    task = client.post("/v1/tasks", json={"type": "sleep", "input": {"seconds": 3}}).json()
    received: list[Any] = []
    failure: list[BaseException] = []

    def watch() -> None:
        try:
            with Client(str(client.base_url), ADMIN_KEY) as sdk:
                received.extend(sdk.watch(task["id"]))
        except BaseException as exc:  # reported by the assertion below
            failure.append(exc)

    watcher = threading.Thread(target=watch)
    watcher.start()
    eventually(lambda: any(e.type == "task.progress" for e in received), what="progress before the crash")
    first.signal(signal.SIGKILL)  # the server dies mid-task, with its worker
    first.popen.wait(10)
    _, restarted = cluster.serve(env=fast, port=port)
    watcher.join(60)
    assert not watcher.is_alive() and not failure, failure
    assert received[-1].type == "task.completed"
    log = [e["seq"] for e in restarted.get(f"/v1/tasks/{task['id']}/events").json()["events"]]
    assert [e.seq for e in received[1:]] == [s for s in log if s > received[0].seq]  # no gap, no duplicate
    assert task_status(restarted, task["id"])["attempt"] == 2


def test_errands_watch_prints_what_the_task_streams(cluster: Cluster) -> None:
    _, client = cluster.serve()
    env = {**cluster.env, "ERRANDS_URL": str(client.base_url)}
    task = client.post("/v1/tasks", json={"type": "write", "input": {"words": 80, "every_s": 0.01}}).json()
    result = subprocess.run(
        [ERRANDS, "watch", task["id"]], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    stored = client.get(f"/v1/tasks/{task['id']}/streams/text").text
    assert len(stored.split(" ")) == 80 and result.stdout == stored
    # submit --wait prints the task's JSON, not what it streams.
    waited = subprocess.run(
        [ERRANDS, "submit", "write", "--input", '{"words": 5, "every_s": 0}', "--wait"],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert waited.returncode == 0 and json.loads(waited.stdout)["status"] == "completed"


def test_the_sdk_stream_resumes_across_a_server_crash_and_shows_the_retry(cluster: Cluster) -> None:
    fast = {"ERRANDS_LEASE_S": "1", "ERRANDS_SWEEP_INTERVAL_S": "0.2", "ERRANDS_RETRY_BASE_S": "0.05"}
    first, client = cluster.serve(env=fast)
    port = client.base_url.port
    body = {"type": "write", "input": {"words": 120, "every_s": 0.02}, "max_attempts": 2}
    task = client.post("/v1/tasks", json=body).json()
    received: list[Any] = []
    failure: list[BaseException] = []

    def read() -> None:
        try:
            with Client(str(client.base_url), ADMIN_KEY) as sdk:
                received.extend(sdk.stream(task["id"], "text"))
        except BaseException as exc:  # reported by the assertion below
            failure.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    eventually(lambda: len(received) > 10, what="chunks before the crash")
    first.signal(signal.SIGKILL)  # the server dies mid-stream, with its worker
    first.popen.wait(10)
    _, restarted = cluster.serve(env=fast, port=port)
    reader.join(60)
    assert not reader.is_alive() and not failure, failure
    by_attempt: dict[int, list[Any]] = {}
    for chunk in received:
        by_attempt.setdefault(chunk.attempt, []).append(chunk)
    assert sorted(by_attempt) == [1, 2]
    for attempt, chunks in by_attempt.items():
        assert [c.index for c in chunks] == list(range(len(chunks)))
        stored = restarted.get(f"/v1/tasks/{task['id']}/streams/text", params={"attempt": attempt})
        assert "".join(c.value for c in chunks) == stored.text
    assert len(by_attempt[2]) == 120
