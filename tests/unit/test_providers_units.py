"""Webhook signatures, provider reports and the decisions they drive, without I/O."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook

from errands import model, signing
from errands.auth import CapabilitySigner
from errands.errors import BadRequest, InvalidTransition, Unauthorized
from errands.model import EventType, Status, TaskError
from errands.providers import Inbound, ProviderError, parse_generic
from errands.providers.coze import history_update
from errands.providers.replicate import prediction_update
from tests.unit.test_model import NOW, running

SECRET = signing.new_secret()
OTHER = signing.new_secret()


def test_our_signatures_verify_with_the_standardwebhooks_package() -> None:
    body = b'{"id": "job_1", "status": "succeeded"}'
    now = int(time.time())
    headers = signing.sign([signing.secret_key(SECRET)], "msg_1", now, body)
    assert Webhook(SECRET).verify(body, headers) == {"id": "job_1", "status": "succeeded"}


def test_the_standardwebhooks_package_signatures_verify_with_ours() -> None:
    body = '{"id": "job_1", "status": "running"}'
    now = datetime.now(tz=UTC)
    signature = Webhook(SECRET).sign("msg_2", now, body)
    headers = {
        "webhook-id": "msg_2",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
    }
    assert signing.Verifier([SECRET]).verify(headers, body.encode(), now=now.timestamp()) == "msg_2"


def _signed(
    body: bytes, *, at: float, secrets: list[str] | None = None, message_id: str = "msg"
) -> dict[str, str]:
    keys = [signing.secret_key(s) for s in (secrets or [SECRET])]
    return signing.sign(keys, message_id, int(at), body)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: {k: v for k, v in h.items() if k != "webhook-signature"}, "not signed"),
        (lambda h: {k: v for k, v in h.items() if k != "webhook-id"}, "not signed"),
        (lambda h: {k: v for k, v in h.items() if k != "webhook-timestamp"}, "not signed"),
        (lambda h: {**h, "webhook-timestamp": "soon"}, "not a time"),
        (lambda h: {**h, "webhook-timestamp": "9" * 400}, "not a time"),
        (lambda h: {**h, "webhook-timestamp": "-1"}, "not a time"),
        (lambda h: {**h, "webhook-timestamp": "1e9"}, "not a time"),
        (lambda h: {**h, "webhook-timestamp": "٣٣٣"}, "not a time"),
        (lambda h: {**h, "webhook-timestamp": "9" * 12}, "window"),
        (lambda h: {**h, "webhook-id": "a\x00"}, "NUL"),
        (lambda h: {**h, "webhook-timestamp": str(int(NOW) - 301)}, "window"),
        (lambda h: {**h, "webhook-timestamp": str(int(NOW) + 301)}, "window"),
        (lambda h: {**h, "webhook-signature": "v1,AAAA"}, "does not match"),
        (
            lambda h: {**h, "webhook-signature": h["webhook-signature"].replace("v1,", "v2,")},
            "does not match",
        ),
        (lambda h: {**h, "webhook-id": "another"}, "does not match"),
    ],
)
def test_forged_stale_and_unsigned_webhooks_are_refused(mutate: Any, reason: str) -> None:
    body = b'{"status": "succeeded"}'
    headers = mutate(_signed(body, at=NOW))
    with pytest.raises(Unauthorized, match=reason):
        signing.Verifier([SECRET]).verify(headers, body, now=NOW)


def test_a_tampered_body_is_refused() -> None:
    headers = _signed(b'{"status": "succeeded"}', at=NOW)
    with pytest.raises(Unauthorized):
        signing.Verifier([SECRET]).verify(headers, b'{"status": "failed"}', now=NOW)


def test_key_rotation_accepts_either_secret_and_several_signatures() -> None:
    body = b"{}"
    rotating = signing.Verifier([OTHER, SECRET])
    assert rotating.verify(_signed(body, at=NOW, secrets=[SECRET]), body, now=NOW) == "msg"
    assert rotating.verify(_signed(body, at=NOW, secrets=[OTHER]), body, now=NOW) == "msg"
    both = _signed(body, at=NOW, secrets=[OTHER, SECRET])
    assert len(both["webhook-signature"].split(" ")) == 2
    assert signing.Verifier([SECRET]).verify(both, body, now=NOW) == "msg"


@pytest.mark.parametrize("bad", ["whsec_not base64!", "whsec_", "whsec_YWJj"])
def test_bad_secrets_are_refused_at_configuration(bad: str) -> None:
    from errands.errors import ConfigError

    with pytest.raises(ConfigError):
        signing.Verifier([bad])


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        ({"id": "j", "status": "queued"}, "running", None),
        ({"id": "j", "status": "running", "progress": 40, "message": "half"}, "running", None),
        ({"id": "j", "status": "succeeded", "output": {"a": 1}}, "completed", None),
        ({"id": "j", "status": "failed", "error": "boom"}, "failed", "provider_failed"),
        ({"id": "j", "status": "failed", "error": {"code": "nsfw", "message": "no"}}, "failed", "nsfw"),
        ({"id": "j", "status": "canceled"}, "failed", "provider_cancelled"),
    ],
)
def test_the_generic_report(data: dict[str, Any], status: str, code: str | None) -> None:
    update = parse_generic(data)
    assert (update.status, update.error_code, update.external_id) == (status, code, "j")


@pytest.mark.parametrize("bad", [[], "x", {"status": "pondering"}, {"status": "running", "progress": "half"}])
def test_malformed_reports_are_refused(bad: Any) -> None:
    with pytest.raises(BadRequest):
        parse_generic(bad)


def test_replicate_predictions() -> None:
    starting = prediction_update({"id": "p1", "status": "starting", "logs": None})
    assert (starting.status, starting.external_id, starting.progress) == ("running", "p1", None)
    logs = "loading\n 45%|####     | 9/20 [00:01<00:01]\n"
    assert prediction_update({"id": "p1", "status": "processing", "logs": logs}).progress == 45
    done = prediction_update({"id": "p1", "status": "succeeded", "output": ["https://x/y.png"]})
    assert (done.status, done.result) == ("completed", ["https://x/y.png"])
    failed = prediction_update({"id": "p1", "status": "failed", "error": "CUDA out of memory"})
    assert (failed.status, failed.error_code, failed.error_message) == (
        "failed",
        "provider_failed",
        "CUDA out of memory",
    )
    assert prediction_update({"id": "p1", "status": "canceled"}).error_code == "provider_cancelled"
    assert prediction_update({"id": "p1", "status": "aborted"}).status == "failed"
    with pytest.raises(BadRequest):
        prediction_update({"id": "p1", "status": "dreaming"})


def test_coze_run_histories() -> None:
    def answer(run: dict[str, Any]) -> dict[str, Any]:
        return {"code": 0, "msg": "", "data": [run]}

    assert history_update(answer({"execute_status": "Running"}), "e1").status == "running"
    done = history_update(answer({"execute_status": "Success", "output": '{"Output": "hi"}'}), "e1")
    assert (done.status, done.result) == ("completed", {"Output": "hi"})
    plain = history_update(answer({"execute_status": "Success", "output": "not json"}), "e1")
    assert plain.result == "not json"
    failed = history_update(answer({"execute_status": "Fail", "error_message": "node 3 failed"}), "e1")
    assert (failed.status, failed.error_message) == ("failed", "node 3 failed")
    with pytest.raises(ProviderError):
        history_update({"code": 4100, "msg": "invalid token"}, "e1")


def handed_off(**fields: Any) -> model.TaskRecord:
    return running(lease_token=None, lease_expires_at=None, external_id="job_1", poll_at=NOW + 60, **fields)


def test_handing_off_drops_the_lease_and_keeps_the_deadline() -> None:
    change = model.hand_off(running(), now=NOW, lease_token="lease-1", external_id="job_1", poll_at=NOW + 60)
    new = change.record
    assert (new.status, new.external_id, new.lease_token, new.poll_at) == (
        Status.PROCESSING,
        "job_1",
        None,
        NOW + 60,
    )
    assert new.deadline_at == running().deadline_at
    assert change.event is EventType.PROGRESS


def test_reports_move_a_task_forward_only() -> None:
    r = handed_off(progress=50)
    progress = model.external_report(
        r, now=NOW, external_id="job_1", status="running", progress=30, by_webhook=True
    )
    assert progress is not None
    assert (progress.record.progress, progress.record.webhook_received) == (50, True)
    assert model.external_report(progress.record, now=NOW, external_id="job_1", status="running") is None
    done = model.external_report(r, now=NOW, external_id="job_1", status="completed", result={"ok": 1}).record
    assert (done.status, done.result, done.poll_at, done.webhook_received) == (
        Status.COMPLETED,
        {"ok": 1},
        None,
        False,
    )
    with pytest.raises(InvalidTransition):  # a running report after the end
        model.external_report(done, now=NOW, external_id="job_1", status="running", progress=99)
    with pytest.raises(InvalidTransition):  # a second end
        model.external_report(done, now=NOW, external_id="job_1", status="failed")
    with pytest.raises(InvalidTransition):  # another job's report
        model.external_report(r, now=NOW, external_id="job_0", status="completed")
    failed = model.external_report(
        r, now=NOW, external_id="job_1", status="failed", error=TaskError("provider_failed", "x")
    ).record
    assert (failed.status, failed.error.code) == (Status.FAILED, "provider_failed")


def test_capability_tokens_hold_for_one_task_and_attempt() -> None:
    signer = CapabilitySigner("s3cret")
    token = signer.token("t1", 2, "nonce")
    parsed = CapabilitySigner.parse(token)
    assert parsed is not None
    task_id, attempt, mac = parsed
    assert signer.valid(mac, task_id=task_id, attempt=attempt, nonce="nonce", current_attempt=2)
    # an older attempt; another task with the same attempt; the same task after a new nonce
    assert not signer.valid(mac, task_id=task_id, attempt=attempt, nonce="nonce", current_attempt=3)
    assert not signer.valid(mac, task_id="t2", attempt=attempt, nonce="nonce", current_attempt=2)
    assert not signer.valid(mac, task_id=task_id, attempt=attempt, nonce="other", current_attempt=2)
    assert not signer.valid(mac, task_id=task_id, attempt=attempt, nonce=None, current_attempt=2)
    assert not CapabilitySigner("another secret").valid(
        mac, task_id="t1", attempt=2, nonce="nonce", current_attempt=2
    )
    for garbage in (
        "garbage",
        "t1.x.mac",
        "t/1.2.mac",
        "t1.2.",
        "t1.-2.mac",
        "t1.1_0.mac",
        "t1.2." + "m" * 65,
    ):
        assert CapabilitySigner.parse(garbage) is None


def test_inbound_json() -> None:
    assert Inbound({}, b'{"a": 1}').json() == {"a": 1}
    with pytest.raises(BadRequest):
        Inbound({}, b"nope").json()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("2", 2.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("999999", 999999.0),
        ("Wed, 02 Dec 2026 10:00:30 GMT", 30.0),
        ("Wed, 02 Dec 2026 09:59:00 GMT", 0.0),  # a date already past
        ("-5", None),
        ("soon", None),
        ("9" * 40, None),
        (None, None),
    ],
)
def test_retry_after_is_read_as_seconds_or_a_date(header: str | None, expected: float | None) -> None:
    from errands.providers import retry_after_s

    now = datetime(2026, 12, 2, 10, 0, 0, tzinfo=UTC).timestamp()
    assert retry_after_s(header, now=now) == expected


@pytest.mark.parametrize(
    ("asked", "held"), [(0.0, 1.0), (-3.0, 1.0), (0.2, 1.0), (2.0, 2.0), (999999.0, 3600.0)]
)
def test_a_providers_wait_is_bounded(asked: float, held: float) -> None:
    """Retry-After: 0 (or a past date) must not turn a hold into a loop of claims and releases as
    fast as the provider answers; a provider's mistake must not stop it for days."""
    from errands.providers import ProviderBusy

    assert ProviderBusy("busy", retry_after_s=asked).retry_after_s == held
