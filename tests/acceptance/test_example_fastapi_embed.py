"""examples/fastapi_embed runs as its README says: a team's FastAPI app with errands inside it,
started with its one command (uvicorn) as a subprocess and spoken to over HTTP as its users and
their browsers would, then stopped with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.acceptance.conftest import eventually
from tests.acceptance.test_browser import browser  # noqa: F401 - the fixture
from tests.acceptance.test_console import shown, sign_in

pytest.importorskip("fastapi", reason="the example needs FastAPI (in the dev extra)")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fastapi_embed"
RUN = ".venv/bin/uvicorn --app-dir examples/fastapi_embed app:app --no-access-log"
#: The README's command: the example keeps its tasks in a file of its own.
COMMAND = f"ERRANDS_DB=sqlite:///examples/fastapi_embed/errands.db \\\n    {RUN}"
UVICORN = str(Path(sys.executable).parent / "uvicorn")
KEYS = {"alice": "key-alice", "bob": "key-bob"}

pytestmark = pytest.mark.acceptance


class Example:
    """The example's process, started as its README says, on a port of its own choosing."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_")}
        env["ERRANDS_DB"] = f"sqlite:///{workdir}/errands.db"  # the README's file, in this test's folder
        args = RUN.split()[1:]  # the README's command, with the uvicorn of this interpreter
        args[args.index("examples/fastapi_embed")] = str(EXAMPLE)
        self.popen = subprocess.Popen(
            [UVICORN, *args, "--port", "0"], cwd=workdir, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        # uvicorn announces the port it took once the app's lifespan (errands included) has started.
        self.url = self.wait_for(r"Uvicorn running on (http://\S+)").group(1)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            match = re.search(pattern, self.output())
            if match is None and self.popen.poll() is not None:
                raise AssertionError(f"the example exited with {self.popen.returncode}:\n{self.output()}")
            return match

        match: re.Match[str] = eventually(found, timeout_s, what=repr(pattern))
        return match

    def user(self, name: str) -> httpx.Client:
        """The team's front end, logged in as ``name``."""
        return httpx.Client(base_url=self.url, headers={"X-Api-Key": KEYS[name]}, timeout=10)

    def browser(self, token: str) -> httpx.Client:
        """A page holding an owner token, calling errands' mounted API directly."""
        headers = {"Authorization": f"Bearer {token}"}
        return httpx.Client(base_url=self.url + "/errands", headers=headers, timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        finally:
            if self.popen.poll() is None:
                self.popen.kill()
                self.popen.wait()
            self._log.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[Example] = []

    def run() -> Example:
        example = Example(tmp_path, f"example-{len(started)}")
        started.append(example)
        return example

    yield run
    for example in started:
        example.stop(timeout_s=10)


def sse(
    url: str, token: str, *, after: int | None = None, opened: threading.Event | None = None
) -> Iterator[tuple[str, Any]]:
    """(event, data) of one SSE stream read as a browser's EventSource does (the token in the
    query string), until the server ends it."""
    params: dict[str, Any] = (
        {"access_token": token} if after is None else {"access_token": token, "after": after}
    )
    with httpx.stream("GET", url, params=params, timeout=httpx.Timeout(5, read=30)) as response:
        assert response.status_code == 200, response.read()
        if opened is not None:
            opened.set()
        event, data = "", ""
        for line in response.iter_lines():
            if not line:
                if data:
                    yield event, json.loads(data)
                event, data = "", ""
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]


def test_the_readme_names_the_command() -> None:
    assert f"\n{COMMAND}\n```" in (EXAMPLE / "README.md").read_text()


def test_users_see_their_own_tasks_live_and_a_sigterm_drains_the_workers(start: Any) -> None:
    example = start()
    alice, bob = example.user("alice"), example.user("bob")
    with alice, bob:
        assert alice.post("/reports", json={}, headers={"X-Api-Key": "nobody"}).status_code == 401

        # Each user submits through the team's route: errands runs it in this same process.
        submitted = {}
        for name, user in (("alice", alice), ("bob", bob)):
            answer = user.post("/reports", json={"month": "2026-11", "seconds": 2})
            assert answer.status_code == 202, answer.text
            submitted[name] = answer.json()["id"]
        tokens = {name: user.get("/token").json() for name, user in (("alice", alice), ("bob", bob))}
        assert all(t["api"] == "/errands" and t["token"].startswith("eto_") for t in tokens.values())

        # A watch through the mounted path delivers the task's end, and then ends (from the
        # log's start: the same events whether it opens before the report ends or after).
        alice_watch = f"{example.url}/errands/v1/tasks/{submitted['alice']}/watch"
        events = list(sse(alice_watch, tokens["alice"]["token"], after=0))
        assert [e for e, _ in events].count("task.completed") == 1 and events[-1][0] == "task.completed"
        assert events[-1][1]["task"]["result"]["for"] == "alice"

        # Each token sees its own user's tasks only: the other's does not exist for it.
        for me, other in (("alice", "bob"), ("bob", "alice")):
            with example.browser(tokens[me]["token"]) as page:
                mine = page.get(f"/v1/tasks/{submitted[me]}")
                assert mine.status_code == 200 and mine.json()["owner"] == me
                assert page.get(f"/v1/tasks/{submitted[other]}").status_code == 404
                assert [t["id"] for t in page.get("/v1/tasks").json()["tasks"]] == [submitted[me]]
                assert page.post(f"/v1/tasks/{submitted[me]}/cancel").status_code == 403  # read-only
        with example.browser(tokens["bob"]["token"]) as page:
            url = f"/v1/tasks/{submitted['bob']}"
            done = eventually(lambda: (t := page.get(url).json())["status"] == "completed" and t, what="end")
        assert done["result"] == {"url": f"/files/{submitted['bob']}.pdf", "for": "bob"}

        # A report still running, and bob's page following his tasks, when SIGTERM comes.
        slow = alice.post("/reports", json={"month": "2026-10", "seconds": 3}).json()["id"]
        with example.browser(tokens["alice"]["token"]) as page:
            eventually(lambda: page.get(f"/v1/tasks/{slow}").json()["status"] == "processing", what="start")
        opened, ended = threading.Event(), threading.Event()

        def follow() -> None:
            for _ in sse(f"{example.url}/errands/v1/watch", tokens["bob"]["token"], opened=opened):
                pass
            ended.set()  # the server ended the stream: it did not hold the shutdown

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        assert opened.wait(10)
    asked = time.monotonic()
    code = example.stop(timeout_s=30)
    took_s = time.monotonic() - asked
    follower.join(5)
    output = example.output()
    assert code in (0, -signal.SIGTERM), output  # uvicorn ends as the signal asked, once done
    assert ended.is_set(), "the open watch was not ended"
    assert "Traceback" not in output and "ERROR" not in output, output
    assert "Application shutdown complete" in output, output
    assert took_s < 20, took_s

    # The running report was finished before the process exited, not given back to the queue.
    again = start()
    with again.user("alice") as alice:
        token = alice.get("/token").json()["token"]
    with again.browser(token) as page:
        report = page.get(f"/v1/tasks/{slow}").json()
    assert report["status"] == "completed" and report["attempt"] == 1, report
    assert report["result"]["for"] == "alice"
    assert again.stop() in (0, -signal.SIGTERM)


def test_the_console_works_below_the_mount(start: Any, browser: Any) -> None:  # noqa: F811
    """The console's page, files and calls all go below the mount (/errands/…): an owner sees
    their own tasks live with the token the app minted."""
    example = start()
    alice, bob = example.user("alice"), example.user("bob")
    with alice, bob:
        mine = alice.post("/reports", json={"seconds": 1}).json()["id"]
        bob.post("/reports", json={"seconds": 1})
        token = alice.get("/token").json()["token"]
        context = browser.new_context()
        try:
            page = context.new_page()
            requested: list[str] = []
            page.on("request", lambda request: requested.append(request.url))
            with page.expect_response(lambda r: r.url.endswith("/console.js"), timeout=30_000) as script:
                page.goto(f"{example.url}/errands/console")
            assert script.value.url == f"{example.url}/errands/console/console.js" and script.value.ok
            sign_in(page, token)
            page.wait_for_selector(f'tr[data-id="{mine}"]', timeout=30_000)
            later = alice.post("/reports", json={"seconds": 1}).json()["id"]
            page.wait_for_selector(f'tr[data-id="{later}"]', timeout=30_000)  # live, through the mount
            assert shown(page) == [later, mine]  # not bob's
        finally:
            context.close()
    calls = [url for url in requested if "/v1/" in url]
    assert calls and all(url.startswith(f"{example.url}/errands/v1/") for url in calls), requested
