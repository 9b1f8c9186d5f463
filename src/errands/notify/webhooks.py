"""Outbound webhooks in the Standard Webhooks format, through the SSRF guard.

Each message is a ``POST`` of ``{type, timestamp, data: {task}}`` with ``webhook-id`` (the
message id, the same on every attempt), ``webhook-timestamp`` (when this attempt was made) and
``webhook-signature`` (one ``v1,`` signature per secret: two while a rotated secret is in its
grace period). Only the first few hundred bytes of the answer are read, for the delivery log.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpcore
import httpx

from errands import signing
from errands.clock import Clock
from errands.notify.guard import AddressPolicy, GuardedBackend, Refused
from errands.notify.policy import EXCERPT_CHARS, Sent, http_outcome

_READ_BYTES = 1024


class WebhookSender:
    """Sends signed messages; one connection pool for every receiver."""

    def __init__(self, policy: AddressPolicy, clock: Clock, *, timeout_s: float = 15.0) -> None:
        self.policy = policy
        self.clock = clock
        self.timeout_s = timeout_s
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=256,
            max_keepalive_connections=64,
            keepalive_expiry=30.0,
            network_backend=GuardedBackend(policy),
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def send(self, url: str, secrets: Sequence[str], message_id: str, body: bytes) -> Sent:
        """One attempt at delivering ``body`` to ``url``; never raises for the receiver's faults."""
        started = time.perf_counter()

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1000

        try:
            self.policy.check_url(url)
        except Refused as exc:
            return Sent(False, error=exc.reason, final=True)
        keys = [signing.secret_key(s) for s in secrets]
        headers = {
            "content-type": "application/json",
            "user-agent": "errands-webhooks/1",
            **signing.sign(keys, message_id, int(self.clock.now()), body),
        }
        timeout = {"connect": self.timeout_s, "read": self.timeout_s, "write": self.timeout_s, "pool": 5.0}
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._pool.stream(
                    "POST", url, headers=list(headers.items()), content=body, extensions={"timeout": timeout}
                ) as response:
                    excerpt = b""
                    async for chunk in response.aiter_stream():
                        excerpt += chunk
                        if len(excerpt) >= _READ_BYTES:
                            break
                    answer = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                    text = excerpt.decode("utf-8", "replace")[:EXCERPT_CHARS] or None
                    return http_outcome(
                        response.status, answer, latency_ms=elapsed_ms(), excerpt=text, now=self.clock.now()
                    )
        except Refused as exc:
            return Sent(False, latency_ms=elapsed_ms(), error=exc.reason, final=True)
        except LookupError as exc:
            return Sent(False, latency_ms=elapsed_ms(), error=str(exc))
        except TimeoutError:
            return Sent(False, latency_ms=elapsed_ms(), error=f"no answer within {self.timeout_s:g} s")
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            return Sent(False, latency_ms=elapsed_ms(), error=_describe(exc))


def _describe(exc: Exception) -> str:
    kind = {
        httpcore.ConnectError: "could not connect",
        httpcore.ConnectTimeout: "connecting timed out",
        httpcore.ReadTimeout: "no answer in time",
        httpcore.WriteTimeout: "sending timed out",
        httpcore.PoolTimeout: "too many deliveries at once",
        httpcore.ReadError: "the connection broke while reading",
        httpcore.WriteError: "the connection broke while sending",
        httpcore.RemoteProtocolError: "the receiver broke the HTTP protocol",
    }
    for cls, text in kind.items():
        if isinstance(exc, cls):
            return text
    return type(exc).__name__
