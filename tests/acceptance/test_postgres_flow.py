"""Flow control across worker processes on one PostgreSQL database: the limits are the store's,
so three processes together keep them as one would."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from tests.acceptance.conftest import Cluster, eventually

pytestmark = pytest.mark.postgres

RATE_PER_KEY = 10.0  # sample_app's "metered": Limit(rate="10/s", per="key") ...
BURST = 1  # ... whose burst is a tenth of a second's worth (at least one)
CONCURRENCY = 3  # ... and Limit(concurrency=3) in all
#: The API gives times in milliseconds: each start may read up to 1 ms early or late.
ROUNDING_S = 0.002


def seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def test_rate_and_concurrency_hold_across_worker_processes_and_keys_share(
    pg_cluster: Cluster, tmp_path: Path
) -> None:
    log = tmp_path / "flow.log"
    env = {"SAMPLE_FLOW_LOG": str(log), "ERRANDS_CONCURRENCY": "8"}
    app = ("--app", "sample_app:app")
    _, client = pg_cluster.serve("--no-workers", *app, env=env)
    for _ in range(3):
        pg_cluster.worker(*app, env=env)
    # Key "a" queues far more than one claim reads (8 free slots: 64 tasks), then key "b" a few:
    # a claim must look past a's backlog, held back by a's rate, to find b's.
    # The rates (20/s for both keys) stay far below what 3 slots can run on a busy machine (a
    # slot's turn may take 150 ms), so the rates, not the shared concurrency, pace the keys.
    bodies = [{"type": "metered", "id": f"a-{i:03d}", "key": "a"} for i in range(80)]
    bodies += [{"type": "metered", "id": f"b-{i:03d}", "key": "b"} for i in range(15)]
    answer = client.post("/v1/tasks/batch", json={"tasks": bodies})
    assert answer.status_code == 200 and all(r["status"] == 202 for r in answer.json()["results"])

    def all_done() -> list[dict[str, object]] | None:
        tasks = client.get("/v1/tasks", params={"type": "metered", "limit": 200}).json()["tasks"]
        return tasks if len(tasks) == len(bodies) and all(t["status"] == "completed" for t in tasks) else None

    tasks = eventually(all_done, timeout_s=90, what="every metered task to complete")
    starts = {key: sorted(seconds(str(t["started_at"])) for t in tasks if t["key"] == key) for key in "ab"}

    # The rate, per key, over every stretch of time: at most burst + rate x its length.
    for times in starts.values():
        for i in range(len(times)):
            for j in range(i, len(times)):
                allowed = BURST + RATE_PER_KEY * (times[j] - times[i] + ROUNDING_S)
                assert j - i + 1 <= allowed + 1e-9, (i, j, times[j] - times[i])

    # Concurrency, from the handlers' own log: never more than 3 running at once in all.
    marks = []
    for line in log.read_text().splitlines():
        kind, at, _ = line.split()
        marks.append((float(at), 0 if kind == "exit" else 1))
    running = peak = 0
    for _, enter in sorted(marks):  # at a tie, an exit counts before an entry
        running += 1 if enter else -1
        peak = max(peak, running)
    assert 1 <= peak <= CONCURRENCY and running == 0

    # Fair between keys: b did not wait behind a's backlog; it ran at its own rate meanwhile.
    assert starts["b"][-1] < starts["a"][40]
    # And every worker process took part (the limits are shared, not per process).
    assert len({t["result"]["pid"] for t in tasks}) == 3  # type: ignore[index]
