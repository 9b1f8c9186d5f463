"""errands on PostgreSQL beside established task queues, measured in one run on this machine.

    .venv/bin/python -m bench.bench_compare --anchors DIR --anchors-python PY [--systems …]

``DIR`` is a copy of ``shared/anchors/anchors`` (the scripts that measure Celery, Procrastinate,
Dramatiq… the same way) and ``PY`` the Python of a virtualenv with its ``requirements.txt``;
``docs/benchmarks.md`` says how to set them up. Nothing of theirs is part of errands.

The workload is the anchors' one: 10,000 no-op tasks submitted one call at a time by one
process while the workers run (errands also with 8 concurrent callers, ``--submitters``),
timed from the first submit until all are seen done; and 200
round trips one at a time (submit, then wait for the result) with idle workers. errands runs it
with ``errands worker`` processes on one fresh database, through the in-process Python API
(``app.submit``), every change written to the event log; it runs before and after the others,
so a drift of the machine shows. Beside each drain, ``busy_…``: the share of the machine's CPU
time that was busy meanwhile (all processes; ``/proc/stat``), which tells a drain bound by the
CPU (near 1) from one bound by waits.

``--synchronous-commit off`` (or ``both``) also runs the systems on PostgreSQL (errands,
Procrastinate) with ``synchronous_commit=off``: a commit no longer waits for its WAL flush, which
is as durable as the Redis of Celery and Dramatiq here (no persistence at all) or more so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.bench_postgres import drain, fresh_database
from bench.common import ADMIN_KEY, Worker, machine, pct
from errands.config import Settings
from errands.demo import app
from errands.model import EventType

#: What each anchor system's script is called; its results land in ``DIR/../results``.
SCRIPTS = {
    "celery": ("bench_celery.py", {}),
    "procrastinate": ("bench_procrastinate.py", {}),
    "dramatiq": ("bench_dramatiq.py", {}),
    "arq-poll0.01": ("bench_arq.py", {"ARQ_POLL": "0.01"}),
    "rq-SimpleWorker": ("bench_rq.py", {"RQ_WORKER": "rq.worker.SimpleWorker"}),
}


async def round_trips(url: str, n: int) -> dict[str, Any]:
    """``n`` tasks one at a time: submit, then wait for its ``task.completed`` (idle workers)."""
    settings = Settings(db=url, admin_key=ADMIN_KEY, log_level="warning")
    async with app.running(settings, workers=False, sweeper=False) as runtime:
        done: dict[str, asyncio.Event] = {}

        def on_event(event: Any) -> None:
            if event.type is EventType.COMPLETED and event.task_id in done:
                done[event.task_id].set()

        runtime.hub.add_listener(on_event)
        worker = Worker.on(url, "--app", "errands.demo:app", env={"ERRANDS_LOG_LEVEL": "warning"})
        try:
            samples = []
            for i in range(n + 5):  # the first few warm the connections up
                task_id = f"rt-{i}"
                done[task_id] = asyncio.Event()
                t0 = time.perf_counter()
                await app.submit("noop", id=task_id, owner="bench")
                await asyncio.wait_for(done[task_id].wait(), 30)
                if i >= 5:
                    samples.append((time.perf_counter() - t0) * 1000)
        finally:
            worker.stop()
    return {"p50_ms": pct(samples, 50), "p95_ms": pct(samples, 95), "p99_ms": pct(samples, 99)}


#: What each mode of ``--synchronous-commit`` adds to errands' database URL.
URL_OPTIONS = {"on": "", "off": "?synchronous_commit=off"}


async def errands_pass(
    label: str,
    n: int,
    workers: list[int],
    latency_n: int,
    submitters: list[int],
    sync: str,
    concurrency: int = 20,
) -> dict[str, Any]:
    row: dict[str, Any] = {"system": f"errands ({label})", "synchronous_commit": sync}
    row["concurrency"] = concurrency
    for callers in submitters:
        for count in workers:
            url = await fresh_database("errands_bench") + URL_OPTIONS[sync]
            result = await drain(url, n, count, concurrency=concurrency, submitters=callers)
            suffix = "" if callers == 1 else f"_{callers}_submitters"
            row[f"drain_per_s_{count}_workers{suffix}"] = round(result["end_to_end_per_s"])
            row[f"busy_{count}_workers{suffix}"] = result["machine_busy"]
            if callers == 1:
                row.setdefault("enqueue_per_s", round(result["enqueue_per_s"]))
    url = await fresh_database("errands_bench") + URL_OPTIONS[sync]
    row["latency"] = await round_trips(url, latency_n)
    return row


#: The anchors that keep their tasks in PostgreSQL (through libpq, which reads ``PGOPTIONS``).
ON_POSTGRES = {"procrastinate"}


def anchor(
    system: str, directory: Path, python: str, n: int, latency_n: int, runs: int, sync: str = "on"
) -> dict[str, Any]:
    script, extra = SCRIPTS[system]
    env = {**os.environ, **extra, "BENCH_N": str(n), "BENCH_LAT_N": str(latency_n), "BENCH_RUNS": str(runs)}
    if sync == "off":
        env["PGOPTIONS"] = f"{env.get('PGOPTIONS', '')} -c synchronous_commit=off".strip()
    log = directory.parent / "results" / f"{system}.log"
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as out:
        subprocess.run(
            [python, script], cwd=directory, env=env, stdout=out, stderr=subprocess.STDOUT, check=True
        )
    data = json.loads((directory.parent / "results" / f"{system}.json").read_text())
    latency = data["latency_summary"]
    return {
        "system": system if sync == "on" else f"{system} (synchronous_commit=off)",
        "enqueue_per_s": round(data["enqueue_rate"]["median"]),
        "drain_per_s": round(data["drain_rate"]["median"]),
        "drain_per_s_runs": [round(n / s) for s in data["drain_s"]],
        "latency": {k: latency[k]["median"] for k in ("p50_ms", "p95_ms", "p99_ms")},
        "versions": data["versions"],
        "settings": data["settings"],
    }


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--anchors", type=Path, required=True, help="a copy of shared/anchors/anchors")
    parser.add_argument("--anchors-python", required=True, help="the Python of the anchors' virtualenv")
    parser.add_argument("--systems", default="celery,procrastinate,dramatiq")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--latency-n", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each anchor measurement")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--submitters", default="1,8", help="errands' drains: concurrent callers")
    parser.add_argument("--concurrency", type=int, default=20, help="errands' handlers per worker process")
    parser.add_argument(
        "--synchronous-commit",
        choices=("on", "off", "both"),
        default="on",
        help="PostgreSQL's commits: flushed (on), not waited for (off), or each in turn (both)",
    )
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    submitters = [int(s) for s in args.submitters.split(",")]
    modes = ["on", "off"] if args.synchronous_commit == "both" else [args.synchronous_commit]

    async def errands(label: str) -> None:
        for sync in modes:
            row = await errands_pass(
                label, args.n, workers, args.latency_n, submitters, sync, concurrency=args.concurrency
            )
            print(json.dumps(row), flush=True)

    await errands("before")
    for system in args.systems.split(","):
        for sync in modes if system in ON_POSTGRES else ["on"]:
            row = anchor(
                system, args.anchors.resolve(), args.anchors_python, args.n, args.latency_n, args.runs, sync
            )
            print(json.dumps(row), flush=True)
    await errands("after")
    print(json.dumps({"machine": machine()}))


if __name__ == "__main__":
    import uvloop

    uvloop.run(main())
