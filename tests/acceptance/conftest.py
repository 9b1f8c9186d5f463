"""Acceptance fixtures: run the real ``errands`` command and talk to it over HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_KEY

HERE = Path(__file__).parent
ERRANDS = str(Path(sys.executable).parent / "errands")

pytestmark = pytest.mark.acceptance


def eventually(check: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Proc:
    """A started ``errands`` process whose output goes to files we can read while it runs."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path, name: str) -> None:
        self.out_path = cwd / f"{name}.out"
        self.err_path = cwd / f"{name}.err"
        self._out = self.out_path.open("wb")
        self._err = self.err_path.open("wb")
        self.popen = subprocess.Popen([ERRANDS, *args], env=env, cwd=cwd, stdout=self._out, stderr=self._err)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") + self.err_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.popen.poll() is not None and not re.search(pattern, self.output()):
                raise AssertionError(f"process exited with {self.popen.returncode}:\n{self.output()}")
            return re.search(pattern, self.output())

        match: re.Match[str] = eventually(found, timeout_s, what=repr(pattern))
        return match

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.pid, sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()
        finally:
            self._out.close()
            self._err.close()


def served_url(proc: Proc, timeout_s: float = 20.0) -> str:
    """The base URL a started ``errands serve`` announces (the port it took)."""
    return proc.wait_for(r"errands is serving .* at (http://\S+) \(database", timeout_s).group(1)


def metrics_url(proc: Proc) -> str:
    """The private metrics endpoint a started process announces."""
    return proc.wait_for(r"Metrics for Prometheus \(no key\): (http://\S+)").group(1)


def listening_url(proc: Proc) -> str:
    """The URL a started ``errands dev-provider`` announces."""
    return proc.wait_for(r"errands dev-provider is listening at (http://\S+)").group(1)


class Cluster:
    """Processes of one test sharing one database; all stopped at the end."""

    def __init__(self, workdir: Path, db: str | None = None) -> None:
        self.workdir = workdir
        self.db = db or f"sqlite:///{workdir / 'errands.db'}"
        self.procs: list[Proc] = []
        self.clients: list[httpx.Client] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_")},
            "ERRANDS_ADMIN_KEY": ADMIN_KEY,
            "ERRANDS_DB": self.db,
            "PYTHONPATH": str(HERE),
        }

    def start(self, *args: str, name: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(list(args), {**self.env, **(env or {})}, self.workdir, f"{name}-{len(self.procs)}")
        self.procs.append(proc)
        return proc

    def serve(
        self, *args: str, env: dict[str, str] | None = None, port: int | None = None
    ) -> tuple[Proc, httpx.Client]:
        """Start ``errands serve`` (on a port of its own choosing unless one is given) and a client of
        it. A port picked here and passed on could be taken by any socket in between."""
        proc = self.start("serve", "--port", str(port or 0), *args, name="serve", env=env)
        url = served_url(proc)
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=10)
        self.clients.append(client)
        return proc, client

    def worker(self, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = self.start("worker", *args, name="worker", env=env)
        proc.wait_for(r"errands worker \S+ is running")
        return proc

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for proc in self.procs:
            proc.stop(timeout_s=10)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path)
    yield c
    c.close()


def sse_lines(url: str, path: str, last: int | None) -> Iterator[tuple[str, str, int | None]]:
    """(event, data, id) of one SSE connection, until it breaks."""
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    with httpx.stream("GET", url + path, headers=headers, timeout=httpx.Timeout(5, read=30)) as response:
        event, data, seq = "", "", None
        for line in response.iter_lines():
            if not line:
                if data:
                    yield event, data, seq
                event, data, seq = "", "", None
            elif line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line.startswith("id: "):
                seq = int(line[4:])


def task_status(client: httpx.Client, task_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/tasks/{task_id}")
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def wait_status(
    client: httpx.Client, task_id: str, *statuses: str, timeout_s: float = 20.0
) -> dict[str, Any]:
    result: dict[str, Any] = eventually(
        lambda: (t := task_status(client, task_id))["status"] in statuses and t,
        timeout_s,
        what=f"{task_id} to be {statuses}",
    )
    return result


@pytest.fixture
def pg_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on a fresh PostgreSQL database of its own."""
    from tests.conftest import create_database, drop_database, pg_url, require_postgres, run_sync

    require_postgres()
    name = run_sync(create_database("errands_acc"))
    c = Cluster(tmp_path, pg_url(name))
    yield c
    c.close()
    run_sync(drop_database(name))
