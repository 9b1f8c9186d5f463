"""The decisions of notification delivery, without I/O.

Which events become which messages (:func:`plan`) and which of them count for a task's
``notification_sent`` (:func:`counts_for_notified`), what a receiver's answer means
(:func:`http_outcome`), what follows an attempt (:func:`after_attempt`): delivered, tried again
later on the retry schedule (or later still if the receiver asked with ``Retry-After``), or given
up on; and an endpoint's health (:func:`health_after`): failing since when, throttled until
when, disabled. The order in which a destination hears a task's events is the one rule kept as
SQL, where the claim needs it (:data:`errands.store.statements.FIRST_IN_LINE`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import orjson

from errands.clock import iso
from errands.model import NOTIFY_URL_MARK, TERMINAL, TERMINAL_EVENT, Event, EventType, matches
from errands.store.records import Attempt, AttemptResult, Channel, Endpoint, Health, Message, MessageState

#: Svix's and Standard Webhooks' schedule: at once, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_SCHEDULE = "0s,5s,5m,30m,2h,5h,10h,10h"
#: Events of a task's end: what a task's own ``notify_url`` hears about.
END_EVENTS = frozenset(TERMINAL_EVENT.values())
MAX_RETRY_AFTER_S = 86_400.0
EXCERPT_CHARS = 200


# -- from events to messages -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Route:
    """A destination and the events it wants: an endpoint, a lifecycle hook, a WeChat template."""

    channel: Channel
    target: str
    events: tuple[str, ...]
    types: tuple[str, ...] | None = None
    owners: tuple[str, ...] | None = None
    since: float = 0.0  # only events from then on (an endpoint hears nothing from before it)

    def wants(self, event: Event) -> bool:
        return (
            event.at >= self.since
            and matches(self.events, event.type.value)
            and (self.types is None or event.task_type in self.types)
            and (self.owners is None or event.owner in self.owners)
        )


def endpoint_route(endpoint: Endpoint) -> Route:
    return Route(
        Channel.ENDPOINT, endpoint.id, endpoint.events, endpoint.types, endpoint.owners, endpoint.created_at
    )


def payload(event: Event) -> bytes:
    """The body of every notification of ``event``: ``{type, timestamp, data: {task}}``, or for
    output (``task.stream``, to endpoints that ask for it) ``data: {task_id, stream}``."""
    data = (
        b'{"task_id":%s,"stream":%s}' % (orjson.dumps(event.task_id), event.task_json)
        if event.type is EventType.STREAM
        else b'{"task":%s}' % event.task_json
    )
    return b'{"type":"%s","timestamp":"%s","data":%s}' % (
        event.type.value.encode(),
        (iso(event.at) or "").encode(),
        data,
    )


def notify_url_of(event: Event) -> str | None:
    """The task's own ``notify_url``, if the event is about its end and it has one."""
    if event.type not in END_EVENTS or NOTIFY_URL_MARK not in event.task_json:
        return None
    url = orjson.loads(event.task_json).get("notify_url")
    return url if isinstance(url, str) else None


def counts_for_notified(route: Route, *, end: bool) -> bool:
    """Whether a message must be delivered for its task to be ``notification_sent``: those about
    the task's end, to anyone but the app's own lifecycle hooks (which tell nobody outside)."""
    return end and route.channel != Channel.HOOK


def plan(
    events: Sequence[Event],
    routes: Sequence[Route],
    *,
    now: float,
    new_id: Callable[[], str],
    pick: Callable[[Event], Sequence[Route]] | None = None,
) -> list[Message]:
    """The messages ``events`` give rise to: one per event and destination that wants it.

    ``pick`` chooses further routes per event (the WeChat template that fits it best)."""
    messages: list[Message] = []
    for event in events:
        chosen = [r for r in routes if r.wants(event)]
        if pick is not None:
            chosen.extend(pick(event))
        url = notify_url_of(event)
        if url is not None:
            chosen.append(Route(Channel.URL, url, ()))
        if not chosen:
            continue
        body = payload(event)
        end = event.status in TERMINAL and event.type in END_EVENTS
        for route in chosen:
            messages.append(
                Message(
                    id=new_id(),
                    seq=event.seq,
                    event_type=event.type.value,
                    task_id=event.task_id,
                    owner=event.owner,
                    task_type=event.task_type,
                    channel=route.channel,
                    target=route.target,
                    payload=body,
                    final=counts_for_notified(route, end=end),
                    state=MessageState.PENDING,
                    attempts=0,
                    next_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
    return messages


# -- after an attempt --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """What a channel reports about one attempt."""

    ok: bool
    status_code: int | None = None
    latency_ms: float = 0.0
    response: str | None = None  # the start of the answer, for the delivery log
    error: str | None = None
    final: bool = False  # trying again cannot help (410, a refused address, WeChat's 43101…)
    gone: bool = False  # 410 Gone: the endpoint asked to be removed
    throttle: bool = False  # 429/502/503/504: the receiver is overloaded
    retry_after_s: float | None = None


def parse_retry_after(value: str | None, *, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), if any."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return min(max(0.0, when - now), MAX_RETRY_AFTER_S)


def http_outcome(
    status: int, headers: Mapping[str, str], *, latency_ms: float, excerpt: str | None, now: float
) -> Sent:
    """What an HTTP answer means: only ``2xx`` delivers; ``410`` disables the endpoint;
    ``429``/``502``/``503``/``504`` slow it down; ``Retry-After`` is honoured on any failure."""
    if 200 <= status < 300:
        return Sent(True, status, latency_ms, excerpt)
    retry_after = parse_retry_after(headers.get("retry-after"), now=now)
    if status == 410:
        gone = "the receiver answered 410 Gone"
        return Sent(False, status, latency_ms, excerpt, gone, final=True, gone=True)
    return Sent(
        False,
        status,
        latency_ms,
        excerpt,
        f"the receiver answered {status}",
        throttle=status in (429, 502, 503, 504),
        retry_after_s=retry_after,
    )


def retry_delay_s(attempt: int, schedule: Sequence[float], *, jitter: float, rnd: float) -> float | None:
    """The wait after failed attempt number ``attempt`` (1-based), spread by ``±jitter`` with
    ``rnd`` in [0, 1); ``None`` once the schedule is used up."""
    if attempt >= len(schedule):
        return None
    return schedule[attempt] * (1.0 + jitter * (2.0 * rnd - 1.0))


def health_after(
    endpoint: Endpoint, sent: Sent, *, now: float, throttle_s: float | None, disable_after_s: float
) -> Health:
    """An endpoint's health after an attempt, from its row as it is now: a success clears
    ``failing_since``, a failure sets it if unset; a receiver that asked to be left alone
    (``Retry-After``, or an overloaded answer) is throttled for ``throttle_s``, never less
    than it already was; ``410 Gone``, or failing for ``disable_after_s``, disables it."""
    if sent.ok:
        return Health(None, endpoint.throttled_until, None)
    failing_since = endpoint.failing_since if endpoint.failing_since is not None else now
    throttled_until = endpoint.throttled_until
    if throttle_s is not None:
        throttled_until = max(throttled_until or 0.0, now + throttle_s)
    disabled = None
    if sent.gone:
        disabled = "The endpoint answered 410 Gone."
    elif now - failing_since >= disable_after_s:
        disabled = f"Every delivery failed since {iso(failing_since)}."
    return Health(failing_since, throttled_until, disabled)


def after_attempt(
    message: Message,
    sent: Sent,
    *,
    now: float,
    schedule: Sequence[float],
    jitter: float,
    rnd: float,
    disable_after_s: float,
) -> AttemptResult:
    """Delivered, pending again at ``next_at``, or failed; and, for a message to an endpoint,
    the decision of the endpoint's health (:func:`health_after`), which the store runs on the
    endpoint's row under its lock."""
    attempt = Attempt(
        message_id=message.id,
        channel=message.channel,
        target=message.target,
        task_id=message.task_id,
        event_type=message.event_type,
        attempted_at=now,
        succeeded=sent.ok,
        status_code=sent.status_code,
        latency_ms=round(sent.latency_ms, 3),
        response=None if sent.response is None else sent.response[:EXCERPT_CHARS],
        error=None if sent.error is None else sent.error[:EXCERPT_CHARS],
    )
    token = message.lease_token or ""
    delay = None
    if not sent.ok:
        delay = None if sent.final else retry_delay_s(message.attempts, schedule, jitter=jitter, rnd=rnd)
        if delay is not None and sent.retry_after_s is not None:
            delay = max(delay, sent.retry_after_s)
    throttle_s = None
    if not sent.ok and (sent.throttle or sent.retry_after_s is not None):
        throttle_s = sent.retry_after_s if sent.retry_after_s is not None else (delay or 0.0)

    def health(endpoint: Endpoint) -> Health:
        return health_after(endpoint, sent, now=now, throttle_s=throttle_s, disable_after_s=disable_after_s)

    decide = health if message.channel == Channel.ENDPOINT else None
    if sent.ok:
        return AttemptResult(attempt, token, MessageState.DELIVERED, now, decide)
    if delay is None:
        return AttemptResult(attempt, token, MessageState.FAILED, now, decide)
    return AttemptResult(attempt, token, MessageState.PENDING, now + delay, decide)
