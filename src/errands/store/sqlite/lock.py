"""The lock that makes one process per SQLite file its sweeper: an exclusive ``flock`` on a file
beside the database. The system releases it when its process ends, however it ends; a process
forked while it is held does not hold it (its copy is closed in the child)."""

from __future__ import annotations

import logging
import os
import sys
import weakref

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("errands.store")


class FileLock:
    """An exclusive lock on ``path`` (made with ``mode`` if missing), held from a successful
    :meth:`take` until :meth:`release` or the end of the process."""

    def __init__(self, path: str, mode: int = 0o644) -> None:
        self.path = path
        self.mode = mode
        self._fd: int | None = None
        self._warned = False

    def take(self) -> bool:
        """Whether this process holds the lock, taking it if it is free. Where no lock file can
        be used (no permission, no ``flock``), ``True``: every process then acts as its holder,
        as before there was a lock (a warning says so, once)."""
        if self._fd is not None:
            return True
        try:
            self._fd = _lock(self.path, self.mode)
        except OSError as exc:
            if not self._warned:
                log.warning("the lock file %s cannot be used (%s): every process sweeps", self.path, exc)
                self._warned = True
            return True
        if self._fd is None:
            return False
        _HELD.add(self)
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is not None:
            os.close(fd)


def _lock(path: str, mode: int) -> int | None:
    """An open descriptor of ``path`` holding an exclusive lock on it; ``None`` if another holds
    the lock."""
    if sys.platform == "win32":
        raise OSError("file locks need a POSIX system")
    # Read-only is enough for flock, so a file made by another user of the database serves too.
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


#: The locks this process holds: a forked child closes its copies (the parent keeps the lock).
_HELD: weakref.WeakSet[FileLock] = weakref.WeakSet()


def _forget_in_child() -> None:
    for lock in list(_HELD):
        lock.release()


if sys.platform != "win32":
    os.register_at_fork(after_in_child=_forget_in_child)
