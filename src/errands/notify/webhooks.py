"""Outbound webhooks in the Standard Webhooks format, through the SSRF guard.

Each message is a ``POST`` of ``{type, timestamp, data: {task}}`` with ``webhook-id`` (the
message id, the same on every attempt), ``webhook-timestamp`` (when this attempt was made) and
``webhook-signature`` (one ``v1,`` signature per secret: two while a rotated secret is in its
grace period). Only the first bytes of the answer are read, for the delivery log.

aiohttp carries them: its connection pool stays cheap with many receivers and many requests in
flight, and its resolver hook is where the guard checks every address a name resolves to before
anything connects (see :mod:`errands.guard`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from errands import signing
from errands.clock import Clock
from errands.guard import AddressPolicy, Refused
from errands.notify.policy import EXCERPT_CHARS, Sent, http_outcome

_READ_BYTES = 1024


class GuardedResolver(AbstractResolver):
    """Resolves names for aiohttp, refusing any answer inside the network (literal addresses
    never reach a resolver: :meth:`AddressPolicy.check_url` checks those)."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await self._policy.resolve(host, port)
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        pass


class WebhookSender:
    """Sends signed messages; one connection pool for every receiver."""

    def __init__(self, policy: AddressPolicy, clock: Clock, *, timeout_s: float = 15.0) -> None:
        self.policy = policy
        self.clock = clock
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.policy), limit=256, ttl_dns_cache=10, keepalive_timeout=30
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout_s),
                auto_decompress=False,
                trust_env=False,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

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
        try:
            async with self._http().post(url, data=body, headers=headers, allow_redirects=False) as response:
                excerpt = await response.content.read(_READ_BYTES)
                answer = {k.lower(): v for k, v in response.headers.items()}
                text = excerpt.decode("utf-8", "replace")[:EXCERPT_CHARS] or None
                return http_outcome(
                    response.status, answer, latency_ms=elapsed_ms(), excerpt=text, now=self.clock.now()
                )
        except Refused as exc:
            return Sent(False, latency_ms=elapsed_ms(), error=exc.reason, final=True)
        except TimeoutError:
            return Sent(False, latency_ms=elapsed_ms(), error=f"no answer within {self.timeout_s:g} s")
        except aiohttp.ClientConnectorDNSError as exc:
            cause = exc.os_error
            if isinstance(cause, Refused):
                return Sent(False, latency_ms=elapsed_ms(), error=cause.reason, final=True)
            return Sent(False, latency_ms=elapsed_ms(), error="the name could not be resolved")
        except aiohttp.ClientConnectorError:
            return Sent(False, latency_ms=elapsed_ms(), error="could not connect")
        except aiohttp.ServerDisconnectedError:
            return Sent(False, latency_ms=elapsed_ms(), error="the receiver closed the connection")
        except aiohttp.ClientError as exc:
            return Sent(False, latency_ms=elapsed_ms(), error=f"the request failed ({type(exc).__name__})")
        except LookupError as exc:
            return Sent(False, latency_ms=elapsed_ms(), error=str(exc))
