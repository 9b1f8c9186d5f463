"""Keeping credentials out of logs.

errands never logs a token itself, but the libraries it runs on may log request lines (uvicorn
logs every WebSocket handshake with its query string, where browsers put ``?access_token=``).
A filter on every handler rewrites such records before they are written.
"""

from __future__ import annotations

import logging
import re

_SECRETS = re.compile(r"(access_token=)[^&\s\"']+|\b(ek[ao]_|eto_)[A-Za-z0-9_\-.]+|(Bearer\s+)[^\s\"']+")


def redact(text: str) -> str:
    """``text`` with every token, admin key and ``access_token`` value replaced."""
    return _SECRETS.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "[redacted]", text)


class RedactSecrets(logging.Filter):
    """Rewrites a record's message when it contains a credential."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


_FILTER = RedactSecrets()


def protect(*logger_names: str) -> None:
    """Attach the filter to the handlers of the root logger and of ``logger_names``."""
    for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access", *logger_names):
        for handler in logging.getLogger(name).handlers:
            if _FILTER not in handler.filters:
                handler.addFilter(_FILTER)
