"""Notification decisions without I/O: schedules, patterns, answers, routes, URLs, WeChat data."""

from __future__ import annotations

import dataclasses
import ipaddress

import orjson
import pytest

from errands import model
from errands.clock import ManualClock
from errands.config import parse_networks, parse_schedule
from errands.errors import ConfigError
from errands.guard import AddressPolicy, Refused
from errands.model import Event, EventType, Status, matches
from errands.notify.policy import (
    Route,
    Sent,
    after_attempt,
    counts_for_notified,
    http_outcome,
    parse_retry_after,
    plan,
    retry_delay_s,
)
from errands.notify.wechat import WeChat, WeChatTemplate, fit
from errands.registry import WeChatConfig
from errands.store.records import AttemptResult, Channel, Endpoint, Health, Message, MessageState
from tests.unit.test_model import running

NOW = 1_800_000_000.0
SCHEDULE = parse_schedule("0s,5s,5m,30m,2h,5h,10h,10h")


def message(**fields: object) -> Message:
    values: dict[str, object] = dict(
        id="msg_1", seq=7, event_type="task.completed", task_id="t1", owner="alice", task_type="work",
        channel="endpoint", target="ep_1", payload=b"{}", final=True, state="pending", attempts=1,
        next_at=NOW + 60, created_at=NOW, updated_at=NOW, lease_token="lease",
    )  # fmt: skip
    values.update(fields)
    return Message(**values)  # type: ignore[arg-type]


ENDPOINT = Endpoint(
    id="ep_1", url="https://example.com/h", description=None, events=("task.*",), types=None, owners=None,
    secret="whsec_x", previous_secret=None, previous_secret_until=None, enabled=True, disabled_reason=None,
    failing_since=None, throttled_until=None, created_at=NOW - 100, updated_at=NOW - 100,
)  # fmt: skip


def decide(sent: Sent, *, attempts: int = 1, channel: str = "endpoint", **kw: float) -> AttemptResult:
    return after_attempt(
        message(attempts=attempts, channel=channel), sent, now=NOW, schedule=SCHEDULE,
        jitter=kw.get("jitter", 0.0), rnd=kw.get("rnd", 0.5),
        disable_after_s=kw.get("disable_after_s", 5 * 86_400),
    )  # fmt: skip


def health(result: AttemptResult, endpoint: Endpoint = ENDPOINT) -> Health:
    assert result.health is not None
    return result.health(endpoint)


def test_schedules_and_durations_parse() -> None:
    assert SCHEDULE == (0, 5, 300, 1800, 7200, 18000, 36000, 36000)
    assert parse_schedule("250ms, 2 , 1d") == (0.25, 2.0, 86_400.0)
    for bad in ["", "5x", "-1s", "1,,x"]:
        with pytest.raises(ConfigError):
            parse_schedule(bad)


def test_patterns_match_every_type_but_notified_which_needs_its_own_subscription() -> None:
    assert matches(["task.*"], "task.progress") and matches(["*"], "task.failed")
    assert not matches(["task.*"], "task.notified") and matches(["task.notified"], "task.notified")
    assert not matches(["task.failed"], "task.completed")


def test_retry_delays_follow_the_schedule_within_the_jitter() -> None:
    assert [retry_delay_s(n, SCHEDULE, jitter=0, rnd=0.3) for n in range(1, 8)] == list(SCHEDULE[1:])
    assert retry_delay_s(8, SCHEDULE, jitter=0.1, rnd=0.5) is None
    low = retry_delay_s(2, SCHEDULE, jitter=0.1, rnd=0.0)
    high = retry_delay_s(2, SCHEDULE, jitter=0.1, rnd=0.999999)
    assert low == pytest.approx(270) and high == pytest.approx(330, rel=1e-5)


def test_answers_mean_what_the_issue_says() -> None:
    assert http_outcome(204, {}, latency_ms=1, excerpt=None, now=NOW).ok
    gone = http_outcome(410, {}, latency_ms=1, excerpt=None, now=NOW)
    assert not gone.ok and gone.final and gone.gone
    for status in (429, 502, 503, 504):
        assert http_outcome(status, {}, latency_ms=1, excerpt=None, now=NOW).throttle
    plain = http_outcome(500, {"retry-after": "30"}, latency_ms=1, excerpt=None, now=NOW)
    assert not plain.throttle and plain.retry_after_s == 30
    assert not http_outcome(301, {}, latency_ms=1, excerpt=None, now=NOW).ok  # redirects are not followed


def test_retry_after_is_read_as_seconds_or_a_date_and_capped() -> None:
    assert parse_retry_after("120", now=NOW) == 120
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0 - 60) == pytest.approx(60)
    assert parse_retry_after("99999999", now=NOW) == 86_400
    assert parse_retry_after("soon", now=NOW) is None and parse_retry_after(None, now=NOW) is None


def test_after_an_attempt() -> None:
    ok = decide(Sent(True, 200))
    assert ok.state is MessageState.DELIVERED and health(ok) == Health(None, None, None)
    retry = decide(Sent(False, 500), attempts=2)
    assert (retry.state, retry.next_at) == (MessageState.PENDING, NOW + 300)
    assert health(retry) == Health(NOW, None, None)  # failing since now
    slow = decide(Sent(False, 429, throttle=True, retry_after_s=900))
    assert slow.next_at == NOW + 900 and health(slow).throttled_until == NOW + 900
    overloaded = decide(Sent(False, 503, throttle=True))
    assert health(overloaded).throttled_until == NOW + 5
    last = decide(Sent(False, 500), attempts=8)
    assert last.state is MessageState.FAILED
    gone = decide(Sent(False, 410, final=True, gone=True))
    assert gone.state is MessageState.FAILED and "410" in (health(gone).disabled_reason or "")
    days = dataclasses.replace(ENDPOINT, failing_since=NOW - 5 * 86_400)
    assert health(decide(Sent(False, 500)), days).disabled_reason
    assert health(decide(Sent(False, 500))).disabled_reason is None
    assert decide(Sent(False, error="boom"), channel="hook").health is None


def test_an_endpoints_health_is_decided_on_its_row_as_it_is_now() -> None:
    """The verdict is made from the endpoint the store read under its lock, not from the one the
    sender claimed with: a success elsewhere meanwhile, or an earlier throttle, is kept."""
    throttled = dataclasses.replace(ENDPOINT, throttled_until=NOW + 3600, failing_since=NOW - 60)
    assert health(decide(Sent(False, 503, throttle=True)), throttled).throttled_until == NOW + 3600
    assert health(decide(Sent(False, 500)), throttled).failing_since == NOW - 60
    assert health(decide(Sent(True, 200)), throttled) == Health(None, NOW + 3600, None)


def test_only_messages_about_the_end_to_someone_outside_count_for_notification_sent() -> None:
    for channel in (Channel.ENDPOINT, Channel.URL, Channel.WECHAT):
        assert counts_for_notified(Route(channel, "x", ()), end=True)
        assert not counts_for_notified(Route(channel, "x", ()), end=False)
    assert not counts_for_notified(Route(Channel.HOOK, "refund", ()), end=True)


def _event(kind: EventType, record: model.TaskRecord, at: float = NOW) -> Event:
    return Event(3, kind, at, record.id, record.owner, record.type, record.status, record.public_json())


def test_plan_routes_events_by_type_owner_and_time_and_the_notify_url_hears_the_end() -> None:
    ended = running().evolve(status=Status.COMPLETED, notify_url="https://app.example/cb", result={"x": 1})
    routes = [
        Route(Channel.ENDPOINT, "all", ("task.*",)),
        Route(Channel.ENDPOINT, "bob", ("task.*",), owners=("bob",)),
        Route(Channel.ENDPOINT, "other-type", ("task.*",), types=("video",)),
        Route(Channel.ENDPOINT, "newer", ("task.*",), since=NOW + 1),
    ]
    made = plan([_event(EventType.COMPLETED, ended)], routes, now=NOW, new_id=lambda: "m")
    assert [(m.channel, m.target, m.final) for m in made] == [
        ("endpoint", "all", True), ("url", "https://app.example/cb", True),
    ]  # fmt: skip
    body = orjson.loads(made[0].payload)
    assert body["type"] == "task.completed" and body["data"]["task"]["result"] == {"x": 1}
    progress = plan([_event(EventType.PROGRESS, running())], routes, now=NOW, new_id=lambda: "m")
    assert [(m.target, m.final) for m in progress] == [("all", False)]


def test_mark_notified_only_for_the_end_it_was_told_about() -> None:
    ended = running().evolve(status=Status.FAILED, seq=9)
    change = model.mark_notified(ended, now=NOW, seq=9)
    assert change is not None and change.record.notification_sent and change.event is EventType.NOTIFIED
    assert model.mark_notified(change.record, now=NOW, seq=9) is None  # once
    assert model.mark_notified(ended, now=NOW, seq=8) is None  # an older end
    assert model.mark_notified(running(), now=NOW, seq=running().seq) is None
    retried = model.manual_retry(change.record, now=NOW, max_manual_retries=3).record
    assert retried.notification_sent is False


def test_urls_to_the_inside_are_refused() -> None:
    strict = AddressPolicy()
    for url in ["http://127.0.0.1/", "http://10.1.2.3/", "http://169.254.169.254/", "http://[::1]/",
                "http://[fd00::1]/", "http://100.64.0.1/", "http://224.0.0.1/", "http://[::ffff:10.0.0.1]/",
                "ftp://example.com/", "http://user:pw@example.com/", "http:///nohost", "http://x:99999/",
                "https://" + "a" * 3000 + ".com/"]:  # fmt: skip
        with pytest.raises(Refused):
            strict.check_url(url)
    assert strict.check_url("https://example.com/h") == ("https", "example.com", 443)
    assert strict.check_url("http://93.184.215.14:8080/h") == ("http", "93.184.215.14", 8080)
    local = AddressPolicy(allow=parse_networks("127.0.0.0/8, ::1"))
    local.check_url("http://127.0.0.1:9000/h")
    local.check_address(ipaddress.ip_address("::1"))
    with pytest.raises(Refused):
        local.check_url("http://192.168.0.1/")
    with pytest.raises(Refused):
        AddressPolicy(https_only=True).check_url("http://example.com/")


#: Addresses that carry an address inside the network, in every form a URL can hold one.
INSIDE_HOSTS = [
    "[64:ff9b::a9fe:a9fe]",  # NAT64 of 169.254.169.254
    "[64:ff9b::7f00:1]",  # NAT64 of 127.0.0.1
    "[64:ff9b:1::a00:1]",  # NAT64 local-use prefix: never global
    "[2002:7f00:1::]",  # 6to4 of 127.0.0.1
    "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
    "[::127.0.0.1]",  # IPv4-compatible
    "[::a00:1]",  # IPv4-compatible 10.0.0.1
    "[::ffff:0:7f00:1]",  # IPv4-translated
    "[::ffff:127.0.0.1]",  # IPv4-mapped
    "[2001:0:4136:e378:8000:63bf:3fff:fdd2]",  # Teredo (client 192.0.2.45)
    "[fec0::1]",  # site-local
    "[2001:db8::1]",  # documentation
    "[3fff::1]",  # documentation (2024)
    "[4000::1]",  # reserved
    "[::2]",  # reserved (and IPv4-compatible 0.0.0.2)
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "240.0.0.1",  # reserved
    "192.88.99.1",  # 6to4 relay anycast
    "0.0.0.0",
    "255.255.255.255",
    "localhost",
    "LOCALHOST.",
    "api.localhost",
    "localhost.localdomain",
]
#: Legacy numeric forms some resolvers read as IPv4 (each is 127.0.0.1 or 8.8.8.8).
LEGACY_HOSTS = ["127.1", "2130706433", "0x7f000001", "0x7f.1", "0177.0.0.1", "127.0.0.1.", "017700000001",
                "134744072", "8.8.2056", "0"]  # fmt: skip


@pytest.mark.parametrize("host", INSIDE_HOSTS + LEGACY_HOSTS)
def test_every_form_of_an_inside_address_is_refused(host: str) -> None:
    with pytest.raises(Refused):
        AddressPolicy().check_url(f"http://{host}/hook")


@pytest.mark.parametrize("host", ["[64:ff9b::808:808]", "[2002:808:808::1]", "[::ffff:8.8.8.8]", "8.8.8.8",
                                  "example.com", "1.2.3.4.example", "0xdead.example"])  # fmt: skip
def test_public_addresses_in_any_wrapping_are_let_through(host: str) -> None:
    AddressPolicy().check_url(f"https://{host}/hook")


def test_allowed_networks_let_the_address_a_wrapper_carries_through() -> None:
    local = AddressPolicy(allow=parse_networks("127.0.0.0/8, ::1"))
    for host in ("localhost", "[::ffff:127.0.0.1]", "[64:ff9b::7f00:1]", "[::1]"):
        local.check_url(f"http://{host}:9000/h")
    with pytest.raises(Refused, match="ERRANDS_NOTIFY_ALLOW_NETWORKS"):
        AddressPolicy().check_url("http://localhost:9000/h")
    with pytest.raises(Refused):  # a legacy form stays refused: HTTP clients disagree on it
        local.check_url("http://127.1:9000/h")


async def test_names_are_resolved_and_every_address_judged() -> None:
    with pytest.raises(Refused):
        await AddressPolicy().check("http://localhost/h")
    assert await AddressPolicy(allow=parse_networks("127.0.0.0/8, ::1")).resolve("localhost", 80)
    with pytest.raises(LookupError):
        await AddressPolicy().check("http://no-such-name.invalid/h")


def test_wechat_values_are_cut_to_their_field_limits() -> None:
    assert fit("thing1", "一" * 25) == "一" * 19 + "…"
    assert fit("phrase3", "处理成功了吗") == "处理成功了"
    assert fit("name2", "a" * 12) == "a" * 10
    assert fit("thing4", "two\nlines") == "two lines"
    assert fit("custom9", "x" * 99) == "x" * 99


def test_wechat_renders_a_template_and_picks_the_type_specific_one() -> None:
    data = {"thing1": "{type}: {result[title]}", "phrase2": "{outcome}", "time3": "{finished_at}",
            "thing4": "{result[missing]}"}  # fmt: skip
    general = WeChatTemplate("T1", data=data)
    special = WeChatTemplate("T2", data={"thing1": "{type}"}, types=["video"], page=None)
    config = WeChatConfig(templates=(general, special), timezone="Asia/Shanghai")
    channel = WeChat(config, appid=None, secret=None, base_url=None, clock=ManualClock(NOW))
    task = {"id": "t1", "type": "novel", "owner": "oX", "status": "completed", "result": {"title": "三体"},
            "finished_at": "2026-11-23T02:05:00.000Z"}  # fmt: skip
    body = channel.render(general, task)
    assert body["touser"] == "oX" and body["page"] == "pages/index/index?taskId=t1"
    assert body["data"] == {
        "thing1": {"value": "novel: 三体"}, "phrase2": {"value": "已完成"},
        "time3": {"value": "2026-11-23 10:05"}, "thing4": {"value": ""},
    }  # fmt: skip
    video = _event(EventType.COMPLETED, running().evolve(type="video", status=Status.COMPLETED))
    novel = _event(EventType.COMPLETED, running().evolve(type="novel", status=Status.COMPLETED))
    assert [r.target for r in channel.pick(video)] == ["T2"]
    assert [r.target for r in channel.pick(novel)] == ["T1"]
    assert channel.pick(_event(EventType.PROGRESS, running())) == []
    with pytest.raises(ConfigError):
        WeChatConfig(templates=(WeChatTemplate("T", data={}, events=["task.nope"]),))
