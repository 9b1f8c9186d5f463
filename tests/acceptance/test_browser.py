"""A real browser (Debian's Chromium, driven by Playwright) watching a task with errands.js."""

from __future__ import annotations

import functools
import os
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import Cluster
from tests.conftest import ADMIN_KEY

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

PAGE = """<!doctype html><meta charset="utf-8"><title>watch</title>
<script type="module">
const params = new URLSearchParams(location.search);
const { watchTask, wxAdapter } = await import(params.get("api") + "/client/errands.js");
window.events = []; window.transports = []; window.errors = [];
// What a WeChat mini-program provides (wx.connectSocket, wx.request), built on the browser's own.
const wx = {
  connectSocket({ url }) {
    const ws = new WebSocket(url);
    return {
      send: ({ data }) => ws.send(data),
      close: () => ws.close(),
      onOpen: (fn) => ws.addEventListener("open", () => fn({})),
      onMessage: (fn) => ws.addEventListener("message", (m) => fn({ data: m.data })),
      onClose: (fn) => ws.addEventListener("close", () => fn({})),
      onError: (fn) => ws.addEventListener("error", () => fn({ errMsg: "error" })),
    };
  },
  request({ url, header, success, fail }) {
    fetch(url, { headers: header })
      .then(async (r) => success({ statusCode: r.status, data: await r.json() }))
      .catch((e) => fail({ errMsg: String(e) }));
  },
};
watchTask(params.get("id"), {
  adapter: params.get("wx") ? wxAdapter(wx) : undefined,
  baseUrl: params.get("api"),
  token: params.get("token"),
  pollMs: 200,
  onChange: (e) => window.events.push([e.type, e.seq, e.task.status, e.task.progress]),
  onEnd: (task) => { window.done = task; },
  onError: (err) => window.errors.push(String(err)),
  onTransport: (t) => window.transports.push(t),
});
</script>"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "playwright is not installed (pip install playwright)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    if not shutil.which(CHROMIUM):
        reason = "Chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield instance
        instance.close()


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    """The app's front end: a static page on its own local origin (a real HTTP server)."""
    (tmp_path / "test.html").write_text(PAGE)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _watch_in_page(
    browser: Any, site: str, api: str, task_id: str, token: str, block: set[str], wx: bool = False
) -> dict[str, Any]:
    context = browser.new_context()
    page = context.new_page()
    if "sse" in block:
        page.route("**/watch*", lambda route: route.abort())
    if "ws" in block:
        page.route_web_socket("**/v1/ws*", lambda ws: ws.close())
    page.goto(f"{site}/test.html?id={task_id}&token={token}&api={api}" + ("&wx=1" if wx else ""))
    page.wait_for_function("() => window.done !== undefined", timeout=30_000)
    result: dict[str, Any] = page.evaluate(
        "() => ({done: window.done, events: window.events, transports: window.transports})"
    )
    context.close()
    return result


def test_a_browser_watches_a_task_to_completion_and_falls_back(
    browser: Any, cluster: Cluster, site: str
) -> None:
    _, client = cluster.serve(env={"ERRANDS_CORS_ORIGINS": site})
    api = str(client.base_url).rstrip("/")
    token = client.post("/v1/tokens", json={"owner": "web"}).json()["token"]
    cases = [
        (set(), False, ["sse"]),
        ({"sse"}, False, ["sse", "ws"]),
        ({"sse", "ws"}, False, ["sse", "ws", "poll"]),
        (set(), True, ["ws"]),  # a mini-program has no EventSource: WebSocket through wx
        ({"ws"}, True, ["ws", "poll"]),  # ...and wx.request when sockets are blocked
    ]
    for block, wx, transports in cases:
        task = client.post(
            "/v1/tasks", json={"type": "sleep", "owner": "web", "input": {"seconds": 3}}
        ).json()
        result = _watch_in_page(browser, site, api, task["id"], token, block, wx)
        assert result["transports"] == transports, (block, wx)
        assert result["done"]["status"] == "completed"
        events = result["events"]
        assert events[0][0] == "task.snapshot"
        assert events[-1][2] == "completed"
        assert any(e[0] == "task.progress" for e in events), "changes arrive while the task runs"
        seqs = [e[1] for e in events]
        assert seqs == sorted(set(seqs)), "no duplicate and in order"
        log = client.get(f"/v1/tasks/{task['id']}/events").json()["events"]
        if transports[-1] != "poll":  # streams deliver every event; polling may merge a few
            assert seqs[1:] == [e["seq"] for e in log if e["seq"] > seqs[0]]
    assert ADMIN_KEY not in cluster.procs[0].output()
