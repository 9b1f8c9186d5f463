"""Python SDK: :class:`AsyncClient`, and :class:`Client` which wraps it for synchronous code.

::

    async with AsyncClient("http://127.0.0.1:8000", token) as client:
        task = await client.submit("photography", {"prompt": "a cat"}, id="order-42")
        done = await client.wait(task.id, timeout_s=600)

Errors are :class:`errands.errors.ErrandsError` subclasses: ``NotFound``, ``Conflict``,
``TooManyRequests`` (with ``retry_after_s``), ``Unavailable`` when the server cannot be reached…
"""

from __future__ import annotations

import asyncio
import builtins
import threading
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from errands import errors
from errands.model import Task

T = TypeVar("T")

_BY_STATUS: dict[int, type[errors.ApiError]] = {
    400: errors.BadRequest,
    401: errors.Unauthorized,
    403: errors.Forbidden,
    404: errors.NotFound,
    409: errors.Conflict,
    410: errors.Gone,
    413: errors.PayloadTooLarge,
    422: errors.InvalidRequest,
    429: errors.TooManyRequests,
    503: errors.Unavailable,
}
_BY_CODE: dict[str, type[errors.ApiError]] = {
    "id_conflict": errors.IdConflict,
    "invalid_state": errors.InvalidTransition,
    "unknown_type": errors.UnknownTaskType,
    "invalid_cursor": errors.InvalidCursor,
}


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        body = response.json()["error"]
        code, message = str(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", f"HTTP {response.status_code}"
    cls = _BY_CODE.get(code) or _BY_STATUS.get(response.status_code, errors.ApiError)
    if cls is errors.TooManyRequests:
        try:
            retry_after = float(response.headers.get("retry-after", "1"))
        except ValueError:
            retry_after = 1.0
        raise errors.TooManyRequests(message, retry_after_s=retry_after, code=code)
    error = cls(message, code=code)
    error.status_code = response.status_code
    raise error


@dataclass(frozen=True, slots=True)
class TaskPage:
    tasks: list[Task]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class TaskEvent:
    """One committed change of a task, as the log and the watch streams report it."""

    seq: int
    type: str
    at: str
    task: Task

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaskEvent:
        return cls(
            seq=int(data["seq"]), type=str(data["type"]), at=str(data["at"]), task=Task(**data["task"])
        )


class AsyncClient:
    """An async client of one errands server, authenticated with an admin key or owner token."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.AsyncClient(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise errors.Unavailable(f"Cannot reach errands at {self.url}: {type(exc).__name__}.") from exc
        _raise_for(response)
        return response.json()

    async def submit(
        self,
        type: str,
        input: dict[str, Any] | None = None,
        *,
        id: str | None = None,
        owner: str | None = None,
        priority: int | None = None,
        timeout_s: float | None = None,
        max_attempts: int | None = None,
        expires_in_s: float | None = None,
    ) -> Task:
        """Submit a task; with ``id`` the call is idempotent (safe to repeat)."""
        body: dict[str, Any] = {"type": type, "input": input or {}}
        for key, value in (
            ("id", id),
            ("owner", owner),
            ("priority", priority),
            ("timeout_s", timeout_s),
            ("max_attempts", max_attempts),
            ("expires_in_s", expires_in_s),
        ):
            if value is not None:
                body[key] = value
        return Task(**await self._request("POST", "/v1/tasks", json=body))

    async def get(self, task_id: str) -> Task:
        return Task(**await self._request("GET", f"/v1/tasks/{task_id}"))

    async def list(
        self,
        *,
        status: str | None = None,
        type: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        params = {
            k: v for k, v in {"status": status, "type": type, "owner": owner, "cursor": cursor}.items() if v
        }
        params["limit"] = str(limit)
        data = await self._request("GET", "/v1/tasks", params=params)
        return TaskPage([Task(**t) for t in data["tasks"]], data["next_cursor"])

    async def cancel(self, task_id: str) -> Task:
        return Task(**await self._request("POST", f"/v1/tasks/{task_id}/cancel"))

    async def retry(self, task_id: str) -> Task:
        return Task(**await self._request("POST", f"/v1/tasks/{task_id}/retry"))

    async def events(self, task_id: str, *, after: int = 0) -> builtins.list[TaskEvent]:
        data = await self._request("GET", f"/v1/tasks/{task_id}/events", params={"after": after})
        return [TaskEvent.from_json(e) for e in data["events"]]

    async def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._request("GET", "/v1/stats")
        return result

    async def mint_token(
        self,
        owner: str,
        *,
        scopes: builtins.list[str] | None = None,
        task_id: str | None = None,
        ttl_s: int = 3600,
    ) -> str:
        """An owner token (admin keys only)."""
        body: dict[str, Any] = {"owner": owner, "ttl_s": ttl_s}
        if scopes is not None:
            body["scopes"] = scopes
        if task_id is not None:
            body["task_id"] = task_id
        return str((await self._request("POST", "/v1/tokens", json=body))["token"])

    async def wait(self, task_id: str, *, timeout_s: float | None = None, poll_s: float = 0.5) -> Task:
        """The task once it has ended; ``TimeoutError`` if that takes over ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            task = await self.get(task_id)
            seq = task.seq
            while not task.done:
                for event in await self.events(task_id, after=seq):
                    seq, task = event.seq, event.task
                if not task.done:
                    await asyncio.sleep(poll_s)
            return task


class _Portal:
    """An event loop in a daemon thread, for running the async client from sync code."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="errands-client", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def _construct(*args: Any, **kwargs: Any) -> AsyncClient:
    return AsyncClient(*args, **kwargs)


class Client:
    """The synchronous client: the same methods as :class:`AsyncClient`, blocking."""

    def __init__(
        self, url: str = "http://127.0.0.1:8000", token: str | None = None, *, timeout_s: float = 30.0
    ) -> None:
        self._portal = _Portal()
        self._async = self._portal.call(_construct(url, token, timeout_s=timeout_s))

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._portal.call(self._async.aclose())
        self._portal.close()

    def submit(self, type: str, input: dict[str, Any] | None = None, **options: Any) -> Task:
        return self._portal.call(self._async.submit(type, input, **options))

    def get(self, task_id: str) -> Task:
        return self._portal.call(self._async.get(task_id))

    def list(self, **filters: Any) -> TaskPage:
        return self._portal.call(self._async.list(**filters))

    def cancel(self, task_id: str) -> Task:
        return self._portal.call(self._async.cancel(task_id))

    def retry(self, task_id: str) -> Task:
        return self._portal.call(self._async.retry(task_id))

    def events(self, task_id: str, *, after: int = 0) -> builtins.list[TaskEvent]:
        return self._portal.call(self._async.events(task_id, after=after))

    def stats(self) -> dict[str, Any]:
        return self._portal.call(self._async.stats())

    def mint_token(self, owner: str, **options: Any) -> str:
        return self._portal.call(self._async.mint_token(owner, **options))

    def wait(self, task_id: str, *, timeout_s: float | None = None) -> Task:
        return self._portal.call(self._async.wait(task_id, timeout_s=timeout_s))
