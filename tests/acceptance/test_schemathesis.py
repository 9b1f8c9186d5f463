"""The OpenAPI document matches the service: a bounded schemathesis run against the real CLI.

Every operation is fuzzed with every check schemathesis has (no 5xx, status codes, content
types, response schemas and headers, SSE events, schema-valid data accepted and schema-invalid
data refused, methods and ``Allow``, auth), once with an admin key on SQLite and once with an
owner token on PostgreSQL. The number of cases and the seed are fixed, so the run is the same on
any machine; a failure prints schemathesis' report with a ``curl`` line to reproduce it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.acceptance.conftest import Cluster
from tests.conftest import ADMIN_KEY

ST = str(Path(sys.executable).parent / "st")

#: Where a schema-valid request may still be refused: the checks that need the world (a
#: notify_url or endpoint URL inside the network or whose name does not resolve, a cursor that
#: this service did not make, a secret given without rotate_secret, a cron expression or time
#: zone that names no time, credits that do not cover a cost or a take-back) are not JSON Schema.
CONFIG = """
max-stream-events = 3
request-timeout = 5

[[operations]]
include-operation-id = [
  "submit", "create_endpoint", "update_endpoint", "list_tasks", "create_schedule", "replace_schedule",
  "bulk",
]
checks.positive_data_acceptance.expected-statuses = [
  "2xx", "400", "401", "402", "403", "404", "409", "422", "429",
]

[[operations]]
# A range of days given backwards or longer than 366 days; a cursor this service did not make.
include-operation-id = ["usage"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "422"]

[[operations]]
include-operation-id = ["grant"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "402", "403"]

[[operations]]
# A byte range that starts past the end of a stream's text is answered 416, as HTTP says.
include-operation-id = ["get_stream"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "401", "403", "404", "416"]

[[operations]]
# An open watch sends keep-alives, not events, until something happens: read it briefly.
include-operation-id = ["watch_task", "watch_tasks"]
request-timeout = 1
"""


def _fuzz(url: str, token: str, workdir: Path, seed: int) -> None:
    config = workdir / "schemathesis.toml"
    config.write_text(CONFIG)
    result = subprocess.run(
        [
            ST, "--config-file", str(config), "run", f"{url}/openapi.json",
            "-H", f"Authorization: Bearer {token}",
            "--checks", "all", "--max-examples", "8", "--seed", str(seed), "--workers", "1",
            "--generation-database", "none", "--no-color",
        ],
        capture_output=True, text=True, cwd=workdir, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-20_000:] + result.stderr[-5000:]


def _seed_data(client: httpx.Client) -> None:
    """A few tasks and an endpoint, so that the stateful phase finds things to read and change."""
    for task_type in ("echo", "fail", "sleep"):
        assert client.post("/v1/tasks", json={"type": task_type, "owner": "alice"}).status_code == 202
    assert client.post("/v1/endpoints", json={"url": "https://93.184.215.14/hook"}).status_code == 201


def test_the_document_holds_for_an_admin_on_sqlite(cluster: Cluster, tmp_path: Path) -> None:
    _, client = cluster.serve(env={"ERRANDS_WATCH_KEEPALIVE_S": "1"})
    _seed_data(client)
    _fuzz(str(client.base_url), ADMIN_KEY, tmp_path, seed=1)


@pytest.mark.postgres
def test_the_document_holds_for_an_owner_token_on_postgres(pg_cluster: Cluster, tmp_path: Path) -> None:
    _, client = pg_cluster.serve(env={"ERRANDS_WATCH_KEEPALIVE_S": "1"})
    _seed_data(client)
    token = client.post("/v1/tokens", json={"owner": "alice"}).json()["token"]
    _fuzz(str(client.base_url), token, tmp_path, seed=2)
