"""Helpers shared by the benchmarks: machine description, percentiles, a server subprocess."""

from __future__ import annotations

import asyncio
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
ERRANDS = str(Path(sys.executable).parent / "errands")
ADMIN_KEY = "eka_bench-admin-key"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "platform": platform.platform(),
    }


def cpu_s(pid: int) -> float:
    """The CPU time (user and system) process ``pid`` has used so far, from ``/proc`` (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    """The machine's CPU time so far, busy and in all, in clock ticks (``/proc/stat``, Linux):
    the busy share of an interval is the difference of the first over that of the second."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, and waiting for I/O
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    total = after[1] - before[1]
    return round((after[0] - before[0]) / total, 3) if total else 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.4999)))
    return ordered[rank - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def open_sse(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw HTTP/1.1 connection that has asked for ``path`` with the admin key (the cheapest
    SSE client there is: the benchmarks' watchers share the machine with the server)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {ADMIN_KEY}\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


class Server:
    """``errands serve`` in a subprocess, on a fresh database."""

    def __init__(self, db: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_")},
            "ERRANDS_ADMIN_KEY": ADMIN_KEY,
            "ERRANDS_DB": db,
            "ERRANDS_LOG_LEVEL": "warning",
            **(env or {}),
        }
        self.env = full_env
        self.proc = subprocess.Popen(
            [ERRANDS, "serve", "--port", str(self.port), *args],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in self.proc.stdout:
            if "errands is serving" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
        self.headers = {"Authorization": f"Bearer {ADMIN_KEY}"}

    def completed(self) -> int:
        r = httpx.get(f"{self.url}/v1/stats", headers=self.headers, timeout=30)
        by_status: dict[str, int] = r.json()["by_status"]
        return by_status.get("completed", 0)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Worker:
    """``errands worker`` in a subprocess, on a server's database (or any database, with ``on``)."""

    def __init__(self, server: Server, *args: str) -> None:
        self._start(server.env, args)

    @classmethod
    def on(cls, db: str, *args: str, env: dict[str, str] | None = None) -> Worker:
        worker = cls.__new__(cls)
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ERRANDS_")},
            "ERRANDS_DB": db,
            "ERRANDS_LOG_LEVEL": "warning",
            **(env or {}),
        }
        worker._start(full_env, args)
        return worker

    def _start(self, env: dict[str, str], args: tuple[str, ...]) -> None:
        self.proc = subprocess.Popen(
            [ERRANDS, "worker", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "is running" in line:
                break

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
