"""examples/coze_extraction run as a user would: the real ``errands serve`` on its ``app.py``, the
example's stand-in for Coze (``fake_coze.py``: errands' dev provider speaks Standard Webhooks,
not Coze), a local fake of WeChat's API, and the mini-program page itself under Node."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from websockets.sync.client import connect

from errands.server import bind, serve_asgi
from tests.acceptance.conftest import Cluster, eventually, wait_status
from tests.integration.fakes import FakeWeChat

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coze_extraction"
OPENID = "oVxK45FqJ2tW0b7LmE9sYpRzAq3c"  # the user, as WeChat names them to this mini-program
APPID, SECRET, TEMPLATE = "wx5f3c8d2a9b1e7c40", "the-mini-program-secret", "tmpl_extract_done_9Kq2"
ENDS = ("completed", "failed", "timeout", "cancelled")


class Coze:
    """``python fake_coze.py`` in a process of its own; its log tells what the workflow did."""

    def __init__(self, workdir: Path) -> None:
        self.log_path = workdir / "fake-coze.out"
        self._out = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "fake_coze.py", "--port", "0", "--step-s", "0.3"],
            cwd=workdir, stdout=self._out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        announced = r"listening at (\S+) \(token (\S+), workflow (\d+)\)"
        found = eventually(lambda: re.search(announced, self.log()), 20, "the fake's address")
        self.url, self.token, self.workflow = found.groups()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        self.popen.terminate()
        self.popen.wait(10)
        self._out.close()


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """An ASGI app on a local port, served from a thread of its own."""
    sock = bind("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    up, stop = threading.Event(), threading.Event()

    async def run() -> None:
        async with serve_asgi(app, sock):
            up.set()
            while not stop.is_set():  # noqa: ASYNC110 - the test's thread says when
                await asyncio.sleep(0.02)

    thread = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    thread.start()
    assert up.wait(10), "the fake WeChat did not start"
    try:
        yield url
    finally:
        stop.set()
        thread.join(10)


@pytest.fixture
def example(tmp_path: Path) -> Path:
    """A copy of the example, as a team would take it."""
    return Path(shutil.copytree(EXAMPLE, tmp_path / "coze_extraction"))


@pytest.fixture
def coze(example: Path) -> Iterator[Coze]:
    fake = Coze(example)
    yield fake
    fake.close()


@pytest.fixture
def wechat() -> Iterator[tuple[FakeWeChat, str]]:
    fake = FakeWeChat(APPID, SECRET, {TEMPLATE})
    with served(fake.app) as url:
        yield fake, url


def serve_example(cluster: Cluster, example: Path, coze: Coze, wechat_url: str) -> httpx.Client:
    """``errands serve --app app`` with README.md's settings, pointed at the fakes. Polls start
    4 s after a submission (60 s in production), with the sweeper passing twice a second."""
    _, admin = cluster.serve(
        "--app",
        "app:app",
        env={
            "PYTHONPATH": str(example),
            "COZE_BASE_URL": coze.url,
            "COZE_API_TOKEN": coze.token,
            "COZE_WORKFLOW_ID": coze.workflow,
            "COZE_POLL_AFTER_S": "4",
            "COZE_POLL_EVERY_S": "1",
            "ERRANDS_SWEEP_INTERVAL_S": "0.5",
            "ERRANDS_WECHAT_APPID": APPID,
            "ERRANDS_WECHAT_SECRET": SECRET,
            "ERRANDS_WECHAT_BASE_URL": wechat_url,
            "WECHAT_TEMPLATE_ID": TEMPLATE,
        },
    )
    return admin


def owner_token(admin: httpx.Client) -> str:
    """What the mini-program's login endpoint does once it knows the user's openid."""
    minted = admin.post("/v1/tokens", json={"owner": OPENID, "scopes": ["read", "write"], "ttl_s": 3600})
    assert minted.status_code == 201, minted.text
    token: str = minted.json()["token"]
    return token


def execute_id(admin: httpx.Client, task_id: str) -> str:
    found: str = eventually(lambda: admin.get(f"/v1/tasks/{task_id}").json()["external_id"], what="a run")
    return found


def callbacks(admin: httpx.Client, task_id: str) -> list[dict[str, Any]]:
    """The reports errands received about the task (a Coze workflow's posts to its callback URL)."""
    answer = admin.get("/v1/webhook-deliveries", params={"task_id": task_id})
    found: list[dict[str, Any]] = answer.json()["deliveries"]
    return found


def extracted(video_url: str) -> dict[str, str]:
    """What the stand-in's workflow makes of a video."""
    return {
        "title": f"视频 {video_url.rstrip('/').rsplit('/', 1)[-1]}",
        "content": f"从 {video_url} 提取的文案。",
    }


def check_wechat_message(sent: dict[str, Any], task: dict[str, Any]) -> None:
    """The subscribe message app.py declares, filled in for this task and sent to its owner."""
    finished = datetime.fromisoformat(task["finished_at"]).astimezone(ZoneInfo("Asia/Shanghai"))
    assert sent["touser"] == OPENID == task["owner"] and sent["template_id"] == TEMPLATE
    assert sent["page"] == f"pages/extract/extract?taskId={task['id']}"
    assert sent["data"] == {
        "thing1": {"value": "视频文案提取"},
        "time2": {"value": finished.strftime("%Y-%m-%d %H:%M")},
        "phrase3": {"value": "已完成"},
    }


def test_a_coze_extraction_reports_by_callback_is_rescued_by_polling_and_tells_the_user(
    cluster: Cluster, example: Path, coze: Coze, wechat: tuple[FakeWeChat, str]
) -> None:
    fake_wechat, wechat_url = wechat
    admin = serve_example(cluster, example, coze, wechat_url)
    token = owner_token(admin)
    bearer = {"Authorization": f"Bearer {token}"}
    user = httpx.Client(base_url=str(admin.base_url), headers=bearer, timeout=10)
    cluster.clients.append(user)

    # The front end chooses the id: sending the same request again is safe.
    video = "https://v.douyin.com/iRNBho6u/"
    body = {"type": "extract_text", "id": "ext-m3k9a1-7fq2x0", "input": {"video_url": video}}
    first = user.post("/v1/tasks", json=body)
    assert first.status_code == 202, first.text
    again = user.post("/v1/tasks", json=body)
    assert again.status_code == 200 and again.json()["created_at"] == first.json()["created_at"]
    assert first.json()["owner"] == OPENID
    other = user.post("/v1/tasks", json={**body, "input": {"video_url": "https://v.douyin.com/other/"}})
    assert other.status_code == 409 and other.json()["error"]["code"] == "id_conflict"

    # The watch, over the WebSocket a mini-program opens with wx.connectSocket: the log from the
    # start (after 0), the progress the workflow posted, the end, then the server's "end".
    ws_url = str(admin.base_url).replace("http", "ws", 1) + f"/v1/ws?access_token={token}"
    items = []
    with connect(ws_url, open_timeout=10) as socket:
        socket.send(json.dumps({"op": "subscribe", "task_id": body["id"], "sub": "w", "after": 0}))
        while (message := json.loads(socket.recv(timeout=20))).get("op") != "end":
            items.append(message)
    assert items[0] == {"op": "subscribed", "sub": "w"}
    events = [(m["event"], m["data"]["task"]) for m in items[1:]]
    progress = [(t["progress"], t["message"]) for e, t in events if e == "task.progress" and t["progress"]]
    assert progress == [(25, "下载视频"), (60, "语音识别"), (90, "整理文案")]
    (done,) = [t for e, t in events if e in ("task.completed", "task.failed", "task.timeout")]
    assert done["status"] == "completed"
    assert done["result"] == extracted(video)

    # The result came by the workflow's post to the task's signed callback URL, not by a poll:
    # four posts (three progress reports, the result) applied, and no poll found the run ended.
    run = execute_id(admin, body["id"])
    posts = callbacks(admin, body["id"])
    assert [(d["provider"], d["outcome"]) for d in posts] == [("callback:coze", "applied")] * 4
    assert f"run {run}: result → 200" in coze.log() and f"run {run}: polled, Success" not in coze.log()
    assert done["webhook_received"] is True
    # A callback URL that errands did not sign for the task's attempt is refused.
    forged_url = f"/v1/hooks/callback/{body['id']}.1.bm90LXRoZS1yZWFsLW1hYw"
    forged = httpx.post(f"{admin.base_url}{forged_url}", json={"status": "failed"}, timeout=10)
    assert forged.status_code == 401
    assert wait_status(admin, body["id"], *ENDS)["status"] == "completed"

    # The workflow's post of the result is lost: errands asks Coze, which says Success.
    video = "https://v.douyin.com/iRNBkq2P/"
    lost = {
        "type": "extract_text",
        "id": "ext-m3k9b4-q81zc5",
        "input": {"video_url": video, "_fake": {"drop": True}},
    }
    assert user.post("/v1/tasks", json=lost).status_code == 202
    rescued = wait_status(admin, lost["id"], *ENDS, timeout_s=30)
    assert rescued["status"] == "completed"
    assert rescued["result"] == extracted(video)
    run = execute_id(admin, lost["id"])
    assert f"run {run}: the result's callback was lost" in coze.log()
    assert f"run {run}: polled, Success" in coze.log()
    assert [d["outcome"] for d in callbacks(admin, lost["id"])] == ["applied"] * 3  # the progress only

    # Each user is told once per task, when it ends, with the template's data.
    for task_id in (body["id"], lost["id"]):
        eventually(lambda t=task_id: admin.get(f"/v1/tasks/{t}").json()["notification_sent"], what="told")
    assert len(fake_wechat.sends) == 2  # nothing was refused and tried again
    by_task = {m["page"].rsplit("=", 1)[1]: m for m in fake_wechat.delivered}
    assert sorted(by_task) == sorted([body["id"], lost["id"]])
    for task_id, sent in by_task.items():
        check_wechat_message(sent, admin.get(f"/v1/tasks/{task_id}").json())
    (message,) = admin.get("/v1/messages", params={"task_id": lost["id"]}).json()["messages"]
    assert message["channel"] == "wechat" and message["state"] == "delivered" and message["attempts"] == 1


#: What a mini-program page has (Page, getApp, the wx API it calls), on Node's WebSocket and
#: fetch. The first answer to a submission is lost on its way back, as on a flaky mobile network.
HARNESS = r"""
const [pagePath, baseUrl, token, mode, arg] = process.argv.slice(2);
const say = (kind, data) => console.log(JSON.stringify({ kind, ...data }));
let page;
let closed = false;
globalThis.getApp = () => ({ globalData: { baseUrl, token } });
globalThis.Page = (spec) => {
  page = { ...spec, data: { ...spec.data } };
  page.setData = (data) => { Object.assign(page.data, data); say("setData", { data }); };
};
let submissions = 0;
globalThis.wx = {
  requestSubscribeMessage: async ({ tmplIds }) => { say("subscribe", { tmplIds }); return { errMsg: "ok" }; },
  connectSocket({ url }) {
    say("socket", { event: "connect" });
    const ws = new WebSocket(url);
    return {
      send: ({ data }) => ws.send(data),
      close: () => { say("socket", { event: "close" }); ws.close(); },
      onOpen: (fn) => ws.addEventListener("open", () => fn({})),
      onMessage: (fn) => ws.addEventListener("message", (m) => fn({ data: m.data })),
      onClose: (fn) => ws.addEventListener("close", () => { closed = true; fn({}); }),
      onError: (fn) => ws.addEventListener("error", () => fn({ errMsg: "error" })),
    };
  },
  request({ url, header, method, data, success, fail }) {
    const body = data === undefined ? undefined : JSON.stringify(data);
    const submission = method === "POST" && url.endsWith("/v1/tasks");
    if (submission) say("submit", { id: data.id });
    fetch(url, { headers: header, method: method || "GET", body })
      .then(async (r) => {
        const answer = { statusCode: r.status, data: await r.json() };
        if (submission && ++submissions === 1) fail({ errMsg: "request:fail timeout" });
        else success(answer);
      })
      .catch((e) => fail({ errMsg: String(e) }));
  },
};
await import(pagePath);
if (mode === "submit") {
  page.onLoad({});
  page.onInput({ detail: { value: arg } });
  await page.submit();
} else {
  page.onLoad({ taskId: arg });
}
const deadline = Date.now() + 30000;
while (!((page.data.result || page.data.error) && closed) && Date.now() < deadline) {
  await new Promise((r) => setTimeout(r, 20));
}
say("final", { data: page.data, socketClosed: closed });
process.exit(0);
"""


def node_with_websocket() -> list[str]:
    """``node`` (with the flag Node 20 needs for WebSocket), or skip: a missing Node fails under CI."""
    node = shutil.which("node")
    for flags in ([], ["--experimental-websocket"]):
        probe = [str(node), *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"]
        if node and subprocess.run(probe, capture_output=True, timeout=30, check=False).returncode == 0:
            return [str(node), *flags]
    reason = "Node.js 20.10 or newer (with WebSocket) is needed to run the mini-program page"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def run_page(node: list[str], example: Path, base_url: str, token: str, *args: str) -> list[dict[str, Any]]:
    page = example / "miniprogram" / "pages" / "extract" / "extract.js"
    done = subprocess.run(
        [*node, str(example / "harness.mjs"), page.as_uri(), base_url, token, *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_mini_program_page_submits_with_its_own_id_watches_and_closes_the_watch(
    cluster: Cluster, example: Path, coze: Coze, wechat: tuple[FakeWeChat, str]
) -> None:
    node = node_with_websocket()
    fake_wechat, wechat_url = wechat
    admin = serve_example(cluster, example, coze, wechat_url)
    token = owner_token(admin)
    # As README.md says: errands' client copied into the mini-program (whose build turns its ES
    # modules into what WeChat runs; Node runs them as they are).
    (example / "miniprogram" / "lib").mkdir()
    (example / "miniprogram" / "lib" / "errands.js").write_text(admin.get("/client/errands.js").text)
    (example / "miniprogram" / "package.json").write_text('{"type": "module"}')
    (example / "harness.mjs").write_text(HARNESS)

    said = run_page(node, example, str(admin.base_url), token, "submit", "https://v.douyin.com/iRNq7Lm2/")
    final = said[-1]
    assert final["kind"] == "final" and final["socketClosed"] is True, said
    assert final["data"]["status"] == "completed" and final["data"]["error"] == ""
    assert final["data"]["result"] == extracted("https://v.douyin.com/iRNq7Lm2/")
    # The answer to the first submission was lost; the page sent it again with the same id.
    (first, second) = [s["id"] for s in said if s["kind"] == "submit"]
    task_id = final["data"]["taskId"]
    assert first == second == task_id and task_id.startswith("ext-")
    assert admin.get("/v1/tasks/count", params={"id_prefix": "ext-"}).json() == {"count": 1}
    assert admin.get(f"/v1/tasks/{task_id}").json()["owner"] == OPENID
    # The page showed the progress as it came (the watch starts at the task as it is then), then
    # the end, and closed its socket itself.
    shown = [s["data"] for s in said if s["kind"] == "setData"]
    progress = [d["progress"] for d in shown if d.get("status") == "processing"]
    assert progress == sorted(progress) and {25, 60, 90} & set(progress), shown
    assert [d["status"] for d in shown if "status" in d][-1] == "completed"
    assert [s["event"] for s in said if s["kind"] == "socket"] == ["connect", "close"]
    assert [s["tmplIds"] for s in said if s["kind"] == "subscribe"] == [["YOUR_TEMPLATE_ID"]]

    # The subscribe message, once, opens the page on the task: it shows the result at once.
    eventually(lambda: admin.get(f"/v1/tasks/{task_id}").json()["notification_sent"], what="told")
    (sent,) = fake_wechat.delivered
    check_wechat_message(sent, admin.get(f"/v1/tasks/{task_id}").json())
    opened = run_page(node, example, str(admin.base_url), token, "open", task_id)[-1]
    assert opened["socketClosed"] is True and opened["data"]["result"] == final["data"]["result"]
    assert len(fake_wechat.sends) == 1
