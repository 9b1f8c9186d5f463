"""A stand-in for Coze, to run this example on one machine (Python's standard library only).

errands' ``dev-provider`` speaks Standard Webhooks, not Coze's API, so it cannot stand in for
Coze; this file fakes the two calls the ``coze`` provider makes, and plays the workflow that
README.md describes:

* ``POST /v1/workflow/run`` ``{workflow_id, parameters, is_async: true}`` → ``{code: 0, execute_id}``;
* ``GET /v1/workflows/{workflow_id}/run_histories/{execute_id}`` → ``{code: 0, data: [run]}``,
  the run's ``execute_status`` being ``Running`` until the workflow has ended, then ``Success``;
* the workflow posts its progress to ``parameters["callback_url"]``, then its result, as HTTP
  nodes would; ``--drop P`` loses that last post with probability P (a run whose parameters
  hold ``"_fake": {"drop": true}`` loses it for sure), and errands' polling must rescue the task.

    python fake_coze.py                              # listen on 127.0.0.1:8002
    python fake_coze.py errands serve --app app      # run a command pointed at it (COZE_* set)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN, WORKFLOW = "pat_fake_coze_token", "7390000000000000001"
STEPS = [(25, "下载视频"), (60, "语音识别"), (90, "整理文案")]
runs: dict[str, dict] = {}


def log(text: str) -> None:
    print(f"fake coze: {text}", flush=True)


def post(url: str, report: dict) -> str:
    if not url.startswith(("http://", "https://")):
        return "no callback URL"
    request = urllib.request.Request(  # noqa: S310 - http(s) only, checked above
        url, json.dumps(report).encode(), {"content-type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310
            return str(answer.status)
    except urllib.error.HTTPError as exc:
        return str(exc.code)
    except OSError as exc:
        return type(exc).__name__


def workflow(eid: str, parameters: dict, options: argparse.Namespace) -> None:
    """What the workflow does: progress, the extraction, the result to the callback URL."""
    callback, video = parameters.get("callback_url", ""), str(parameters.get("video_url", ""))
    for progress, message in STEPS:
        time.sleep(options.step_s)
        report = {"status": "running", "progress": progress, "message": message}
        log(f"run {eid}: progress {progress}% → {post(callback, report)}")
    time.sleep(options.step_s)
    output = {"title": f"视频 {video.rstrip('/').rsplit('/', 1)[-1]}", "content": f"从 {video} 提取的文案。"}
    if (parameters.get("_fake") or {}).get("drop") or random.random() < options.drop:  # noqa: S311
        log(f"run {eid}: the result's callback was lost")
    else:
        log(f"run {eid}: result → {post(callback, {'status': 'succeeded', 'output': output})}")
    # Coze says Success once the whole workflow has run, its last HTTP node included.
    runs[eid].update(execute_status="Success", output=json.dumps(output, ensure_ascii=False))


class Coze(BaseHTTPRequestHandler):
    options: argparse.Namespace

    def answer(self, data: dict) -> None:
        body = json.dumps(data, ensure_ascii=False).encode()
        self.send_response(200)  # Coze answers errors as {"code": ≠ 0, "msg"}
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", "0"))) or b"{}")
        if self.headers.get("authorization") != f"Bearer {TOKEN}":
            return self.answer({"code": 4100, "msg": "authentication is invalid"})
        if self.path != "/v1/workflow/run" or body.get("workflow_id") != WORKFLOW:
            return self.answer({"code": 4000, "msg": "no such workflow"})
        eid = str(secrets.randbelow(10**18))
        runs[eid] = {"execute_id": eid, "execute_status": "Running", "output": "", "error_message": ""}
        parameters = body.get("parameters") or {}
        log(f"run {eid}: started for {parameters.get('video_url')}")
        threading.Thread(target=workflow, args=(eid, parameters, self.options), daemon=True).start()
        return self.answer({"code": 0, "msg": "", "execute_id": eid})

    def do_GET(self) -> None:
        parts = self.path.strip("/").split("/")  # v1 workflows {workflow} run_histories {execute_id}
        run = runs.get(parts[-1]) if len(parts) == 5 and parts[2] == WORKFLOW else None
        if self.headers.get("authorization") != f"Bearer {TOKEN}" or run is None:
            return self.answer({"code": 4200, "msg": "no such run"})
        log(f"run {parts[-1]}: polled, {run['execute_status']}")
        return self.answer({"code": 0, "msg": "", "data": [run]})

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--port", type=int, default=8002, help="0: any free port")
    parser.add_argument("--step-s", type=float, default=1.0, help="seconds per workflow step")
    parser.add_argument("--drop", type=float, default=0.0, help="probability the result's post is lost")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="a command to run pointed at this fake")
    Coze.options = options = parser.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", options.port), Coze)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    log(f"listening at {url} (token {TOKEN}, workflow {WORKFLOW})")
    if not options.command:
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            return 0
    env = {**os.environ, "COZE_BASE_URL": url, "COZE_API_TOKEN": TOKEN, "COZE_WORKFLOW_ID": WORKFLOW}
    try:
        child = subprocess.Popen(options.command, env=env)  # noqa: S603
    except FileNotFoundError:
        log(f"cannot run {options.command[0]!r}: give its path (../../.venv/bin/errands) or activate .venv")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: child.terminate())
    while True:
        try:
            return child.wait()
        except KeyboardInterrupt:  # Ctrl-C reached the command too: let it stop gracefully
            continue


if __name__ == "__main__":
    sys.exit(main())
