"""Who is calling: admin keys and signed owner tokens.

* **Admin keys** (``eka_…``) act for any owner. They come from ``ERRANDS_ADMIN_KEY`` or are
  generated at first start; the database keeps only their SHA-256.
* **Owner tokens** (``eto_…``) are minted by an admin with ``POST /v1/tokens``: an HMAC-SHA256
  signed, expiring statement ``{owner, scopes, task_id?}``. They act only for their owner, and only
  for one task when ``task_id`` is set. The signing secret is ``ERRANDS_SECRET`` or one generated
  once and shared through the database, so every node accepts every node's tokens.

Secrets are compared with :func:`hmac.compare_digest` and never logged.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

import orjson

from errands.errors import Forbidden, NotFound, Unauthorized
from errands.inputs import TASK_ID_PATTERN

ADMIN_PREFIX = "eka_"
TOKEN_PREFIX = "eto_"  # noqa: S105 - a prefix, not a secret
READ = "read"
WRITE = "write"
SCOPES = frozenset({READ, WRITE})
_TASK_ID = re.compile(TASK_ID_PATTERN)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of a request, as proven by its token."""

    admin: bool
    owner: str | None = None
    scopes: frozenset[str] = SCOPES
    task_id: str | None = None

    def require(self, scope: str) -> None:
        if not self.admin and scope not in self.scopes:
            raise Forbidden(f"This token lacks the '{scope}' scope.")

    def require_owner_wide(self, refusal: str) -> None:
        """For what concerns all of the owner's tasks (creating them, watching a set, credits and
        usage): a token scoped to one task is refused, with ``refusal``."""
        if self.task_id is not None:
            raise Forbidden(refusal)

    def sees(self, owner: str, task_id: str) -> bool:
        if self.admin:
            return True
        return owner == self.owner and (self.task_id is None or self.task_id == task_id)

    def check_task(self, owner: str, task_id: str) -> None:
        """Another owner's task does not exist as far as this caller can tell."""
        if not self.sees(owner, task_id):
            raise NotFound()


SYSTEM = Principal(admin=True)


def new_admin_key() -> str:
    return ADMIN_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    """Mints and verifies owner tokens with one secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"errands-owner-token:" + secret.encode()).digest()

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode(), hashlib.sha256).digest())

    def mint(
        self, *, owner: str, scopes: Iterable[str], expires_at: float, task_id: str | None = None
    ) -> str:
        body: dict[str, object] = {"o": owner, "s": sorted(set(scopes)), "x": int(expires_at)}
        if task_id is not None:
            body["t"] = task_id
        payload = _b64(orjson.dumps(body))
        return f"{TOKEN_PREFIX}{payload}.{self._sign(payload)}"

    def verify(self, token: str, *, now: float) -> Principal:
        try:
            payload, signature = token[len(TOKEN_PREFIX) :].split(".", 1)
        except ValueError:
            raise Unauthorized("The token is malformed.") from None
        if not hmac.compare_digest(signature.encode(), self._sign(payload).encode()):
            raise Unauthorized("The token is not valid.")
        try:
            body = orjson.loads(_unb64(payload))
            owner, scopes, expires_at = body["o"], frozenset(body["s"]), float(body["x"])
            task_id = body.get("t")
        except (ValueError, KeyError, TypeError):
            raise Unauthorized("The token is malformed.") from None
        if expires_at <= now:
            raise Unauthorized("The token has expired.")
        return Principal(admin=False, owner=owner, scopes=scopes & SCOPES, task_id=task_id)


class CapabilitySigner:
    """Capability tokens: the secret path segment of a task's callback URL.

    ``{task_id}.{attempt}.{mac}`` where the MAC covers the task, the attempt and the attempt's
    random nonce (stored with the task): a token proves nothing about another task, and stops
    working when the task moves to another attempt.
    """

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"errands-capability:" + secret.encode()).digest()

    def _mac(self, task_id: str, attempt: int, nonce: str) -> str:
        message = f"{task_id}:{attempt}:{nonce}".encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def token(self, task_id: str, attempt: int, nonce: str) -> str:
        return f"{task_id}.{attempt}.{self._mac(task_id, attempt, nonce)}"

    @staticmethod
    def parse(token: str) -> tuple[str, int, str] | None:
        """``(task_id, attempt, mac)`` of a well-formed token, else ``None``."""
        task_id, _, rest = token.partition(".")
        attempt, _, mac = rest.partition(".")
        if not _TASK_ID.match(task_id) or not (attempt.isascii() and attempt.isdigit()) or len(attempt) > 9:
            return None
        if not mac or len(mac) > 64 or not mac.isascii():
            return None
        return task_id, int(attempt), mac

    def valid(self, mac: str, *, task_id: str, attempt: int, nonce: str | None, current_attempt: int) -> bool:
        """Whether ``mac`` proves the token was made for this task's current attempt. The MAC is
        computed and compared whatever else is wrong, so every refusal costs the same."""
        expected = self._mac(task_id, attempt, nonce or "")
        matches = hmac.compare_digest(mac.encode(), expected.encode())
        return matches and nonce is not None and attempt == current_attempt


class Authenticator:
    """Turns a presented credential into a :class:`Principal`, or raises :class:`Unauthorized`."""

    def __init__(self, signer: TokenSigner, admin_hashes: Iterable[str]) -> None:
        self.signer = signer
        self._admin_hashes = set(admin_hashes)

    def set_admin_hashes(self, hashes: Iterable[str]) -> None:
        self._admin_hashes = set(hashes)

    def is_admin_key(self, key: str) -> bool:
        # Only SHA-256 digests are compared: timing reveals nothing an attacker can steer.
        return hash_key(key) in self._admin_hashes

    def authenticate(self, credential: str | None, *, now: float) -> Principal:
        if not credential:
            raise Unauthorized()
        if credential.startswith(TOKEN_PREFIX):
            return self.signer.verify(credential, now=now)
        if self.is_admin_key(credential):
            return SYSTEM
        raise Unauthorized("The token is not valid.")
