"""``/v1/tasks/{task_id}/streams``: a task's output streams, as written so far.

A page that opens late loads a stream here, then watches the task with ``after`` set to the
``X-Errands-Seq`` this answered: it receives exactly the chunks that came next.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from errands.api.errors import error_response
from errands.api.routing import Call, Header, PathParam, Route
from errands.api.tasks import TASK_ID, json
from errands.inputs import STREAM_NAME_PATTERN

NAME = PathParam("name", STREAM_NAME_PATTERN, "The stream's name.")


class StreamQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")

    attempt: Annotated[
        int | None, Field(ge=1, le=1_000_000, description="Default: the latest that wrote it.")
    ] = None
    offset: Annotated[int, Field(ge=0, le=2**31, description="The position of the first chunk wanted.")] = 0
    format: Annotated[
        Literal["text", "jsonl", "json"] | None,
        Field(description="Default: `text` when every chunk is a string, else `jsonl` (a chunk per line)."),
    ] = None


class StreamList(BaseModel):
    streams: list[dict[str, int | str]]


class StreamPage(BaseModel):
    """A stream with ``format=json``."""

    name: str
    attempt: int | None
    offset: int
    next_offset: int
    seq: int
    chunks: list[Any]


async def list_streams(call: Call) -> Response:
    """Every stream of every attempt: its name, attempt, chunk and byte counts, latest seq."""
    found = await call.runtime.service.streams(call.path_params["task_id"], call.principal)
    return json(orjson.dumps({"streams": [s.public() for s in found]}))


async def get_stream(call: Call) -> Response:
    """The stream from ``offset`` on: text, JSON lines or one JSON document. The headers
    ``X-Errands-Seq`` (watch after it for what comes next), ``X-Errands-Attempt`` and
    ``X-Errands-Next-Offset`` say where it stands; a stream nothing was written to is empty."""
    q = call.query(StreamQuery)
    read = await call.runtime.service.stream(
        call.path_params["task_id"],
        call.principal,
        call.path_params["name"],
        attempt=q.attempt,
        offset=q.offset,
    )
    headers = {
        "X-Errands-Seq": str(read.seq),
        "X-Errands-Attempt": "" if read.attempt is None else str(read.attempt),
        "X-Errands-Next-Offset": str(read.next_offset),
        "Cache-Control": "no-store",
    }
    form = q.format or ("text" if read.text else "jsonl")
    if form == "json":
        body = orjson.dumps(
            {
                "name": read.name,
                "attempt": read.attempt,
                "offset": read.offset,
                "next_offset": read.next_offset,
                "seq": read.seq,
                "chunks": read.chunks,
            }
        )
        return Response(body, media_type="application/json", headers=headers)
    if form == "text":
        text = "".join(c if isinstance(c, str) else orjson.dumps(c).decode() for c in read.chunks)
        return _text(text.encode(), headers, call.header(b"range"))
    lines = b"".join(orjson.dumps(c) + b"\n" for c in read.chunks)
    return Response(lines, media_type="application/x-ndjson", headers=headers)


def _text(body: bytes, headers: dict[str, str], asked: str | None) -> Response:
    """The text, or the part of it a ``Range: bytes=start-[end]`` header asks for (``206``); a
    range that starts past the end is ``416``; any other Range header is ignored, as HTTP says."""
    headers = {**headers, "Accept-Ranges": "bytes"}
    media_type = "text/plain; charset=utf-8"
    match = _RANGE.match(asked.strip()) if asked is not None else None
    if match is None:
        return Response(body, media_type=media_type, headers=headers)
    start = int(match.group(1))
    end = min(len(body) - 1, int(match.group(2))) if match.group(2) else len(body) - 1
    if start >= len(body):
        headers["Content-Range"] = f"bytes */{len(body)}"
        return error_response(416, "range_not_satisfiable", f"The text has {len(body)} bytes.", headers)
    if end < start:
        return Response(body, media_type=media_type, headers=headers)
    headers["Content-Range"] = f"bytes {start}-{end}/{len(body)}"
    return Response(body[start : end + 1], status_code=206, media_type=media_type, headers=headers)


_RANGE = re.compile(r"^bytes=([0-9]{1,15})-([0-9]{1,15})?$")
_ERRORS = (400, 401, 403, 404, 410, 416, 422)
RANGE = Header(
    "Range",
    {"type": "string"},
    "format=text only: `bytes=START-` or `bytes=START-END` of the text (a page that has the "
    "first START bytes asks for the rest); answered 206 with Content-Range.",
)

ROUTES = [
    Route(
        "GET",
        "/v1/tasks/{task_id}/streams",
        list_streams,
        "A task's output streams",
        "streams",
        path_params=(TASK_ID,),
        response=StreamList,
        errors=_ERRORS,
    ),
    Route(
        "GET",
        "/v1/tasks/{task_id}/streams/{name}",
        get_stream,
        "One output stream, as written so far",
        "streams",
        path_params=(TASK_ID, NAME),
        query=StreamQuery,
        headers=(RANGE,),
        answers={206: ("Part of the text, as the Range header asked.", {"type": "string"})},
        response={"type": "string", "description": "The chunks, concatenated (format=text)."},
        media_type="text/plain",
        more_media={
            "application/x-ndjson": {"type": "string", "description": "A chunk per line (format=jsonl)."},
            "application/json": StreamPage,
        },
        errors=_ERRORS,
    ),
]
