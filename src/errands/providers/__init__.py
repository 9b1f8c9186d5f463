"""External providers: services that run a task and report back by webhook (or answer polls).

A provider adapter implements :class:`Provider`: ``submit`` hands a task over and returns the
service's id for it; ``verify`` and ``parse`` check and read a webhook; ``poll`` asks for the
state; ``cancel`` stops the job where the service allows it. Declare a task type with one::

    app.external("extract_text", provider=ReplicateProvider(...), timeout_s=600, poll_after_s=60)

Submission runs on a worker under the normal lease; afterwards the task stays ``processing`` with
its ``external_id`` and no lease, until a webhook or a poll reports the end (or its deadline
passes). Every report goes through the same state machine as a local handler's, so a late,
duplicated or forged report can never move a task backwards.

Adapters: :mod:`errands.providers.standard` (any service speaking Standard Webhooks),
:mod:`errands.providers.replicate`, :mod:`errands.providers.coze`.
"""

from __future__ import annotations

import abc
import asyncio
import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from errands.auth import CapabilitySigner
from errands.errors import BadRequest, ErrandsError
from errands.inputs import STREAM_NAME_PATTERN, BadValue, check_json, check_text, load_json
from errands.model.streams import MAX_STREAMS, StreamPart

UpdateStatus = Literal["running", "completed", "failed"]


class ProviderError(ErrandsError):
    """The provider could not be reached or refused the request."""


class ProviderBusy(ProviderError):
    """The provider asked to be left alone for ``retry_after_s`` (HTTP 429, or 503 with
    ``Retry-After``; an adapter may raise it for its service's quota errors too). Every task of
    the provider then waits that long (at least ``MIN_RETRY_AFTER_S``, at most
    ``MAX_RETRY_AFTER_S``), and the attempt does not count: a task kept waiting by a provider
    that never recovers ends ``expired`` at its ``expires_at``, like any task that never ran."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = bounded_hold_s(retry_after_s)


#: A Retry-After beyond this is taken as this (a provider's mistake must not stop it for days).
MAX_RETRY_AFTER_S = 3600.0
#: A Retry-After below this (0, a date already past) is taken as this: a hold must not turn
#: into a loop of claims and releases as fast as the provider answers.
MIN_RETRY_AFTER_S = 1.0


def bounded_hold_s(seconds: float) -> float:
    """How long a provider's wait holds it: ``seconds`` within the bounds above."""
    return min(max(seconds, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


#: How long a 429 without Retry-After holds its provider.
DEFAULT_RETRY_AFTER_S = 5.0


def retry_after_s(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay-seconds or an HTTP date), at least
    0 (:class:`ProviderBusy` bounds it); ``None`` when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit() and len(value) < 12:
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True, slots=True)
class Submission:
    """What a provider is given: the task, and where to report."""

    task_id: str
    type: str
    owner: str
    input: Any
    attempt: int
    callback_url: str  # POST /v1/hooks/{provider}: for services that sign their webhooks
    capability_url: str  # a secret URL for this task and attempt only: for services that cannot sign


@dataclass(frozen=True, slots=True)
class Update:
    """A provider's report on a job."""

    status: UpdateStatus
    external_id: str | None = None
    progress: int | None = None
    message: str | None = None
    result: Any = None
    error_code: str | None = None
    error_message: str | None = None
    #: Chunks for the task's output streams (see :func:`parse_streams`).
    streams: tuple[StreamPart, ...] = ()

    def __post_init__(self) -> None:
        # Every report (webhook, capability URL, poll) becomes an Update: the one place where
        # what a provider says is held to what errands can store.
        try:
            for what, text in (
                ("id", self.external_id),
                ("message", self.message),
                ("error code", self.error_code),
                ("error message", self.error_message),
            ):
                if text is not None:
                    check_text(text, f"The report's {what}")
            check_json(self.result, what="output")
            for part in self.streams:
                if not re.match(STREAM_NAME_PATTERN, part.name):
                    raise BadValue(
                        f"the stream name {part.name[:64]!r} is not 1 to 64 letters, digits, '_', '.' or '-'"
                    )
                if not 0 <= part.index < 2**31:
                    raise BadValue("a stream index is an integer from 0")
                for chunk in part.chunks:
                    if isinstance(chunk, str):
                        check_text(chunk, "A stream chunk")
                    else:
                        check_json(chunk, what="a stream chunk")
        except BadValue as exc:
            raise BadRequest(f"{exc}.") from None

    @property
    def final(self) -> bool:
        return self.status != "running"


@dataclass(frozen=True, slots=True)
class Inbound:
    """A webhook as received: lower-case header names and the raw body."""

    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return load_json(self.body)
        except BadValue as exc:
            raise BadRequest(f"The webhook body is not JSON errands accepts: {exc}.") from None


class Callbacks:
    """Where providers report for a task: the signed endpoint and the task's capability URL."""

    def __init__(self, base_url: str, signer: CapabilitySigner) -> None:
        self.base_url = base_url.rstrip("/")
        self._signer = signer

    def signed(self, provider: str) -> str:
        return f"{self.base_url}/v1/hooks/{provider}"

    def capability(self, task_id: str, attempt: int, nonce: str) -> str:
        return f"{self.base_url}/v1/hooks/callback/{self._signer.token(task_id, attempt, nonce)}"


class RateLimiter:
    """At most ``per_s`` calls per second (a token bucket with a burst of one second's worth)."""

    def __init__(self, per_s: float) -> None:
        self.per_s = per_s
        self._tokens = per_s
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self._tokens = min(self.per_s, self._tokens + (now - self._at) * self.per_s)
                self._at = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await asyncio.sleep((1 - self._tokens) / self.per_s)

    async def __aexit__(self, *exc: object) -> None:
        return None


class Provider(abc.ABC):
    """An external service that performs tasks (see the module docstring)."""

    #: The path segment of the signed webhook endpoint: ``POST /v1/hooks/{name}``.
    name: str

    @abc.abstractmethod
    async def submit(self, job: Submission) -> str:
        """Hand the job to the service; return its id for it. Raise :class:`ProviderError`."""

    @abc.abstractmethod
    def verify(self, inbound: Inbound, *, now: float) -> str:
        """Check a webhook's signature and freshness; return its delivery id (for
        de-duplication). Raise :class:`errands.errors.Unauthorized`."""

    @abc.abstractmethod
    def parse(self, inbound: Inbound) -> Update:
        """Read a verified webhook. Raise :class:`errands.errors.BadRequest` if malformed."""

    def parse_callback(self, inbound: Inbound) -> Update:
        """Read a report sent to a task's capability URL; the generic format by default."""
        return parse_generic(inbound.json())

    @abc.abstractmethod
    async def poll(self, external_id: str) -> Update:
        """Ask the service for the job's state. Raise :class:`ProviderError`."""

    async def cancel(self, external_id: str) -> bool:
        """Stop the job if the service can; ``False`` when it cannot."""
        return False

    async def aclose(self) -> None:  # noqa: B027 - a default; adapters with connections override it
        """Release connections."""


class HttpProvider(Provider):
    """A provider reached over HTTP with httpx: one client, an optional rate limit, and
    errors turned into :class:`ProviderError` whose message is safe to show (no body, no secret)."""

    def __init__(self, *, headers: Mapping[str, str] | None = None, rate_per_s: float | None = None) -> None:
        self._headers = dict(headers or {})
        self._limiter = RateLimiter(rate_per_s) if rate_per_s else None
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(headers=self._headers, timeout=httpx.Timeout(20.0, connect=5.0))
        return self._client

    async def _request(self, method: str, url: str, *, json: Any = None) -> Any:
        """The JSON answer of a successful request (``None`` for an empty body)."""
        try:
            if self._limiter is not None:
                async with self._limiter:
                    response = await self._http().request(method, url, json=json)
            else:
                response = await self._http().request(method, url, json=json)
        except httpx.HTTPError as exc:
            raise ProviderError(f"{type(exc).__name__} while calling {self.name}") from exc
        if response.status_code in (429, 503):
            wait_s = retry_after_s(response.headers.get("retry-after"), now=time.time())
            if wait_s is None and response.status_code == 429:
                wait_s = DEFAULT_RETRY_AFTER_S
            if wait_s is not None:
                wait_s = bounded_hold_s(wait_s)
                raise ProviderBusy(
                    f"{self.name} answered HTTP {response.status_code}, to wait {wait_s:g} s",
                    retry_after_s=wait_s,
                )
        if response.status_code >= 400:
            raise ProviderError(f"{self.name} answered HTTP {response.status_code}")
        if not response.content:
            return None
        try:
            return load_json(response.content)
        except BadValue:
            raise ProviderError(f"{self.name} answered something that is not JSON errands accepts") from None

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


_STATUS: dict[str, UpdateStatus] = {
    "queued": "running",
    "starting": "running",
    "running": "running",
    "processing": "running",
    "succeeded": "completed",
    "completed": "completed",
    "success": "completed",
    "failed": "failed",
    "fail": "failed",
    "error": "failed",
    "canceled": "failed",
    "cancelled": "failed",
    "aborted": "failed",
}


def parse_streams(value: Any) -> tuple[StreamPart, ...]:
    """A report's ``stream``: ``{"name", "index", "chunks": [...]}``, or a list of them (``name``
    defaults to ``text``; ``index`` is the first chunk's position in the attempt's stream, from 0,
    so that a repeated report lands once)."""
    if value is None:
        return ()
    parts = value if isinstance(value, list) else [value]
    if len(parts) > MAX_STREAMS:
        raise BadRequest(f"A report carries chunks for at most {MAX_STREAMS} streams.")
    found = []
    for part in parts:
        if not isinstance(part, dict):
            raise BadRequest("stream must be an object {name, index, chunks} or a list of them.")
        name, index, chunks = part.get("name", "text"), part.get("index"), part.get("chunks")
        if not isinstance(name, str):
            raise BadRequest("A stream's name must be a string.")
        if isinstance(index, bool) or not isinstance(index, int):
            raise BadRequest("A stream's index must be an integer (the first chunk's position).")
        if not isinstance(chunks, list):
            raise BadRequest("A stream's chunks must be a list.")
        found.append(StreamPart(name, index, tuple(chunks)))
    return tuple(found)


def parse_generic(data: Any) -> Update:
    """The generic report: ``{"id"?, "status", "progress"?, "message"?, "output"?, "error"?,
    "stream"?}`` (``stream``: see :func:`parse_streams`).

    ``status`` is one of queued, running, succeeded, failed or canceled (and a few synonyms);
    ``error`` is a string or ``{"code", "message"}``.
    """
    if not isinstance(data, dict):
        raise BadRequest("The report must be a JSON object.")
    status = _STATUS.get(str(data.get("status", "")).lower())
    if status is None:
        raise BadRequest("The report has no known status.")
    progress = data.get("progress")
    if progress is not None and (isinstance(progress, bool) or not isinstance(progress, int | float)):
        raise BadRequest("progress must be a number.")
    message = data.get("message")
    error = data.get("error")
    code, text = None, None
    if status == "failed":
        raw_status = str(data.get("status", "")).lower()
        code = (
            "provider_cancelled" if raw_status in ("canceled", "cancelled", "aborted") else "provider_failed"
        )
        if isinstance(error, dict):
            code = str(error.get("code") or code)[:64]
            text = str(error.get("message") or "")
        elif error is not None:
            text = str(error)
        text = (text or "The provider reported a failure.")[:500]
    external_id = data.get("id")
    return Update(
        streams=parse_streams(data.get("stream")),
        status=status,
        external_id=None if external_id is None else str(external_id),
        progress=None if progress is None else max(0, min(100, int(progress))),
        message=None if message is None else str(message)[:1000],
        result=data.get("output"),
        error_code=code,
        error_message=text,
    )
