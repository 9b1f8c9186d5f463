"""Admin keys, owner tokens and what a principal may see."""

from __future__ import annotations

import pytest

from errands.auth import Authenticator, Principal, TokenSigner, hash_key
from errands.errors import Forbidden, NotFound, Unauthorized

NOW = 1_000_000.0


def test_owner_token_round_trip() -> None:
    signer = TokenSigner("s3cret")
    token = signer.mint(owner="alice", scopes=["read"], expires_at=NOW + 60, task_id="t1")
    principal = signer.verify(token, now=NOW)
    assert principal == Principal(admin=False, owner="alice", scopes=frozenset({"read"}), task_id="t1")


@pytest.mark.parametrize(
    "mangle",
    [
        lambda t: t[:-2] + ("AA" if not t.endswith("AA") else "BB"),  # signature
        lambda t: t.replace("eto_", "eto_x", 1),  # payload
        lambda t: t.split(".")[0],  # no signature
        lambda t: "eto_" + "!!!.???",
    ],
)
def test_tampered_tokens_are_refused(mangle: object) -> None:
    signer = TokenSigner("s3cret")
    token = signer.mint(owner="alice", scopes=["read", "write"], expires_at=NOW + 60)
    with pytest.raises(Unauthorized):
        signer.verify(mangle(token), now=NOW)  # type: ignore[operator]


def test_a_token_signed_with_another_secret_is_refused() -> None:
    token = TokenSigner("one").mint(owner="alice", scopes=["read"], expires_at=NOW + 60)
    with pytest.raises(Unauthorized):
        TokenSigner("two").verify(token, now=NOW)


def test_expired_tokens_are_refused() -> None:
    signer = TokenSigner("s3cret")
    token = signer.mint(owner="alice", scopes=["read"], expires_at=NOW)
    with pytest.raises(Unauthorized, match="expired"):
        signer.verify(token, now=NOW)


def test_authenticator_knows_admin_keys_by_hash_only() -> None:
    auth = Authenticator(TokenSigner("s"), {hash_key("eka_admin")})
    assert auth.authenticate("eka_admin", now=NOW).admin
    for bad in (None, "", "eka_other", "random"):
        with pytest.raises(Unauthorized):
            auth.authenticate(bad, now=NOW)


def test_principals_see_only_their_owner_and_task() -> None:
    alice = Principal(admin=False, owner="alice")
    scoped = Principal(admin=False, owner="alice", task_id="t1")
    assert alice.sees("alice", "t9")
    assert not alice.sees("bob", "t9")
    assert scoped.sees("alice", "t1")
    assert not scoped.sees("alice", "t2")
    with pytest.raises(NotFound):
        scoped.check_task("alice", "t2")
    assert Principal(admin=True).sees("anyone", "any")


def test_scopes_are_enforced() -> None:
    reader = Principal(admin=False, owner="alice", scopes=frozenset({"read"}))
    reader.require("read")
    with pytest.raises(Forbidden):
        reader.require("write")
