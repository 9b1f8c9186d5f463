"""``standard``: any HTTP service that takes a callback URL and signs its webhooks the Standard
Webhooks way. It is also what ``errands dev-provider`` speaks.

* submit: ``POST {submit_url}`` with ``{"input", "callback_url", "metadata": {"task_id",
  "attempt", "capability_url"}}``, answered with ``{"id": …}``;
* webhooks and polls (``GET {status_url}`` with ``{id}`` replaced): the generic report
  ``{"id", "status", "progress"?, "message"?, "output"?, "error"?}`` (see
  :func:`errands.providers.parse_generic`);
* cancel: ``POST {cancel_url}`` when one is configured.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import quote

from errands.errors import BadRequest
from errands.providers import HttpProvider, Inbound, ProviderError, Submission, Update, parse_generic
from errands.signing import TOLERANCE_S, Verifier


class StandardProvider(HttpProvider):
    def __init__(
        self,
        name: str,
        *,
        submit_url: str,
        status_url: str,
        secret: str | Sequence[str],
        cancel_url: str | None = None,
        headers: Mapping[str, str] | None = None,
        rate_per_s: float | None = None,
        tolerance_s: float = TOLERANCE_S,
    ) -> None:
        """``secret``: the webhook signing secret (``whsec_…``); several while rotating.
        ``status_url`` and ``cancel_url`` contain ``{id}``."""
        super().__init__(headers=headers, rate_per_s=rate_per_s)
        self.name = name
        self.submit_url = submit_url
        self.status_url = status_url
        self.cancel_url = cancel_url
        self._verifier = Verifier(
            [secret] if isinstance(secret, str) else list(secret), tolerance_s=tolerance_s
        )

    async def submit(self, job: Submission) -> str:
        body = {
            "input": job.input,
            "callback_url": job.callback_url,
            "metadata": {
                "task_id": job.task_id,
                "attempt": job.attempt,
                "capability_url": job.capability_url,
            },
        }
        answer = await self._request("POST", self.submit_url, json=body)
        if not isinstance(answer, dict) or not answer.get("id"):
            raise ProviderError(f"{self.name} did not answer with a job id")
        return str(answer["id"])

    def verify(self, inbound: Inbound, *, now: float) -> str:
        return self._verifier.verify(inbound.headers, inbound.body, now=now)

    def parse(self, inbound: Inbound) -> Update:
        update = parse_generic(inbound.json())
        if update.external_id is None:
            raise BadRequest("The webhook has no job id.")
        return update

    async def poll(self, external_id: str) -> Update:
        answer = await self._request("GET", self.status_url.replace("{id}", quote(external_id, safe="")))
        try:
            return parse_generic(answer)
        except BadRequest as exc:
            raise ProviderError(f"{self.name} answered an unreadable status") from exc

    async def cancel(self, external_id: str) -> bool:
        if self.cancel_url is None:
            return False
        await self._request("POST", self.cancel_url.replace("{id}", quote(external_id, safe="")))
        return True
