"""Provider back-pressure, as a worker sees it: the providers that asked to be left alone (HTTP
429, or 503 with ``Retry-After``) and until when.

A hold is stored (``store.hold``), so every worker on every node honours it: a worker leaves the
task types of a held provider out of its claims until the hold ends. It reads the holds again
after news of a task made to wait (``Hint.LATER``: the task that met the provider's refusal went
back to the queue until the hold ends, which is also when the workers' timers fire), when
a hold it knows of ends, and, while it hears no news (a deaf worker process), every so often.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from errands.errors import StoreError
from errands.store.base import Meta

log = logging.getLogger("errands.worker")


class Holds:
    def __init__(self, store: Meta, provider_of: Mapping[str, str]) -> None:
        """``provider_of``: task type → the name of the provider that runs it."""
        self._store = store
        self._provider_of = dict(provider_of)
        self._until: dict[str, float] = {}
        self._read_at = -math.inf
        #: Whether the stored holds must be read before the next claim.
        self.stale = bool(provider_of)

    async def held_types(self, now: float, *, max_age_s: float = math.inf) -> set[str]:
        """The task types not to claim now (the holds read again if read ``max_age_s`` ago)."""
        if not self._provider_of:
            return set()
        ended = any(until <= now for until in self._until.values())
        if self.stale or ended or now - self._read_at >= max_age_s:
            self.stale = False
            self._read_at = now
            try:
                self._until = await self._store.holds()
            except StoreError:
                self.stale = True  # keep what was known; read again next time
        return {t for t, p in self._provider_of.items() if self._until.get(p, 0.0) > now}

    async def hold(self, task_type: str, until: float) -> None:
        """The provider of ``task_type`` asked to wait until ``until``: hold it, here at once and
        for every node in the store."""
        provider = self._provider_of.get(task_type)
        if provider is None:
            return
        self._until[provider] = max(until, self._until.get(provider, 0.0))
        try:
            self._until[provider] = await self._store.hold(provider, until)
        except StoreError as exc:
            log.warning("the hold of provider %s was not saved: %s", provider, exc)

    def until(self) -> Mapping[str, float]:
        return dict(self._until)
