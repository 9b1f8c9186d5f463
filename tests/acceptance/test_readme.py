"""The README's example runs as written: its app, served by the real CLI, and its curl's body."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.acceptance.conftest import Cluster, wait_status

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_readme_example_app_runs_as_written(cluster: Cluster) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    app = next(b for b in blocks if b.startswith("# photos.py"))
    (cluster.workdir / "photos.py").write_text(app)
    _, client = cluster.serve("--app", "photos:app")
    body = json.loads(re.search(r"-d '(\{.*?\})'", README, re.S).group(1))  # type: ignore[union-attr]
    answer = client.post("/v1/tasks", json=body)
    assert answer.status_code == 202, answer.text
    done = wait_status(client, body["id"], "completed", "failed", "timeout")
    assert done["status"] == "completed" and done["result"]["images"], done
    # Submitting the same id and body again is safe, as the README says.
    assert client.post("/v1/tasks", json=body).status_code == 200
    refused = client.post("/v1/tasks", json={**body, "id": "order-43", "input": {}})
    assert refused.status_code == 202
    assert wait_status(client, "order-43", "failed")["error"]["code"] == "bad_input"
