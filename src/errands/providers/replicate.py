"""``replicate``: Replicate's predictions API.

The routes named here are Replicate's, on ``base_url`` (``https://api.replicate.com``), not
errands'; Replicate's webhooks come to errands' ``POST /v1/hooks/replicate`` (the adapter's
``name``), which the adapter gives it with each prediction.

* submit: ``POST /v1/predictions`` (or ``/v1/models/{owner}/{name}/predictions``) with
  ``{"version"?, "input", "webhook", "webhook_events_filter"}``, answered with a prediction;
* webhooks: the prediction object, signed the Standard Webhooks way with the account's secret
  (Replicate's ``GET https://api.replicate.com/v1/webhooks/default/secret`` answers it as
  ``{"key": "whsec_…"}``: pass it as ``webhook_secret``);
* statuses: ``starting``/``processing`` → running; ``succeeded`` → completed with ``output``;
  ``failed`` → failed with ``error``; ``canceled``/``aborted`` → failed (``provider_cancelled``);
* progress: the last percentage in the logs (models print progress bars), message: the last
  log line;
* output as it is made: a language model's ``output`` is the list of tokens so far, sent with
  every ``output`` webhook; each list becomes the task's stream ``output`` from position 0, so
  errands keeps each token once (``stream=None`` turns it off);
* poll: ``GET /v1/predictions/{id}`` — needed: Replicate stops retrying a webhook about a
  minute after the prediction finished;
* cancel: ``POST /v1/predictions/{id}/cancel``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from errands.errors import BadRequest
from errands.model.streams import StreamPart
from errands.providers import HttpProvider, Inbound, ProviderError, Submission, Update, UpdateStatus
from errands.signing import Verifier

_STATES: dict[str, UpdateStatus] = {
    "starting": "running",
    "processing": "running",
    "succeeded": "completed",
    "failed": "failed",
    "canceled": "failed",
    "aborted": "failed",
}
_PERCENT = re.compile(r"(\d{1,3})%")


def prediction_update(prediction: Any, *, stream: str | None = "output") -> Update:
    if not isinstance(prediction, dict) or not prediction.get("id"):
        raise BadRequest("The body is not a prediction.")
    raw = str(prediction.get("status", ""))
    status = _STATES.get(raw)
    if status is None:
        raise BadRequest(f"Unknown prediction status {raw[:40]!r}.")
    logs = prediction.get("logs") or ""
    lines = [ln.strip() for ln in str(logs).splitlines() if ln.strip()]
    percents = _PERCENT.findall(lines[-1]) if lines else []
    progress = min(100, int(percents[-1])) if percents else None
    code = message = None
    if status == "failed":
        code = "provider_cancelled" if raw in ("canceled", "aborted") else "provider_failed"
        message = str(prediction.get("error") or f"The prediction was {raw}.")[:500]
    output = prediction.get("output")
    parts: tuple[StreamPart, ...] = ()
    if stream is not None and isinstance(output, list) and output and status != "failed":
        parts = (StreamPart(stream, 0, tuple(output)),)
    return Update(
        streams=parts,
        status=status,
        external_id=str(prediction["id"]),
        progress=progress if status == "running" else None,
        message=lines[-1][:200] if lines and status == "running" else None,
        result=prediction.get("output") if status == "completed" else None,
        error_code=code,
        error_message=message,
    )


class ReplicateProvider(HttpProvider):
    def __init__(
        self,
        *,
        api_token: str,
        webhook_secret: str | Sequence[str],
        version: str | None = None,
        model: str | None = None,
        base_url: str = "https://api.replicate.com",
        name: str = "replicate",
        events: Sequence[str] = ("start", "output", "logs", "completed"),
        rate_per_s: float | None = None,
        stream: str | None = "output",
    ) -> None:
        """Give ``version`` (a model version id) or ``model`` (``owner/name``, for official models);
        ``stream``: the task stream a list output goes to as it is made (``None``: none)."""
        if (version is None) == (model is None):
            raise ValueError("give either a model version or a model name")
        super().__init__(headers={"Authorization": f"Bearer {api_token}"}, rate_per_s=rate_per_s)
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.version = version
        self.model = model
        self.events = list(events)
        self.stream = stream
        self._verifier = Verifier(
            [webhook_secret] if isinstance(webhook_secret, str) else list(webhook_secret)
        )

    async def submit(self, job: Submission) -> str:
        body: dict[str, Any] = {
            "input": job.input,
            "webhook": job.callback_url,
            "webhook_events_filter": self.events,
        }
        if self.version is not None:
            body["version"] = self.version
            url = f"{self.base_url}/v1/predictions"
        else:
            url = f"{self.base_url}/v1/models/{self.model}/predictions"
        answer = await self._request("POST", url, json=body)
        if not isinstance(answer, dict) or not answer.get("id"):
            raise ProviderError("replicate did not answer with a prediction id")
        return str(answer["id"])

    def verify(self, inbound: Inbound, *, now: float) -> str:
        return self._verifier.verify(inbound.headers, inbound.body, now=now)

    def parse(self, inbound: Inbound) -> Update:
        return prediction_update(inbound.json(), stream=self.stream)

    async def poll(self, external_id: str) -> Update:
        answer = await self._request("GET", f"{self.base_url}/v1/predictions/{quote(external_id, safe='')}")
        try:
            return prediction_update(answer, stream=self.stream)
        except BadRequest as exc:
            raise ProviderError("replicate answered an unreadable prediction") from exc

    async def cancel(self, external_id: str) -> bool:
        await self._request("POST", f"{self.base_url}/v1/predictions/{quote(external_id, safe='')}/cancel")
        return True
