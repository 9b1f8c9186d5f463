"""Workers: claim tasks, run them under leases, write their outcomes (see :mod:`.loop`)."""

from errands.worker.loop import Worker, default_worker_id

__all__ = ["Worker", "default_worker_id"]
