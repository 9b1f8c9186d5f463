"""Standard Webhooks (https://www.standardwebhooks.com): signing and verifying HTTP callbacks.

A message carries three headers: ``webhook-id`` (unique per message, stable across retries),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature``, a space-separated list of
``v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">``, one per secret while a secret is being
rotated. Secrets are ``whsec_`` followed by the base64 of the key.

Written here rather than taken from the ``standardwebhooks`` package because errands needs a
controllable clock, several secrets on the receiving side and its own errors; the tests check
that both sign and verify each other's messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

from errands.errors import ConfigError, Unauthorized

PREFIX = "whsec_"
TOLERANCE_S = 300


def new_secret() -> str:
    return PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_`` secret (a bare base64 key is accepted too)."""
    encoded = secret.removeprefix(PREFIX)
    try:
        key = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("A webhook secret must be 'whsec_' followed by base64.") from None
    if len(key) < 16:
        raise ConfigError("A webhook secret must hold at least 16 bytes.")
    return key


def signature(key: bytes, message_id: str, timestamp: int, body: bytes) -> str:
    signed = b"%s.%d.%s" % (message_id.encode(), timestamp, body)
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def sign(secret_keys: Sequence[bytes], message_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three headers of a message signed with every key (the old and the new one while rotating)."""
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(k, message_id, timestamp, body) for k in secret_keys),
    }


class Verifier:
    """Checks a message against one or more secrets, in constant time, within a time window."""

    def __init__(self, secret_list: Sequence[str], *, tolerance_s: float = TOLERANCE_S) -> None:
        if not secret_list:
            raise ConfigError("A webhook verifier needs at least one secret.")
        self._keys = [secret_key(s) for s in secret_list]
        self.tolerance_s = tolerance_s

    def verify(self, headers: Mapping[str, str], body: bytes, *, now: float) -> str:
        """The message id of an authentic, fresh message; :class:`Unauthorized` otherwise."""
        message_id = headers.get("webhook-id", "")
        stamp = headers.get("webhook-timestamp", "")
        signatures = headers.get("webhook-signature", "")
        if not message_id or not stamp or not signatures:
            raise Unauthorized(
                "The webhook is not signed (webhook-id, -timestamp and -signature are required)."
            )
        if len(message_id) > 256 or "\x00" in message_id:
            raise Unauthorized("The webhook-id is too long or holds a NUL character.")
        # Unix seconds: at most 12 digits (the year 33658), so no huge number reaches arithmetic.
        if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
            raise Unauthorized("The webhook-timestamp is not a time in Unix seconds.")
        timestamp = int(stamp)
        if abs(now - timestamp) > self.tolerance_s:
            raise Unauthorized("The webhook-timestamp is outside the accepted window.")
        offered = [s.encode() for s in signatures.split(" ") if s.startswith("v1,")]
        for key in self._keys:
            expected = signature(key, message_id, timestamp, body).encode()
            # Check every offered signature so the time taken does not depend on which matched.
            if sum(hmac.compare_digest(expected, candidate) for candidate in offered):
                return message_id
        raise Unauthorized("The webhook signature does not match.")
