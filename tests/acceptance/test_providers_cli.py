"""External providers through the real CLI: the demo's fake_ai, and a chaos run."""

from __future__ import annotations

from typing import Any

from tests.acceptance.conftest import Cluster, eventually, listening_url, task_status


def test_the_demo_runs_an_external_task_out_of_the_box(cluster: Cluster) -> None:
    proc, client = cluster.serve()
    proc.wait_for(r"fake_ai tasks run on a development provider at http://127\.0\.0\.1:\d+")
    task = client.post("/v1/tasks", json={"type": "fake_ai", "input": {"prompt": "a cat"}}).json()
    done = eventually(lambda: (t := task_status(client, task["id"]))["status"] == "completed" and t)
    assert done["result"]["echo"] == {"prompt": "a cat"}
    assert done["webhook_received"] is True


def test_chaos_against_the_dev_provider_cli(cluster: Cluster) -> None:
    chaos = [
        "--port", "0", "--delay-s", "0.3", "--steps", "3", "--jitter-s", "0.05", "--seed", "7",
        "--drop", "0.3", "--duplicate", "0.3", "--bad-signature", "0.2", "--reorder", "0.5", "--fail", "0.25",
    ]  # fmt: skip
    provider = cluster.start("dev-provider", *chaos, name="dev-provider")
    _, client = cluster.serve(
        env={"ERRANDS_DEV_PROVIDER_URL": listening_url(provider), "ERRANDS_SWEEP_INTERVAL_S": "0.5"}
    )
    ids = [
        client.post("/v1/tasks", json={"type": "fake_ai", "input": {"i": i}}).json()["id"] for i in range(30)
    ]
    finals: dict[str, dict[str, Any]] = {}

    def all_ended() -> bool:
        for task_id in ids:
            if task_id not in finals:
                task = task_status(client, task_id)
                if task["status"] in ("completed", "failed", "timeout", "cancelled"):
                    finals[task_id] = task
        return len(finals) == len(ids)

    eventually(all_ended, timeout_s=90, what="every task to end")
    statuses = {t["status"] for t in finals.values()}
    assert statuses <= {"completed", "failed"}
    assert "completed" in statuses and "failed" in statuses  # both outcomes occurred
    for task_id, final in finals.items():
        events = client.get(f"/v1/tasks/{task_id}/events").json()["events"]
        assert sum(e["task"]["status"] in ("completed", "failed") for e in events) == 1
        assert events[-1]["task"]["status"] == final["status"]
        progress = [e["task"]["progress"] for e in events if e["task"]["status"] == "processing"]
        assert progress == sorted(progress)
    deliveries = client.get("/v1/webhook-deliveries", params={"limit": 500}).json()["deliveries"]
    outcomes = {d["outcome"] for d in deliveries}
    assert {"applied", "unauthorized"} <= outcomes  # the badly signed ones were refused
