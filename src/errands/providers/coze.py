"""``coze``: a Coze workflow run asynchronously.

The routes named here are Coze's, on ``base_url`` (``https://api.coze.com``), not errands'; a
workflow reports to errands on the task's capability URL (``POST /v1/hooks/callback/{token}``).

* submit: ``POST /v1/workflow/run`` with ``{"workflow_id", "parameters", "is_async": true}``,
  answered with ``{"code": 0, "execute_id": …}``. The task's input becomes the parameters, plus
  the task's capability callback URL (as ``callback_parameter``): a workflow that ends in an HTTP
  node posting ``{"status": "succeeded", "output": …}`` there completes the task at once;
* poll (Coze sends no completion webhook, so this is the main path):
  ``GET /v1/workflows/{workflow_id}/run_histories/{execute_id}``, whose ``data[0]`` has
  ``execute_status`` ``Running``/``Success``/``Fail``, ``output`` (usually a JSON string) and
  ``error_message``;
* every call respects the account's rate limit (``rate_per_s``, 5 by default).
"""

from __future__ import annotations

import contextlib
from typing import Any
from urllib.parse import quote

import orjson

from errands.errors import Unauthorized
from errands.providers import HttpProvider, Inbound, ProviderError, Submission, Update


def history_update(answer: Any, execute_id: str) -> Update:
    if not isinstance(answer, dict) or answer.get("code", 0) != 0:
        code = answer.get("code") if isinstance(answer, dict) else None
        raise ProviderError(f"coze answered error code {code}")
    data = answer.get("data")
    run = data[0] if isinstance(data, list) and data else None
    if not isinstance(run, dict):
        raise ProviderError("coze answered no run history")
    status = str(run.get("execute_status", ""))
    if status == "Running":
        return Update(status="running", external_id=execute_id)
    if status == "Success":
        output = run.get("output")
        if isinstance(output, str):
            # Coze documents the output as usually, not always, a JSON string.
            with contextlib.suppress(orjson.JSONDecodeError):
                output = orjson.loads(output)
        return Update(status="completed", external_id=execute_id, result=output)
    if status == "Fail":
        message = str(run.get("error_message") or "The workflow failed.")[:500]
        return Update(
            status="failed", external_id=execute_id, error_code="provider_failed", error_message=message
        )
    raise ProviderError(f"coze answered an unknown execute_status {status[:40]!r}")


class CozeProvider(HttpProvider):
    def __init__(
        self,
        *,
        api_token: str,
        workflow_id: str,
        base_url: str = "https://api.coze.com",
        name: str = "coze",
        callback_parameter: str = "callback_url",
        rate_per_s: float = 5.0,
    ) -> None:
        super().__init__(headers={"Authorization": f"Bearer {api_token}"}, rate_per_s=rate_per_s)
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.workflow_id = workflow_id
        self.callback_parameter = callback_parameter

    async def submit(self, job: Submission) -> str:
        parameters = dict(job.input) if isinstance(job.input, dict) else {"input": job.input}
        parameters[self.callback_parameter] = job.capability_url
        body = {"workflow_id": self.workflow_id, "parameters": parameters, "is_async": True}
        answer = await self._request("POST", f"{self.base_url}/v1/workflow/run", json=body)
        if not isinstance(answer, dict) or answer.get("code", 0) != 0 or not answer.get("execute_id"):
            code = answer.get("code") if isinstance(answer, dict) else None
            raise ProviderError(f"coze did not start the workflow (code {code})")
        return str(answer["execute_id"])

    def verify(self, inbound: Inbound, *, now: float) -> str:
        raise Unauthorized("Coze sends no signed webhooks; workflows report to the task's callback URL.")

    def parse(self, inbound: Inbound) -> Update:  # pragma: no cover - verify always refuses first
        raise Unauthorized("Coze sends no signed webhooks.")

    async def poll(self, external_id: str) -> Update:
        workflow, execute = quote(self.workflow_id, safe=""), quote(external_id, safe="")
        answer = await self._request(
            "GET", f"{self.base_url}/v1/workflows/{workflow}/run_histories/{execute}"
        )
        return history_update(answer, external_id)
