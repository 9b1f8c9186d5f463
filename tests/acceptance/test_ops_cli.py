"""Operations against the real CLI: JSON logs that parse line by line, name each task's lines and
keep secrets out; Prometheus metrics of a worker process on a private port."""

from __future__ import annotations

import asyncio
import json

import httpx
import websockets
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.conftest import ADMIN_KEY, Cluster, eventually, metrics_url, wait_status


def test_json_logs_parse_carry_the_task_and_request_and_hide_secrets(cluster: Cluster) -> None:
    proc, client = cluster.serve(
        "--app",
        "sample_app:app",
        env={"ERRANDS_LOG_FORMAT": "json", "ERRANDS_LOG_LEVEL": "info", "ERRANDS_ACCESS_LOG": "true"},
    )
    token = client.post("/v1/tokens", json={"owner": "alice"}).json()["token"]
    answer = client.post("/v1/tasks", json={"type": "chatty", "id": "talk-1", "input": {"what": "it"}})
    request_id = answer.headers["x-request-id"]
    client.post("/v1/tasks", json={"type": "chatty_sync", "id": "talk-2", "input": {"what": "that"}})
    client.post("/v1/tasks", json={"type": "nope"}, headers={"X-Request-Id": "mine-42"})  # a 422
    for task_id in ("talk-1", "talk-2"):
        wait_status(client, task_id, "completed")

    async def watch_with_token_in_the_url() -> None:
        url = str(client.base_url).replace("http://", "ws://") + f"/v1/ws?access_token={token}"
        async with websockets.connect(url):
            pass

    asyncio.run(watch_with_token_in_the_url())
    proc.wait_for(r"WebSocket")  # uvicorn logged the handshake, in errands' format
    lines = [line for line in proc.err_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line parses
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)
    said = {r["message"]: r for r in records if r["logger"] == "sample"}
    assert said["working on it"]["task_id"] == "talk-1" and said["working on it"]["attempt"] == 1
    assert said["a thread says hello"]["task_id"] == "talk-1"
    assert said["sync work on that"]["task_id"] == "talk-2"
    text = "\n".join(lines)
    assert token not in text and ADMIN_KEY not in text
    # uvicorn's line for the handshake names the path without its query string (and the token).
    handshakes = [
        r["message"] for r in records if r["logger"].startswith("uvicorn") and "WebSocket" in r["message"]
    ]
    assert handshakes and all('"WebSocket /v1/ws"' in message for message in handshakes), handshakes
    assert "access_token" not in text
    # The access log: one line per request, with its id (the client's, or one errands made).
    access = [r for r in records if r["logger"] == "errands.access"]
    refused = next(r for r in access if r.get("request_id") == "mine-42")
    assert refused["message"].startswith("POST /v1/tasks 422 ")
    created = next(r for r in access if r.get("request_id") == request_id)
    assert created["message"].startswith("POST /v1/tasks 202 ")
    assert any(r["message"] == "WEBSOCKET /v1/ws 101" for r in access)


def test_a_worker_process_serves_its_metrics_on_a_private_port(cluster: Cluster) -> None:
    _, client = cluster.serve("--no-workers", "--app", "sample_app:app")
    worker = cluster.worker("--app", "sample_app:app", env={"ERRANDS_METRICS_LISTEN": "127.0.0.1:0"})
    metrics = metrics_url(worker)
    for i in range(3):
        client.post("/v1/tasks", json={"type": "quick", "id": f"q-{i}"})
    for i in range(3):
        wait_status(client, f"q-{i}", "completed")

    def finished() -> float | None:
        text = httpx.get(metrics, timeout=5).text  # no key on this port
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "errands_tasks_finished_total" and sample.labels == {
                    "type": "quick",
                    "status": "completed",
                }:
                    return sample.value if sample.value == 3 else None
        return None

    assert eventually(finished, what="the worker's count of finished tasks") == 3
    # The API's own /metrics takes the admin key; the server's process created the tasks.
    assert httpx.get(f"{client.base_url}/metrics").status_code == 401
    served = client.get("/metrics").text
    assert 'errands_tasks_submitted_total{type="quick"} 3.0' in served
