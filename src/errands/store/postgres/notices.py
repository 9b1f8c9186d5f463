"""The notifications of PostgreSQL's commits, written by :mod:`.tx` and read by the store's
listener: which channels a commit notifies, and what its payload says (its last seq, its hints,
the work it made claimable, and, where they fit, what precedes its events and the events)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import orjson

from errands.model import Event
from errands.store.base import Hint, Work
from errands.store.columns import to_event

#: The channel every commit notifies (the payload is a wake-up with hints, see the store): what
#: a hub that follows the whole log listens to.
CHANNEL = "errands_events"
#: Channels that a commit also notifies when it has one of their hints: what a process that needs
#: only those listens to (a worker process: work, and stops; ends where a limit counts them), so
#: that the commits of claims and ends elsewhere do not wake it.
HINT_CHANNELS = {
    "errands_hints": Hint.WORK | Hint.LATER | Hint.STOPPED,
    "errands_ended": Hint.ENDED,
}
#: Between a notification's parts: the commit's last seq, its hints (a Hint's value), how many
#: tasks it made claimable, and how many of each type (``seq/hint/work/type=n,type=n``).
HINT_MARK = "/"
#: The most a notification's types may take (its payload must stay under 8,000 bytes): beyond,
#: the types are left out and a reader counts the work as of every type.
_MAX_TYPES_CHARS = 2000
#: The most a notification's events may take (beside at most 2,000 of types and a few numbers).
_MAX_EVENTS_BYTES = 5000


def channels(hint: Hint) -> list[str]:
    """The channels a commit with ``hint`` notifies."""
    return [CHANNEL, *(name for name, wanted in HINT_CHANNELS.items() if hint & wanted)]


def payload(hint: Hint, work: Mapping[str, int]) -> str:
    """A notification's parts after its seq (see :data:`HINT_MARK`)."""
    types = ",".join(f"{name}={n}" for name, n in work.items())
    if len(types) > _MAX_TYPES_CHARS:
        types = ""
    return f"{hint.value}{HINT_MARK}{sum(work.values())}{HINT_MARK}{types}"


def events_text(events: Sequence[tuple[int, str, float, str, str, str, str, bytes]]) -> str:
    """The events of a commit as its notification on :data:`CHANNEL` carries them (each: its
    ordinal, type, time, task id, owner, task type, status and snapshot): their columns as JSON,
    then each snapshot on a line of its own (compact JSON has no line breaks); ``''`` when they
    would not fit in a notification beside the rest (hubs then read the log)."""
    if sum(len(e[7]) for e in events) > _MAX_EVENTS_BYTES:
        return ""
    head = orjson.dumps([list(e[:7]) for e in events])
    text = b"\n".join([head, *(e[7] for e in events)])
    return text.decode() if len(text) <= _MAX_EVENTS_BYTES else ""


def events_from_text(last_seq: int, text: str) -> list[Event]:
    """The events of :func:`events_text`, with the seqs of a commit whose last is ``last_seq``.
    Raises ValueError (or another error of reading JSON) if it cannot be read."""
    head, *snapshots = text.encode().split(b"\n")
    rows = orjson.loads(head)
    # Every event of the commit, from its first (ordinal 1) to its last (``last_seq``).
    if (
        not isinstance(rows, list)
        or len(rows) != len(snapshots)
        or [r[0] for r in rows] != list(range(1, (last_seq & 0xFFFF) + 1))
    ):
        raise ValueError("events that cannot be read")
    base = last_seq >> 16 << 16
    return [
        to_event((base + row[0], *row[1:7], snapshot), seq_in_snapshot=False)
        for row, snapshot in zip(rows, snapshots, strict=True)
    ]


def listened(wanted: Hint | None) -> list[str]:
    """The channels a subscriber that wants ``wanted`` listens to (``None``: every commit)."""
    if wanted is None:
        return [CHANNEL]
    return [name for name, hint in HINT_CHANNELS.items() if hint & wanted]


_DIGITS = re.compile(r"[0-9]{1,19}")
#: What a notification that cannot be read may have made claimable: some task, of any type.
ANY_WORK: Work = {"": 1}


def notification_hint(payload: str) -> tuple[Hint, int | None, dict[str, int]]:
    """The hints, the last seq and the tasks made claimable (by type) of a notification
    (``seq/hint/work/type=n,…``, see :data:`HINT_MARK`; see :func:`notification_events`
    for what may follow). What cannot be read (a node of another version, or anything else)
    counts as every hint, no seq, and work of any type."""
    parts = payload.split(HINT_MARK, 5)
    try:
        if len(parts) == 6 and _DIGITS.fullmatch(parts[4]):
            parts = parts[:4]  # the events follow (see notification_events)
        if not 2 <= len(parts) <= 4 or not all(_DIGITS.fullmatch(p) for p in parts[:3]):
            raise ValueError(payload)
        hint = Hint(int(parts[1]))
        total = int(parts[2]) if len(parts) > 2 else int(bool(hint & Hint.WORK))
        work: dict[str, int] = {}
        if len(parts) == 4 and parts[3]:
            for item in parts[3].split(","):
                name, _, n = item.rpartition("=")
                if not name or not _DIGITS.fullmatch(n):
                    raise ValueError(payload)
                work[name] = int(n)
        if sum(work.values()) < total:
            work[""] = total - sum(work.values())
        return hint, int(parts[0]), work
    except ValueError:
        return Hint.ALL, None, {"": 1}


def notification_events(payload: str) -> tuple[int | None, list[Event]]:
    """What precedes a notification's events, and the events, where it carries them
    (``…/after/events``, see :func:`events_text`); ``(None, [])`` where it does not, or
    they cannot be read (the hub then reads the log)."""
    parts = payload.split(HINT_MARK, 5)
    if len(parts) < 6 or not _DIGITS.fullmatch(parts[0]) or not _DIGITS.fullmatch(parts[4]):
        return None, []
    try:
        return int(parts[4]), events_from_text(int(parts[0]), parts[5])
    except Exception:  # anything a payload may hold: it is only a shortcut
        return None, []
