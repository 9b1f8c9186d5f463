"""The app ``bench_webhooks.py`` serves: an external type whose job ids are handed out locally."""

from __future__ import annotations

from errands import Errands
from errands.devprovider import DEV_SECRET
from errands.providers import Submission
from errands.providers.standard import StandardProvider


class LocalJobs(StandardProvider):
    """Standard Webhooks verification as in production; submission without a network hop."""

    async def submit(self, job: Submission) -> str:
        return f"job-{job.task_id}"


provider = LocalJobs("bench", submit_url="unused", status_url="unused", secret=DEV_SECRET)
app = Errands()
app.external("generate", provider=provider, timeout_s=3600, poll_after_s=3600, max_attempts=1)
