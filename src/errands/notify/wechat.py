"""WeChat subscribe messages: tell the end user in WeChat that their task ended.

::

    app.wechat(
        templates=[
            WeChatTemplate(
                "TEMPLATE_ID",
                data={"thing1": "{type}", "time2": "{finished_at}", "phrase3": "{outcome}"},
                page="pages/index/index?taskId={id}",
            )
        ],
    )  # appid and secret from ERRANDS_WECHAT_APPID / ERRANDS_WECHAT_SECRET

The task's owner is the user's openid. For each event of a task's end, the first template that
fits (one naming the task's type before one for every type) is rendered and sent with
``subscribeMessage.send``. Values are ``str.format`` templates over the task: ``{id}``,
``{type}``, ``{status}``, ``{outcome}`` (a short phrase per status), ``{message}``, ``{error}``,
``{progress}``, ``{created_at}``, ``{finished_at}`` (``YYYY-MM-DD HH:MM`` in ``timezone``),
``{input[key]}`` and ``{result[key]}``. Each value is cut to the limit of its field type
(``thing`` 20 characters, ``phrase`` 5, ``name`` 10…), which WeChat would otherwise refuse.

The access token comes from ``/cgi-bin/stable_token`` (which other callers of the same app do
not invalidate), is cached until shortly before it expires, and is fetched again when WeChat
says it is no longer valid. ``43101`` (the user has no subscription left), an unknown openid or
template, or bad data are final; other errors are retried on the notification schedule.
"""

from __future__ import annotations

import asyncio
import re
import string
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson

from errands.clock import Clock
from errands.model import Event
from errands.notify.policy import Route, Sent
from errands.registry import DEFAULT_OUTCOMES, WeChatConfig, WeChatTemplate
from errands.store.records import Channel, Message

__all__ = ["DEFAULT_OUTCOMES", "WeChat", "WeChatTemplate", "field_type", "fit"]

DEFAULT_BASE_URL = "https://api.weixin.qq.com"
#: The most characters WeChat accepts per field type (keys are the type plus a number: thing1).
LIMITS = {
    "thing": 20,
    "number": 32,
    "letter": 32,
    "symbol": 5,
    "character_string": 32,
    "phrase": 5,
    "name": 10,
    "phone_number": 17,
    "car_number": 8,
    "amount": 11,
    "time": 32,
    "date": 32,
}
#: Errors after which the same message can never succeed.
FINAL_ERRORS = {
    43101: "the user has no subscription left for this template",
    40003: "the openid is not valid",
    40037: "the template id is not valid",
    47003: "the template data is not valid",
    41030: "the page is not valid",
}
#: The access token is no longer valid: fetch another and try again at once.
TOKEN_ERRORS = frozenset({40001, 40014, 42001})
_KEY = re.compile(r"^([a-z_]+?)(\d+)$")
_TOKEN_MARGIN_S = 300.0


def field_type(key: str) -> str:
    """``thing1`` → ``thing``; ``character_string2`` → ``character_string``."""
    match = _KEY.match(key)
    return match.group(1) if match else key


def fit(key: str, value: str) -> str:
    """A value cut to its field's limit (an ellipsis marks a cut ``thing``)."""
    kind = field_type(key)
    value = " ".join(value.split())  # WeChat refuses line breaks and control characters
    limit = LIMITS.get(kind)
    if limit is None or len(value) <= limit:
        return value
    if kind == "thing":
        return value[: limit - 1] + "…"
    return value[:limit]


class _Fields(dict[str, Any]):
    """Format arguments where a missing key renders empty rather than failing."""

    def __missing__(self, key: str) -> str:
        return ""


class _Lenient(string.Formatter):
    def get_field(self, field_name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        try:
            return super().get_field(field_name, args, kwargs)
        except (KeyError, IndexError, AttributeError, TypeError):
            return "", field_name


_FORMATTER = _Lenient()


class WeChat:
    """The WeChat channel of a running process: the app's templates, the credentials (from the
    app or the settings) and a cached access token."""

    def __init__(
        self,
        config: WeChatConfig,
        *,
        appid: str | None,
        secret: str | None,
        base_url: str | None,
        clock: Clock,
    ) -> None:
        self.config = config
        self.templates = config.templates
        self.appid = config.appid or appid
        self.secret = config.secret or secret
        self.base_url = config.base_url or base_url or DEFAULT_BASE_URL
        self.timeout_s = config.timeout_s
        self.clock = clock
        self._zone = ZoneInfo(config.timezone)
        self._token: str | None = None
        self._token_until = 0.0
        self._token_lock = asyncio.Lock()
        self._client: httpx.AsyncClient | None = None
        self.token_fetches = 0

    # -- routing and rendering (no I/O) -------------------------------------------------------

    def template(self, key: str) -> WeChatTemplate | None:
        return next((t for t in self.templates if t.key == key), None)

    def pick(self, event: Event) -> list[Route]:
        """The one template for an event, if any: one naming its type wins over a general one."""
        fitting = [t for t in self.templates if _route(t).wants(event)]
        fitting.sort(key=lambda t: t.types is None)
        return [Route(Channel.WECHAT, fitting[0].key, ())] if fitting else []

    def render(self, template: WeChatTemplate, task: Mapping[str, Any]) -> dict[str, Any]:
        """The body of ``subscribeMessage.send`` for one task (``task`` as the API shows it)."""
        error = task.get("error") or {}
        fields = _Fields(
            id=task.get("id", ""),
            type=task.get("type", ""),
            status=task.get("status", ""),
            outcome=self.config.outcomes.get(str(task.get("status")), str(task.get("status", ""))),
            message=task.get("message") or "",
            error=error.get("message", "") if isinstance(error, dict) else "",
            progress=task.get("progress", 0),
            created_at=self._local(task.get("created_at")),
            finished_at=self._local(task.get("finished_at")),
            input=_Fields(task.get("input") or {}),
            result=_Fields(task["result"]) if isinstance(task.get("result"), dict) else _Fields(),
        )
        body: dict[str, Any] = {
            "touser": task.get("owner", ""),
            "template_id": template.template_id,
            "data": {
                key: {"value": fit(key, _FORMATTER.vformat(value, (), fields))}
                for key, value in template.data.items()
            },
            "miniprogram_state": self.config.miniprogram_state,
            "lang": self.config.lang,
        }
        if template.page:
            body["page"] = _FORMATTER.vformat(template.page, (), fields)
        return body

    def _local(self, stamp: Any) -> str:
        if not isinstance(stamp, str):
            return ""
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone(self._zone)
        return moment.strftime("%Y-%m-%d %H:%M")

    # -- sending ------------------------------------------------------------------------------

    def _now(self) -> float:
        return self.clock.now()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s, trust_env=False)
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def access_token(self, *, stale: str | None = None) -> str:
        """The cached token, or a new one; ``stale``: WeChat refused that one, get another."""
        async with self._token_lock:
            if stale is not None and self._token == stale:
                self._token = None
            if self._token is None or self._now() >= self._token_until:
                if not self.appid or not self.secret:
                    raise _Final("the WeChat appid and secret are not configured")
                response = await self._http().post(
                    "/cgi-bin/stable_token",
                    json={"grant_type": "client_credential", "appid": self.appid, "secret": self.secret},
                )
                self.token_fetches += 1
                data = _json(response)
                token = data.get("access_token")
                if not isinstance(token, str) or not token:
                    code = data.get("errcode")
                    raise _Transient(f"WeChat gave no access token (errcode {code})")
                expires_in = float(data.get("expires_in") or 7200)
                self._token = token
                self._token_until = self._now() + max(60.0, expires_in - _TOKEN_MARGIN_S)
            return self._token

    async def send(self, message: Message) -> Sent:
        """One attempt at sending the subscribe message of ``message``."""
        started = time.perf_counter()

        def done(ok: bool, error: str | None = None, *, final: bool = False, code: int | None = None) -> Sent:
            latency = (time.perf_counter() - started) * 1000
            return Sent(ok, code, latency, None, error, final=final)

        template = self.template(message.target)
        if template is None:
            return done(False, f"no WeChat template named {message.target!r}", final=True)
        task = orjson.loads(message.payload)["data"]["task"]
        body = self.render(template, task)
        try:
            token = await self.access_token()
            data = await self._post_message(token, body)
            if data.get("errcode") in TOKEN_ERRORS:
                token = await self.access_token(stale=token)
                data = await self._post_message(token, body)
        except _Final as exc:
            return done(False, str(exc), final=True)
        except _Transient as exc:
            return done(False, str(exc))
        except httpx.HTTPError as exc:
            return done(False, f"WeChat could not be reached ({type(exc).__name__})")
        code = int(data.get("errcode") or 0)
        if code == 0:
            return done(True, code=0)
        reason = FINAL_ERRORS.get(code)
        if reason is not None:
            return done(False, f"WeChat errcode {code}: {reason}", final=True, code=code)
        return done(False, f"WeChat errcode {code}: {str(data.get('errmsg', ''))[:80]}", code=code)

    async def _post_message(self, token: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._http().post(
            "/cgi-bin/message/subscribe/send", params={"access_token": token}, content=orjson.dumps(body),
            headers={"content-type": "application/json"},
        )  # fmt: skip
        return _json(response)


def _route(template: WeChatTemplate) -> Route:
    types = None if template.types is None else tuple(template.types)
    return Route(Channel.WECHAT, template.key, tuple(template.events), types)


class _Final(Exception):
    pass


class _Transient(Exception):
    pass


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise _Transient(f"WeChat answered HTTP {response.status_code}")
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise _Transient("WeChat answered something that is not JSON") from None
    if not isinstance(data, dict):
        raise _Transient("WeChat answered something that is not a JSON object")
    return data
