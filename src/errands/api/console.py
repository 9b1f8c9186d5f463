"""The operations console at ``/console``: a page of errands' own files (``static/console``),
a client of the public API like any other. The files need no token; every call they make does."""

from __future__ import annotations

import functools
from importlib import resources

from starlette.responses import Response

from errands.api.routing import Call, PathParam, Route, file_response

_FILES = {
    "console.js": "text/javascript; charset=utf-8",
    "console.css": "text/css; charset=utf-8",
}
_FOLDER = resources.files("errands").joinpath("static/console")
_HEADERS = {
    "Cache-Control": "no-cache",
    # Only errands' own files and API: no other origin, no inline script.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}


@functools.cache
def _read(name: str) -> bytes:
    return _FOLDER.joinpath(name).read_bytes()


async def console(call: Call) -> Response:
    """The console's page (sign in with the admin key or an owner token)."""
    del call
    return Response(_read("index.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


async def console_file(call: Call) -> Response:
    """A file of the console."""
    return file_response(call.path_params["file"], _FILES, _read, _HEADERS)


ROUTES = [
    Route(
        "GET",
        "/console",
        console,
        "The operations console",
        "console",
        media_type="text/html",
        errors=(),
        auth="public",
        documented=False,
    ),
    Route(
        "GET",
        "/console/{file}",
        console_file,
        "A file of the console",
        "console",
        path_params=(PathParam("file", None, "The file's name."),),
        media_type="text/plain",
        errors=(404,),
        auth="public",
        documented=False,
    ),
]
