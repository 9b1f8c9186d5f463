"""errands: a self-hosted service for long-running jobs.

Submit a task and get its id at once; a worker runs it (or an external provider calls back);
every change is pushed live to whoever watches; the owner is notified when it ends; a sweeper
rescues what got stuck.
"""

from errands.app import Errands
from errands.client import AsyncClient, Client
from errands.config import Settings
from errands.context import Fail, Retry, StreamLimit, TaskContext
from errands.errors import (
    ApiError,
    ConfigError,
    Conflict,
    ErrandsError,
    Forbidden,
    Gone,
    IdConflict,
    InvalidRequest,
    InvalidTransition,
    LeaseLost,
    NotFound,
    StoreError,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    UnknownTaskType,
)
from errands.model import EventType, Limit, Status, Task, TaskError
from errands.registry import HookEvent, WeChatTemplate

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ConfigError",
    "Conflict",
    "Errands",
    "ErrandsError",
    "EventType",
    "Fail",
    "Forbidden",
    "Gone",
    "HookEvent",
    "IdConflict",
    "InvalidRequest",
    "InvalidTransition",
    "LeaseLost",
    "Limit",
    "NotFound",
    "Retry",
    "Settings",
    "Status",
    "StoreError",
    "StreamLimit",
    "Task",
    "TaskContext",
    "TaskError",
    "TooManyRequests",
    "Unauthorized",
    "Unavailable",
    "UnknownTaskType",
    "WeChatTemplate",
    "__version__",
]
