"""errands inside another ASGI app: ``app.asgi()`` mounted under a path, served by the runtime
that ``app.running()`` starts in the host's lifespan, with owner tokens minted in Python."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from errands import Errands, InvalidRequest, Status, TaskContext, Unavailable
from errands.hub import WatchFilter
from tests.integration.conftest import make_settings, until, wait_task

errands = Errands()


@errands.task("report")
async def report(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
    if input.get("hold"):
        await asyncio.sleep(60)
    return {"for": ctx.owner}


async def home(request: Any) -> PlainTextResponse:
    return PlainTextResponse("the team's own page")


host = Starlette(routes=[Route("/", home), Mount("/errands", errands.asgi())])


def client(token: str | None = None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=host), base_url="http://app", headers=headers)


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    return make_settings(f"sqlite:///{tmp_path / 'errands.db'}", admin_key=None)


@pytest.fixture
def recorded() -> Iterator[list[int]]:
    """SIGTERM and SIGINT handled as a server handles them (recorded here), then restored."""
    heard: list[int] = []

    def server_handler(sig: int, frame: FrameType | None) -> None:
        heard.append(sig)

    before = {sig: signal.signal(sig, server_handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield heard
    for sig, handler in before.items():
        signal.signal(sig, handler)


async def test_the_mounted_api_serves_the_running_app_below_its_path(settings: Any) -> None:
    async with client() as anonymous:
        refused = await anonymous.get("/errands/healthz")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        with pytest.raises(Unavailable):
            errands.mint_token("alice")
        async with errands.running(settings):
            assert (await anonymous.get("/")).text == "the team's own page"
            assert (await anonymous.get("/errands/healthz")).json() == {"status": "ok"}
            assert (await anonymous.get("/errands/v1/tasks")).status_code == 401
            assert (await anonymous.get("/v1/tasks")).status_code == 404  # only below the mount
            mine = await errands.submit("report", owner="alice")
            theirs = await errands.submit("report", owner="bob")
            async with client(errands.mint_token("alice", scopes=["read"])) as alice:
                seen = await alice.get(f"/errands/v1/tasks/{mine.id}")
                assert seen.status_code == 200 and seen.json()["owner"] == "alice"
                assert (await alice.get(f"/errands/v1/tasks/{theirs.id}")).status_code == 404
                listed = (await alice.get("/errands/v1/tasks")).json()["tasks"]
                assert [t["id"] for t in listed] == [mine.id]
                cancel = await alice.post(f"/errands/v1/tasks/{mine.id}/cancel")
                assert cancel.status_code == 403  # a read-only token
            done = await wait_task(errands._runtime, mine.id)  # type: ignore[arg-type]
            assert done.status is Status.COMPLETED and done.result == {"for": "alice"}
        # Stopped: the mount says so again, and a later run is served as well.
        assert (await anonymous.get("/errands/healthz")).status_code == 503
        async with errands.running(settings):
            assert (await anonymous.get("/errands/healthz")).status_code == 200


async def test_minted_tokens_follow_the_api_rules(settings: Any) -> None:
    async with errands.running(settings):
        task = await errands.submit("report", owner="alice")
        other = await errands.submit("report", owner="alice")
        async with client(errands.mint_token("alice", task_id=task.id, ttl_s=60)) as one:
            assert (await one.get(f"/errands/v1/tasks/{task.id}")).status_code == 200
            assert (await one.get(f"/errands/v1/tasks/{other.id}")).status_code == 404
        with pytest.raises(InvalidRequest, match="scopes"):
            errands.mint_token("alice", scopes=["admin"])
        with pytest.raises(InvalidRequest, match="ttl_s"):
            errands.mint_token("alice", ttl_s=31 * 86_400)
        async with client(errands.mint_token("alice", ttl_s=1)) as expiring:
            await asyncio.sleep(1.1)
            assert (await expiring.get(f"/errands/v1/tasks/{task.id}")).status_code == 401


async def test_a_signal_ends_open_watches_then_reaches_the_server(settings: Any, recorded: list[int]) -> None:
    installed = signal.getsignal(signal.SIGTERM)
    async with errands.running(settings.model_copy(update={"shutdown_grace_s": 30.0})) as runtime:
        assert signal.getsignal(signal.SIGTERM) is not installed  # chained in front of it
        watch = runtime.hub.watch(WatchFilter(owner="alice"), key=None)  # what GET /v1/watch opens
        held = await errands.submit("report", {"hold": True}, owner="alice")
        await wait_task(runtime, held.id, lambda t: t.status is Status.PROCESSING)
        signal.raise_signal(signal.SIGTERM)
        assert recorded == [signal.SIGTERM]  # the server heard it, as before
        await until(lambda: watch.closed)  # and the watch ended, so the server can stop
        signal.raise_signal(signal.SIGTERM)  # a second one: the handler's grace is cut short
        assert recorded == [signal.SIGTERM, signal.SIGTERM]
        await asyncio.sleep(0.05)
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 10  # not the 30 s of grace
    assert signal.getsignal(signal.SIGTERM) is installed  # restored as the block ends


async def test_an_app_not_mounted_leaves_signals_alone(settings: Any, recorded: list[int]) -> None:
    quiet = Errands()
    installed = signal.getsignal(signal.SIGTERM)
    async with quiet.running(settings):
        assert signal.getsignal(signal.SIGTERM) is installed
