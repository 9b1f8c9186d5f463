"""examples/novel_characters, run as its README says: the real CLI serves the example's app, the
example's web service submits the sample novel with a notify_url to its own receiver; everything
over HTTP. Characters stream live and resume without a gap; the webhook is signed and verified; the
web service's poll, its backup, returns the same result."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from errands import signing
from tests.acceptance.conftest import Cluster, eventually, served_url, sse_lines
from tests.conftest import ADMIN_KEY

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "novel_characters"
README = (EXAMPLE / "README.md").read_text(encoding="utf-8")
# What the heuristic finds in novel.txt: each character's lines and the chapter it was found in.
CHARACTERS = [
    {"name": "林小满", "lines": 5, "chapter": 1},
    {"name": "陈伯", "lines": 4, "chapter": 1},
    {"name": "周掌柜", "lines": 3, "chapter": 2},
    {"name": "阿福", "lines": 3, "chapter": 2},
    {"name": "沈先生", "lines": 3, "chapter": 3},
]
TITLES = ["第一章 雾港", "第二章 杂货铺", "第三章 陌生人", "第四章 灯火"]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """The example's folder, copied as a user would take it."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "novel_characters"))


def web_service_module(folder: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("novel_web_service", folder / "web_service.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_novel_example_streams_characters_live_and_tells_the_web_service(
    cluster: Cluster, example: Path
) -> None:
    app = re.search(r"--app (\S+)", README).group(1)  # type: ignore[union-attr]
    env = {"PYTHONPATH": str(example), "ERRANDS_NOTIFY_ALLOW_NETWORKS": "127.0.0.0/8"}
    proc, client = cluster.serve("--app", app, env=env)
    url = served_url(proc)
    web = web_service_module(example).WebService(url, ADMIN_KEY)
    try:
        novel = (example / "novel.txt").read_text(encoding="utf-8")
        task_id = web.submit(novel, pace_s=1)
        watch = f"/v1/tasks/{task_id}/watch?streams=include"

        # Watch from the start; leave at the first characters, while the task still runs.
        events: list[dict[str, Any]] = []
        running: dict[str, Any] = {"status": "no character came"}
        for _, data, _ in sse_lines(url, watch + "&after=0", None):
            events.append(json.loads(data))
            if events[-1]["type"] == "task.stream":
                running = web.poll(task_id)
                break
        assert running["status"] == "processing" and running["progress"] < 100, running
        first = len(events)
        # Come back with Last-Event-ID: the rest, to the end, each event once.
        events += [json.loads(data) for _, data, _ in sse_lines(url, watch, events[-1]["seq"])]
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)) and events[-1]["type"] == "task.completed"

        parts = [e["stream"] for e in events if e["type"] == "task.stream"]
        assert any(e["type"] == "task.stream" for e in events[first:])  # resumed mid-stream
        chunks: list[dict[str, Any]] = []
        for part in parts:
            assert part["name"] == "characters" and part["index"] == len(chunks)  # no gap, no repeat
            chunks += part["chunks"]
        expected_chunks = [
            {"name": c["name"], "chapter": c["chapter"], "title": TITLES[c["chapter"] - 1]}
            for c in CHARACTERS
        ]
        assert chunks == expected_chunks

        # Progress moved chapter by chapter, each report naming its chapter.
        reports = [
            (e["task"]["progress"], e["task"]["message"]) for e in events if e["type"] == "task.progress"
        ]
        assert [p for p, _ in reports][:3] == [25, 50, 75], reports
        for (_, message), title, n in zip(reports, TITLES, (2, 4, 5, 5), strict=False):
            assert message.startswith(f"{title} (") and message.endswith(f"{n} found")
        assert events[-1]["task"]["progress"] == 100

        result = events[-1]["task"]["result"]
        assert result == {"chapters": 4, "characters": CHARACTERS}

        # The stream as kept, from an offset: exactly what followed it.
        page = client.get(f"/v1/tasks/{task_id}/streams/characters", params={"offset": 2, "format": "json"})
        assert page.json()["chunks"] == chunks[2:] and page.json()["next_offset"] == len(chunks)

        # The signed webhook reached the web service, which verified it (204: a failed check is 401).
        told = eventually(lambda: web.done.get(task_id), what="the webhook")
        assert told["status"] == "completed" and told["result"] == result
        assert web.wait(task_id, timeout_s=5) == told

        def delivered() -> dict[str, Any] | None:
            (message,) = client.get("/v1/messages", params={"task_id": task_id}).json()["messages"]
            return message if message["state"] != "pending" else None  # errands records the answer

        message = eventually(delivered, what="the delivery recorded")
        assert message["channel"] == "url" and message["target"] == web.url
        assert message["state"] == "delivered" and message["last_status"] == 204

        # The receiver refuses what errands did not sign, and a signed message replayed too late.
        body = json.dumps({"type": "task.completed", "data": {"task": {**told, "id": "forged"}}}).encode()
        now = int(time.time())
        forged = signing.sign([b"another key, not errands' own"], "msg_forged", now, body)
        stale = signing.sign([signing.secret_key(web.secret)], "msg_stale", now - 3600, body)
        for headers in (forged, stale, {}):
            assert httpx.post(web.url, content=body, headers=headers).status_code == 401
        assert "forged" not in web.done

        # The backup: the web service's poll of the task returns the same final result...
        assert web.poll(task_id)["result"] == result
        # ...and ends a wait whose webhook never comes (a task submitted without a notify_url).
        quiet = client.post(
            "/v1/tasks", json={"type": "novel_characters", "input": {"text": novel, "pace_s": 0}}
        )
        assert quiet.status_code == 202, quiet.text
        polled = web.wait(quiet.json()["id"], poll_every_s=0.1, timeout_s=20)
        assert polled["status"] == "completed" and polled["result"] == result
        assert quiet.json()["id"] not in web.done
    finally:
        web.close()
