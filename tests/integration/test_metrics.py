"""Prometheus metrics on both stores: a known workload moves each counter by what it did."""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from errands import Errands, TaskContext
from errands.auth import SYSTEM
from errands.errors import StoreError
from errands.hub import WatchFilter
from errands.service import TokenRequest
from tests.integration.conftest import RuntimeFactory, http, new_task, wait_task


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by name and labels (parsed by prometheus_client's own parser)."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counting_app() -> Errands:
    app = Errands()

    @app.task("work")
    async def work(ctx: TaskContext, input: dict[str, Any]) -> dict[str, Any]:
        if input.get("fail"):
            raise RuntimeError("it fails")
        return {"ok": True}

    return app


async def test_counters_move_by_what_a_known_workload_did(runtime_factory: RuntimeFactory) -> None:
    app = counting_app()
    runtime = await runtime_factory(app, default_max_attempts=1)
    async with http(runtime) as client:
        before = scrape((await client.get("/metrics")).text)
        ids = []
        for i in range(5):
            answer = await client.post("/v1/tasks", json={"type": "work", "id": f"ok-{i}"})
            ids.append(answer.json()["id"])
        for i in range(2):
            body = {"type": "work", "id": f"bad-{i}", "input": {"fail": True}}
            answer = await client.post("/v1/tasks", json=body)
            ids.append(answer.json()["id"])
        for task_id in ids:
            await wait_task(runtime, task_id)
        for i in range(3):
            await client.post("/v1/tasks", json={"type": "work", "id": f"later-{i}", "delay_s": 3600})
        await client.post("/v1/tasks/later-2/cancel")
        await client.post("/v1/hooks/nobody", content=b"{}")  # a webhook for no provider
        answer = await client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    after = scrape(answer.text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("errands_tasks_submitted_total", type="work") == 10
    assert moved("errands_tasks_finished_total", type="work", status="completed") == 5
    assert moved("errands_tasks_finished_total", type="work", status="failed") == 2
    assert moved("errands_tasks_finished_total", type="work", status="cancelled") == 1
    assert moved("errands_queue_wait_seconds_count", type="work") == 7
    assert moved("errands_run_seconds_count", type="work") == 7  # the cancelled one never ran
    assert moved("errands_run_seconds_bucket", type="work", le="+Inf") == 7
    assert value(after, "errands_tasks_pending", type="work") == 2
    assert moved("errands_webhooks_received_total", provider="other", outcome="unknown_task") == 1
    assert value(after, "errands_store_up") == 1
    assert value(after, "errands_hub_lag_events") >= 0
    # No task id or owner ever becomes a label value.
    labels = {v for (_, pairs) in after for _, v in pairs}
    assert not labels & {*ids, "later-0", "default", "alice"}


async def test_metrics_take_the_admin_key(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(counting_app(), workers=False)
    async with http(runtime, token=None) as anonymous:
        assert (await anonymous.get("/metrics")).status_code == 401
    token = runtime.service.mint_token(TokenRequest(owner="alice"), SYSTEM)["token"]
    async with http(runtime, token=token) as owner:
        answer = await owner.get("/metrics")
        assert answer.status_code == 403 and "admin" in answer.json()["error"]["message"]


async def test_watches_and_logged_store_errors_are_counted(runtime_factory: RuntimeFactory) -> None:
    runtime = await runtime_factory(counting_app(), workers=False)
    async with http(runtime) as client:
        before = scrape((await client.get("/metrics")).text)
        logging.getLogger("errands.worker").error("claiming failed: %s", StoreError("The database is gone."))
        logging.getLogger("errands.sweeper").error("a sweep went wrong")
        watch = runtime.hub.watch(WatchFilter(), key=None)  # what GET /v1/watch opens
        during = scrape((await client.get("/metrics")).text)
        watch.close()
        after = scrape((await client.get("/metrics")).text)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("errands_store_errors_total", component="worker") == 1
    assert moved("errands_store_errors_total", component="sweeper") == 0
    assert moved("errands_errors_total", component="sweeper") == 1
    assert value(during, "errands_watches_open") == 1 and value(after, "errands_watches_open") == 0


async def test_a_task_of_a_type_this_app_does_not_know_is_labelled_other(
    runtime_factory: RuntimeFactory,
) -> None:
    runtime = await runtime_factory(counting_app(), workers=False)
    await runtime.store.create(new_task("t-else", type="elsewhere"))  # as another app's node would
    async with http(runtime) as client:
        after = scrape((await client.get("/metrics")).text)
    assert value(after, "errands_tasks_pending", type="other") == 1
    assert value(after, "errands_tasks_pending", type="elsewhere") == 0
