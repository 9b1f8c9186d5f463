"""The web service's side (the Next.js app of the design note, in a few lines of Python).

It submits a novel to errands with a ``notify_url`` pointing back at itself, receives the signed
webhook when the task ends (and checks its signature), and polls the task as a backup in case the
webhook is lost. Run it beside ``errands serve --app app:app`` (see README.md):

    ERRANDS_URL=http://127.0.0.1:8000 ERRANDS_ADMIN_KEY=eka_... python web_service.py [novel.txt]
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import sys
import threading
import time
from collections.abc import Mapping
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

ENDED = {"completed", "failed", "timeout", "cancelled"}


def verify(
    secret: str, headers: Mapping[str, str] | Message[str, str], body: bytes, tolerance_s: float = 300
) -> bool:
    """Standard Webhooks: ``webhook-signature`` holds ``v1,<base64 HMAC-SHA256 of
    "{webhook-id}.{webhook-timestamp}.{body}">`` keyed with the base64 after ``whsec_``."""
    message_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not message_id or not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance_s:
        return False  # unsigned, or too old or new: a replay of a captured request is refused
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{message_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = ("v1," + base64.b64encode(mac).decode()).encode()
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, s.encode()) for s in offered)


class WebService:
    """A receiver at ``url`` (``POST /callback``) and a client of errands."""

    def __init__(self, errands_url: str, admin_key: str, port: int = 0) -> None:
        self.errands = httpx.Client(
            base_url=errands_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
        )
        # What errands signs notify_url deliveries with (or set ERRANDS_NOTIFY_SECRET on both sides).
        self.secret = self.errands.get("/v1/notify/secret").raise_for_status().json()["secret"]
        self.done: dict[str, dict[str, Any]] = {}  # task id -> the ended task, as the webhook told
        self.changed = threading.Condition()
        service = self

        class Callback(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                valid = verify(service.secret, self.headers, body)
                if valid:  # a retried delivery (same webhook-id) just stores the same task again
                    task = json.loads(body)["data"]["task"]
                    with service.changed:
                        service.done[task["id"]] = task
                        service.changed.notify_all()
                self.send_response(204 if valid else 401)  # a 401 makes errands try again later
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Callback)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/callback"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def submit(self, text: str, **options: Any) -> str:
        """Submit the novel; errands answers at once with the task, and calls ``url`` at its end."""
        body = {"type": "novel_characters", "input": {"text": text, **options}, "notify_url": self.url}
        return str(self.errands.post("/v1/tasks", json=body).raise_for_status().json()["id"])

    def poll(self, task_id: str) -> dict[str, Any]:
        """The backup: the task as errands has it now."""
        task: dict[str, Any] = self.errands.get(f"/v1/tasks/{task_id}").raise_for_status().json()
        return task

    def wait(self, task_id: str, poll_every_s: float = 5, timeout_s: float = 600) -> dict[str, Any]:
        """The ended task: from the webhook, or from a poll every ``poll_every_s`` if it is lost."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.changed:
                if self.changed.wait_for(lambda: task_id in self.done, timeout=poll_every_s):
                    return self.done[task_id]
            if (task := self.poll(task_id))["status"] in ENDED:
                return task
        raise TimeoutError(f"task {task_id} did not end within {timeout_s} s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.errands.close()


def main() -> None:
    url = os.environ.get("ERRANDS_URL", "http://127.0.0.1:8000")
    service = WebService(url, os.environ["ERRANDS_ADMIN_KEY"], int(os.environ.get("PORT", "0")))
    novel = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("novel.txt")
    task_id = service.submit(novel.read_text(encoding="utf-8"))
    print(f"submitted {task_id}; the webhook will come to {service.url}")
    watch = f"{url}/v1/tasks/{task_id}/watch?streams=include"
    print(f"follow it: curl -N -H \"Authorization: Bearer $ERRANDS_ADMIN_KEY\" '{watch}'")
    task = service.wait(task_id)
    print(f"{task['status']}, told by {'the webhook' if task_id in service.done else 'a poll'}")
    for c in (task["result"] or {}).get("characters", []):
        print(f"  {c['name']}: {c['lines']} lines, a character from chapter {c['chapter']}")
    service.close()


if __name__ == "__main__":
    main()
