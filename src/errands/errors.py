"""The errors errands raises, one tree under :class:`ErrandsError`.

::

    ErrandsError
    ├── ConfigError            bad settings or an app that cannot be loaded (start-up)
    ├── StoreError             the database failed or could not be reached
    ├── LeaseLost              a worker's write was refused: it no longer holds the task
    └── ApiError               what an HTTP client is told; carries status and code
        ├── BadRequest          400
        │   └── InvalidCursor
        ├── Unauthorized        401
        ├── InsufficientCredits 402
        ├── Forbidden           403
        ├── NotFound            404
        ├── Conflict            409
        │   ├── IdConflict
        │   └── InvalidTransition
        ├── Gone                410
        ├── PayloadTooLarge     413
        ├── InvalidRequest      422
        │   └── UnknownTaskType
        ├── TooManyRequests     429
        └── Unavailable         503

The docstring of each class is its default message. Store and driver errors are translated at the
store boundary (``raise StoreError(...) from exc``), so SQLite and PostgreSQL raise the same errors,
and the HTTP layer maps each :class:`ApiError` to ``{"error": {"code", "message"}}``.

Handlers end a task with the control-flow exceptions :class:`errands.Fail` and
:class:`errands.Retry`, which are not errors of errands and live in :mod:`errands.context`.
"""

from __future__ import annotations


class ErrandsError(Exception):
    """errands failed."""

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (type(self).__doc__ or "").strip().split("\n")[0]
        super().__init__(self.message)


class ConfigError(ErrandsError):
    """The configuration is not valid."""


class StoreError(ErrandsError):
    """The task store failed."""


class LeaseLost(ErrandsError):
    """The worker no longer holds this task; its write was refused."""


class ApiError(ErrandsError):
    """The request failed."""

    status_code = 500
    code = "error"

    def __init__(self, message: str | None = None, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadRequest(ApiError):
    """The request is malformed."""

    status_code = 400
    code = "bad_request"


class InvalidCursor(BadRequest):
    """The cursor is not valid."""

    code = "invalid_cursor"


class Unauthorized(ApiError):
    """A valid token is required."""

    status_code = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """This token may not do that."""

    status_code = 403
    code = "forbidden"


class NotFound(ApiError):
    """No such task."""

    status_code = 404
    code = "not_found"


class InsufficientCredits(ApiError):
    """The owner's credits do not cover this task's cost."""

    status_code = 402
    code = "insufficient_credits"


class Conflict(ApiError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class StreamGap(Conflict):
    """Stream chunks that would leave a gap: the chunks before them have not arrived."""

    code = "stream_gap"


class IdConflict(Conflict):
    """A different task already uses this id."""

    code = "id_conflict"


class InvalidTransition(Conflict):
    """The task is not in a state that allows this."""

    code = "invalid_state"


class Gone(ApiError):
    """The task finished and has been purged."""

    status_code = 410
    code = "gone"


class PayloadTooLarge(ApiError):
    """The request body is too large."""

    status_code = 413
    code = "payload_too_large"


class InvalidRequest(ApiError):
    """The request is not valid."""

    status_code = 422
    code = "invalid_request"


class UnknownTaskType(InvalidRequest):
    """No handler or provider is registered for this task type."""

    code = "unknown_type"


class TooManyRequests(ApiError):
    """Too many requests; try again later."""

    status_code = 429
    code = "too_many_requests"

    def __init__(self, message: str | None = None, *, retry_after_s: float = 1.0, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class Unavailable(ApiError):
    """The service is not available right now."""

    status_code = 503
    code = "unavailable"
