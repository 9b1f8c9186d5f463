"""The real ``errands`` command, started as a subprocess and spoken to over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

from errands.store.migrations import migrations
from tests.acceptance.conftest import ERRANDS, Cluster, eventually, task_status, wait_status
from tests.conftest import ADMIN_KEY


def test_serve_runs_the_demo_app_end_to_end(cluster: Cluster) -> None:
    proc, client = cluster.serve()
    r = client.post("/v1/tasks", json={"type": "sleep", "input": {"seconds": 0.5}, "id": "demo-1"})
    assert r.status_code == 202
    done = wait_status(client, "demo-1", "completed")
    assert done["result"] == {"slept_s": 0.5} and done["progress"] == 100
    types = [e["type"] for e in client.get("/v1/tasks/demo-1/events").json()["events"]]
    assert types[:2] == ["task.created", "task.processing"] and types[-1] == "task.completed"
    assert "task.progress" in types
    assert client.get("/healthz").json() == {"status": "ok"}
    assert ADMIN_KEY not in proc.output()


def test_cli_delays_tasks_and_manages_schedules(cluster: Cluster) -> None:
    _, client = cluster.serve()
    env = {**cluster.env, "ERRANDS_URL": str(client.base_url)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [ERRANDS, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 0, done.stderr
        return done

    later = json.loads(run("submit", "echo", "--delay", "3600", "--start-within", "60").stdout)
    assert later["status"] == "pending" and later["scheduled_for"] and later["start_by"]
    at = json.loads(run("submit", "echo", "--run-at", "2000-01-01T00:00:00+08:00", "--wait").stdout)
    assert at["status"] == "completed" and at["scheduled_for"] is None  # a time past: at once
    shown = json.loads(run("schedules", "set", "nightly", "--cron", "0 3 * * *", "--type", "echo",
                           "--tz", "Asia/Shanghai", "--input", '{"n": 1}').stdout)  # fmt: skip
    assert shown["next_at"].endswith("T19:00:00.000Z") and len(shown["next_runs"]) == 5
    assert "nightly" in run("schedules", "list").stdout
    assert json.loads(run("schedules", "pause", "nightly").stdout)["paused"] is True
    assert "paused" in run("schedules", "list").stdout
    assert json.loads(run("schedules", "resume", "nightly").stdout)["paused"] is False
    run("schedules", "delete", "nightly")
    assert "no schedules" in run("schedules", "list").stdout
    bad = subprocess.run([ERRANDS, "schedules", "set", "x", "--cron", "0 25 * * *", "--type", "echo"],
                         env=env, capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert bad.returncode != 0 and "cron" in bad.stderr


def test_first_start_generates_and_prints_an_admin_key_once(cluster: Cluster) -> None:
    del cluster.env["ERRANDS_ADMIN_KEY"]
    first, _ = cluster.serve()
    key = first.wait_for(r"ERRANDS_ADMIN_KEY=(eka_\S+)").group(1)
    assert first.stop() == 0
    second, client = cluster.serve()
    assert "eka_" not in second.output()
    r = client.get("/v1/tasks", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200


def test_cli_client_commands(cluster: Cluster) -> None:
    _, client = cluster.serve()
    env = {**cluster.env, "ERRANDS_URL": str(client.base_url)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [ERRANDS, *args], env=env, capture_output=True, text=True, timeout=60, check=False
        )

    submitted = run("submit", "echo", "--input", '{"hello": "world"}', "--wait")
    assert submitted.returncode == 0, submitted.stderr
    assert '"status": "completed"' in submitted.stdout and '"hello": "world"' in submitted.stdout
    failed = run("submit", "fail", "--wait")
    assert failed.returncode == 1 and '"status": "failed"' in failed.stdout
    listed = run("tasks")
    assert listed.returncode == 0 and "echo" in listed.stdout and "completed" in listed.stdout
    stats = run("stats")
    assert stats.returncode == 0 and '"by_status"' in stats.stdout
    token = run("token", "alice", "--read-only").stdout.strip()
    assert token.startswith("eto_")
    refused = run("submit", "echo", "--token", token)
    assert refused.returncode == 1 and "scope" in refused.stderr
    bad = run("submit", "echo", "--input", "{nope")
    assert bad.returncode == 2 and bad.stderr.strip() == "--input is not valid JSON."

    # One task: get, events, cancel, retry; aligned text for people, --json for scripts.
    done_id = json.loads(submitted.stdout)["id"]
    failed_id = json.loads(failed.stdout)["id"]
    shown = run("get", done_id)
    assert shown.returncode == 0 and re.search(r"^status +completed$", shown.stdout, re.M), shown.stdout
    as_json = json.loads(run("get", done_id, "--json").stdout)
    assert as_json["result"] == {"hello": "world"}
    # Times as the API writes them.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", as_json["created_at"])
    log = run("events", done_id)
    assert log.returncode == 0 and [line.split()[1] for line in log.stdout.splitlines()] == [
        "task.created", "task.processing", "task.completed"
    ]  # fmt: skip
    assert re.search(r"\d{2}:\d{2}:\d{2}\.\d{3}Z", log.stdout)  # as the API writes times
    assert [e["type"] for e in json.loads(run("events", done_id, "--json").stdout)][-1] == "task.completed"
    ended = run("cancel", done_id)
    assert ended.returncode == 1 and "already completed" in ended.stderr
    again = run("retry", failed_id, "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["status"] in ("pending", "processing", "failed")
    missing = run("get", "no-such-task")
    assert missing.returncode == 1 and missing.stderr.strip() and not missing.stdout
    assert {t["id"] for t in json.loads(run("tasks", "--json").stdout)} >= {done_id, failed_id}


def test_restart_keeps_every_acknowledged_task_and_event(cluster: Cluster) -> None:
    proc, client = cluster.serve("--no-workers")
    ids = []
    for i in range(20):
        r = client.post("/v1/tasks", json={"type": "echo", "input": {"i": i}})
        assert r.status_code == 202
        ids.append(r.json()["id"])
    client.post(f"/v1/tasks/{ids[0]}/cancel").raise_for_status()
    before = {i: (task_status(client, i), client.get(f"/v1/tasks/{i}/events").json()) for i in ids}
    assert proc.stop() == 0
    _, client = cluster.serve("--no-workers")
    after = {i: (task_status(client, i), client.get(f"/v1/tasks/{i}/events").json()) for i in ids}
    assert after == before


def test_sigterm_lets_a_running_task_finish(cluster: Cluster) -> None:
    proc, client = cluster.serve()
    client.post("/v1/tasks", json={"type": "sleep", "input": {"seconds": 1}, "id": "s1"}).raise_for_status()
    wait_status(client, "s1", "processing")
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(30) == 0
    _, client = cluster.serve("--no-workers")
    assert task_status(client, "s1")["status"] == "completed"


def test_a_killed_worker_task_completes_on_another_exactly_once(cluster: Cluster, tmp_path: Path) -> None:
    fast = {"ERRANDS_LEASE_S": "1", "ERRANDS_SWEEP_INTERVAL_S": "0.2", "ERRANDS_RETRY_BASE_S": "0.05"}
    _, client = cluster.serve("--no-workers", "--app", "sample_app:app", env=fast)
    doomed = cluster.worker("--app", "sample_app:app", env=fast)
    gate = tmp_path / "gate"
    client.post(
        "/v1/tasks", json={"type": "hold", "id": "k1", "input": {"gate": str(gate)}}
    ).raise_for_status()
    eventually(
        lambda: task_status(client, "k1")["message"] == f"held by {doomed.pid}", what="worker A to hold k1"
    )
    doomed.signal(signal.SIGKILL)
    doomed.popen.wait(10)
    survivor = cluster.worker("--app", "sample_app:app", env=fast)
    done = wait_status(client, "k1", "completed", "failed")
    assert done["status"] == "completed"
    assert done["result"] == {"pid": survivor.pid, "attempt": 2}
    types = [e["type"] for e in client.get("/v1/tasks/k1/events").json()["events"]]
    assert types.count("task.completed") == 1
    assert "task.retrying" in types


def test_a_paused_worker_that_wakes_up_cannot_write_its_late_result(cluster: Cluster, tmp_path: Path) -> None:
    fast = {"ERRANDS_LEASE_S": "1", "ERRANDS_SWEEP_INTERVAL_S": "0.2", "ERRANDS_RETRY_BASE_S": "0.05"}
    _, client = cluster.serve("--no-workers", "--app", "sample_app:app", env=fast)
    paused = cluster.worker("--app", "sample_app:app", env=fast)
    gate = tmp_path / "gate"
    client.post(
        "/v1/tasks", json={"type": "hold", "id": "p1", "input": {"gate": str(gate)}}
    ).raise_for_status()
    eventually(
        lambda: task_status(client, "p1")["message"] == f"held by {paused.pid}", what="worker A to hold p1"
    )
    paused.signal(signal.SIGSTOP)  # a process that stalls (GC pause, VM freeze) while holding a task
    other = cluster.worker("--app", "sample_app:app", env=fast)
    done = wait_status(client, "p1", "completed")
    assert done["result"] == {"pid": other.pid, "attempt": 2}
    events_before = client.get("/v1/tasks/p1/events").json()
    gate.touch()  # the stalled handler would now finish with its own result...
    paused.signal(signal.SIGCONT)  # ...when its process wakes up
    paused.wait_for(r"task p1 stopped on worker \S+: lost|outcome of task p1 was refused")
    assert client.get("/v1/tasks/p1/events").json() == events_before
    assert task_status(client, "p1")["result"] == {"pid": other.pid, "attempt": 2}


def _start_error(
    cluster: Cluster, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ERRANDS, *args],
        env={**cluster.env, **(env or {})},
        cwd=cluster.workdir,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_start_up_errors_are_one_plain_sentence(cluster: Cluster) -> None:
    cases = [
        (("serve", "--db", "mysql://x"), "The database URL must start with"),
        (("serve", "--app", "no_such_module:app"), "Cannot import the app module 'no_such_module'"),
        (("serve", "--app", "sample_app:nothing"), "'sample_app:nothing' is not an errands app"),
        (
            ("worker", "--db", "sqlite:///" + str(cluster.workdir / "missing" / "dir" / "x.db")),
            "Cannot open the SQLite",
        ),
        (("serve", "--port", "99999"), "ERRANDS_PORT"),
    ]
    for args, expected in cases:
        result = _start_error(cluster, *args)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, result.stderr)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _start_error(cluster, "serve", "--port", str(port))
        assert result.returncode == 2
        assert result.stderr.strip() == (
            f"Port {port} on 127.0.0.1 is already in use: choose another with --port N (ERRANDS_PORT), "
            "or --port 0 for any free port."
        )


def test_migrate_command(cluster: Cluster) -> None:
    first = _start_error(cluster, "migrate")
    versions = [v for v, _, _ in migrations("sqlite")]
    assert first.returncode == 0 and f"applied migrations {versions}" in first.stdout
    again = _start_error(cluster, "migrate")
    assert again.returncode == 0 and "up to date" in again.stdout
    assert os.path.exists(cluster.workdir / "errands.db")


def test_types_lists_what_an_app_runs_and_python_m_errands_is_the_command(cluster: Cluster) -> None:
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=60, check=False)

    listed = run(ERRANDS, "types")  # the demo's
    assert listed.returncode == 0 and re.search(r"^fake_ai +provider dev +timeout 300 s", listed.stdout, re.M)
    as_json = run(sys.executable, "-m", "errands", "types", "--json", "--app", "sample_app:app")
    metered = next(t for t in json.loads(as_json.stdout) if t["type"] == "metered")
    assert metered["runs_on"] == "handler" and any("per key" in limit for limit in metered["limits"])
    missing = run(ERRANDS, "types", "--app", "nope:app")
    assert missing.returncode == 2 and "nope" in missing.stderr
