"""A real browser (Debian's Chromium, driven by Playwright) watching a task with errands.js."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest.mock import ANY

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

#: What a WeChat mini-program provides (wx.connectSocket, wx.request), built on the browser's own.
WX = """const wx = {
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
  request({ url, header, method, data, success, fail }) {
    const body = data === undefined ? undefined : JSON.stringify(data);
    fetch(url, { headers: header, method: method || "GET", body })
      .then(async (r) => success({ statusCode: r.status, data: await r.json() }))
      .catch((e) => fail({ errMsg: String(e) }));
  },
};
"""

PAGE = (
    """<!doctype html><meta charset="utf-8"><title>watch</title>
<script type="module">
const params = new URLSearchParams(location.search);
const { watchTask, wxAdapter } = await import(params.get("api") + "/client/errands.js");
window.events = []; window.transports = []; window.errors = [];
"""
    + WX
    + """watchTask(params.get("id"), {
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
)


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


SUBMIT_PAGE = (
    """<!doctype html><meta charset="utf-8"><title>submit</title>
<script type="module">
const params = new URLSearchParams(location.search);
const { getBalance, getUsage, submitTask, submitTasks, watchTask, wxAdapter } =
  await import(params.get("api") + "/client/errands.js");
"""
    + WX
    + """const options = { baseUrl: params.get("api"), token: params.get("token"),
                  adapter: params.get("wx") ? wxAdapter(wx) : undefined };
const id = params.get("id");
const task = await submitTask({ type: "echo", id, input: { n: 1 }, delay_s: 0.5 }, options);
const again = await submitTask({ type: "echo", id, input: { n: 1 }, delay_s: 0.5 }, options);
let refused = null;
try { await submitTask({ type: "echo", delay_s: -1 }, options); } catch (e) { refused = [e.status, e.code]; }
const batch = await submitTasks([{ type: "echo", id: id + "-b" }, { type: "nope" }], options);
const summary = batch.map((r) => [r.status, r.task ? r.task.id : r.error.code]);
window.result = { task, again, refused, batch: summary };
watchTask(id, { ...options, onEnd: async (t) => {
  const usage = await getUsage({ type: "echo" }, options);
  window.books = { balance: await getBalance(options), usage: usage.usage, next: usage.next_after };
  window.done = t;
} });
</script>"""
)


def test_a_page_submits_delayed_tasks_and_batches_through_errands_js(
    browser: Any, cluster: Cluster, tmp_path: Path, site: str
) -> None:
    _, client = cluster.serve(env={"ERRANDS_CORS_ORIGINS": site})
    api = str(client.base_url).rstrip("/")
    token = client.post("/v1/tokens", json={"owner": "web"}).json()["token"]
    assert client.post("/v1/credits", json={"owner": "web", "amount": 5}).status_code == 200
    (tmp_path / "submit.html").write_text(SUBMIT_PAGE)
    for wx in (False, True):
        task_id = f"page-{int(wx)}"
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{site}/submit.html?id={task_id}&token={token}&api={api}" + ("&wx=1" if wx else ""))
        page.wait_for_function("() => window.done !== undefined", timeout=30_000)
        result = page.evaluate("() => ({...window.result, done: window.done, books: window.books})")
        context.close()
        assert result["books"]["balance"] == {"owner": "web", "balance": 5, "reserved": 0, "updated_at": ANY}
        [usage] = result["books"]["usage"]  # the page's echo tasks: two a page, so far
        assert (usage["owner"], usage["type"], usage["submitted"]) == ("web", "echo", 2 * (1 + wx))
        assert result["books"]["next"] is None
        assert result["task"]["owner"] == "web" and result["task"]["scheduled_for"] is not None
        assert result["again"]["seq"] == result["task"]["seq"]  # the same request: the same task
        assert result["refused"] == [422, "invalid_request"]
        assert result["batch"] == [[202, f"{task_id}-b"], [422, "unknown_type"]]
        assert result["done"]["status"] == "completed"
        assert result["done"]["started_at"] >= result["task"]["scheduled_for"]


class CuttableProxy:
    """A TCP proxy in front of the server whose open connections the test can cut, as a mobile
    network does: the page's client must notice and resume by itself."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open: set[socket.socket] = set()
        self.cuts = 0
        self.accepted = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.open.update((client, upstream))
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            with self._lock:
                self.open.discard(source)
                self.open.discard(sink)

    def cut(self) -> None:
        with self._lock:
            sockets = list(self.open)
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.cuts += 1

    def close(self) -> None:
        self.listener.close()
        self.cut()


STREAM_PAGE = (
    """<!doctype html><meta charset="utf-8"><title>stream</title>
<script type="module">
const params = new URLSearchParams(location.search);
const { watchTask, wxAdapter } = await import(params.get("api") + "/client/errands.js");
window.lengths = [];
"""
    + WX
    + """const handle = watchTask(params.get("id"), {
  adapter: params.get("wx") ? wxAdapter(wx) : undefined,
  baseUrl: params.get("api"),
  token: params.get("token"),
  after: 0,
  onStream: () => {
    window.text = handle.text("text");
    window.lengths.push([performance.now(), window.text.length]);
  },
  onEnd: (task) => { window.done = task; },
});
</script>"""
)


@pytest.mark.parametrize("wx", [False, True], ids=["browser", "mini-program"])
def test_a_page_shows_streamed_text_growing_and_exact_after_its_connection_is_cut(
    browser: Any, cluster: Cluster, site: str, tmp_path: Path, wx: bool
) -> None:
    (tmp_path / "stream.html").write_text(STREAM_PAGE)
    _, client = cluster.serve(env={"ERRANDS_CORS_ORIGINS": site})
    proxy = CuttableProxy(int(str(client.base_url).rstrip("/").rsplit(":", 1)[1]))
    try:
        api = f"http://127.0.0.1:{proxy.port}"
        task = client.post(
            "/v1/tasks", json={"type": "write", "owner": "web", "input": {"words": 160, "every_s": 0.03}}
        )
        task_id = task.json()["id"]
        token = client.post("/v1/tokens", json={"owner": "web", "task_id": task_id}).json()["token"]
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{site}/stream.html?id={task_id}&token={token}&api={api}" + ("&wx=1" if wx else ""))
        for at_least in (10, 200):  # cut the page's stream twice while the text grows
            page.wait_for_function(f"() => (window.text || '').length > {at_least}", timeout=30_000)
            proxy.cut()
        page.wait_for_function("() => window.done !== undefined", timeout=60_000)
        text, lengths = page.evaluate("() => [window.text, window.lengths]")
        context.close()
        reconnected = proxy.accepted
    finally:
        proxy.close()
    stored = client.get(f"/v1/tasks/{task_id}/streams/text")
    assert stored.status_code == 200 and len(stored.text.split(" ")) == 160
    assert text == stored.text
    # The text grew on the page while it was written (about 5 s), not all at once at the end.
    assert lengths[-1][0] - lengths[0][0] > 1000
    assert [n for _, n in lengths] == sorted(n for _, n in lengths)
    assert reconnected >= 3, "the page connected again after each cut"


def test_the_api_document_works_offline_and_sends_a_bearer_token(browser: Any, cluster: Cluster) -> None:
    """/docs draws the API from errands' own files (nothing fetched from outside 127.0.0.1), and
    a reader who authorizes with the admin key can try a call."""
    _, client = cluster.serve()
    api = str(client.base_url).rstrip("/")
    context = browser.new_context()
    page = context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto(f"{api}/docs")
    stats = "#operations-admin-stats"
    page.wait_for_selector(stats, timeout=30_000)
    page.click("button.authorize")
    page.fill(".auth-container input", ADMIN_KEY)
    page.click(".auth-btn-wrapper button.authorize")
    page.click(".btn-done")
    page.click(f"{stats} .opblock-summary")
    page.click(f"{stats} button.try-out__btn")
    page.click(f"{stats} button.execute")
    answered = f"{stats} .live-responses-table tbody .response-col_status"
    page.wait_for_selector(answered, timeout=30_000)
    status = page.inner_text(answered)
    context.close()
    assert status.strip().startswith("200")
    assert requested and all(url.startswith(api) for url in requested), requested
