"""The names ``errands`` exports are a promise: changing them must be deliberate."""

import errands


def test_public_exports_are_pinned() -> None:
    assert sorted(errands.__all__) == sorted(
        [
            "ApiError", "AsyncClient", "Client", "ConfigError", "Conflict", "ErrandsError", "Errands",
            "EventType", "Fail", "Forbidden", "Gone", "HookEvent", "IdConflict", "InvalidRequest",
            "InvalidTransition", "LeaseLost", "Limit", "NotFound", "Retry", "Settings", "Status",
            "StoreError",
            "StreamLimit", "Task", "TaskContext", "TaskError", "TooManyRequests", "Unauthorized",
            "Unavailable", "UnknownTaskType", "WeChatTemplate", "__version__",
        ]
    )  # fmt: skip
    for name in errands.__all__:
        assert hasattr(errands, name)


def test_every_error_has_a_default_message() -> None:
    for name in errands.__all__:
        obj = getattr(errands, name)
        if isinstance(obj, type) and issubclass(obj, errands.ErrandsError):
            assert obj().message, name
