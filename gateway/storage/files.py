"""Writing to the data volume when it may be full.

A full disk (``ENOSPC``), an exhausted quota (``EDQUOT``), a file-size limit (``EFBIG``) or
an I/O error must cost what cannot be kept, counted, and never a session, a pipeline or an
unfinished file. Everything here runs on the event loop and never raises ``OSError``
from a write into its caller:

* :func:`write_atomically` writes a small file through a temporary beside it, fsynced,
  then renamed over the target; on failure the temporary is removed and the target is
  left as it was.
* :class:`HeldWriter` is the base of writers that keep what the disk refused in memory,
  up to a bound, and retry with a back-off (:data:`FIRST_RETRY` doubling to
  :data:`MAX_RETRY`) until it goes through; :class:`HeldAppender` is the one for line
  files (``speakers.jsonl``, ``transcript.jsonl``).
* :class:`DiskWatch` (one per metrics registry, :func:`disk_watch`) knows which files
  cannot be written right now, for ``/readyz``; it counts every failed write in
  ``gateway_disk_errors_total{what}`` and logs once per session when writing starts
  failing and once when it recovers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from ..metrics import DiskMetrics

logger = logging.getLogger("gateway.files")

Log = logging.LoggerAdapter[logging.Logger] | logging.Logger

#: First retry after a failed write, seconds; each failure doubles it up to MAX_RETRY.
FIRST_RETRY = 0.5
MAX_RETRY = 5.0
#: A file that is written only now and then (``session.json``) is retried this many times
#: after a failure before the gateway gives up on it (about a minute and a half).
ATTEMPTS = 20

_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def reason(exc: OSError) -> str:
    """A short, bounded description of why a write failed (for ``/readyz``)."""
    if exc.errno in _REASONS:
        return _REASONS[exc.errno]
    return f"cannot write to disk ({os.strerror(exc.errno) if exc.errno else type(exc).__name__})"


def create(path: Path, flags: int) -> int:
    """Open ``path`` for writing, making its directory if it is missing: a session's
    directory could not be made while the disk was full (a new directory needs a block)."""
    try:
        return os.open(path, flags | _O_CLOEXEC, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags | _O_CLOEXEC, 0o666)


def no_space() -> OSError:
    """The error a write that made no progress stands for."""
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until all of ``data`` is written (short writes happen on a full disk)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise no_space()
        view = view[n:]


def write_atomically(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Replace ``path`` with ``data``: a crash or a failure leaves the old file or the new.

    The data goes to ``<name>.tmp`` beside it, is fsynced (so the rename never publishes a
    file whose blocks the disk had yet to accept: on filesystems that allocate at
    writeback, a full disk shows only there) and renamed over ``path``. On any failure the
    temporary file is removed and the ``OSError`` is raised with ``path`` untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = create(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# -- what cannot be written right now -------------------------------------------------------


@dataclass(slots=True)
class _Retry:
    handle: asyncio.TimerHandle | None = None
    attempts: int = 0


class DiskWatch:
    """Which files of which sessions cannot be written right now; one per process.

    Writers report each failed write (:meth:`failed`) and the first success after failures
    (:meth:`recovered`). ``/readyz`` asks :attr:`problem`, which costs a dictionary check.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = DiskMetrics(registry)
        # (session directory, file name) -> why it cannot be written.
        self._failing: dict[tuple[Path, str], str] = {}
        # Session directory -> how many of its files cannot be written.
        self._sessions: dict[Path, int] = {}
        self._retries: dict[Path, _Retry] = {}

    @property
    def problem(self) -> str | None:
        """Why some session cannot write right now, or None when every write goes through."""
        if not self._failing:
            return None
        why = next(iter(self._failing.values()), "cannot write to disk")
        n = len(self._sessions)
        return f"{why}: {n} session{'s' if n != 1 else ''} cannot write"

    def failing(self, directory: Path, name: str) -> bool:
        return (directory, name) in self._failing

    def failed(
        self, directory: Path, name: str, what: str, exc: OSError, log: Log, detail: str = ""
    ) -> None:
        """A write of ``directory/name`` failed: count it; log if the session was healthy."""
        self.metrics.errors.labels(what).inc()
        key = (directory, name)
        known = key in self._failing
        self._failing[key] = reason(exc)
        if known:
            return
        n = self._sessions.get(directory, 0)
        self._sessions[directory] = n + 1
        if n == 0:
            log.error("cannot write %s: %s%s", name, exc, f"; {detail}" if detail else "")
        else:
            log.warning("cannot write %s either: %s", name, exc)

    def recovered(self, directory: Path, name: str, log: Log | None, detail: str = "") -> None:
        """``directory/name`` was written after failures (or is given up: ``log`` None)."""
        if self._failing.pop((directory, name), None) is None:
            return
        n = self._sessions.get(directory, 1) - 1
        if n > 0:
            self._sessions[directory] = n
            return
        self._sessions.pop(directory, None)
        if log is not None:
            log.info("writing to disk again (%s)%s", name, f"; {detail}" if detail else "")

    def retry_later(self, path: Path, again: Callable[[], None]) -> bool:
        """Call ``again`` after a back-off, unless :data:`ATTEMPTS` retries were made.

        For files written only now and then. Returns False when the gateway gives up (the
        caller then forgets the failure). Without a running event loop nothing is retried.
        """
        retry = self._retries.setdefault(path, _Retry())
        if retry.handle is not None:
            return True  # one is already pending
        if retry.attempts >= ATTEMPTS:
            del self._retries[path]
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            del self._retries[path]
            return False
        delay = min(MAX_RETRY, FIRST_RETRY * 2**retry.attempts)
        retry.attempts += 1

        def fire() -> None:
            retry.handle = None
            again()

        retry.handle = loop.call_later(delay, fire)
        return True

    def retry_done(self, path: Path) -> None:
        """``path`` was written: no retry pending, and the attempts count starts afresh."""
        retry = self._retries.pop(path, None)
        if retry is not None and retry.handle is not None:
            retry.handle.cancel()


_WATCHES: weakref.WeakKeyDictionary[CollectorRegistry, DiskWatch] = weakref.WeakKeyDictionary()


def disk_watch(registry: CollectorRegistry) -> DiskWatch:
    """The process's :class:`DiskWatch` for ``registry`` (made, with its metrics, once)."""
    watch = _WATCHES.get(registry)
    if watch is None:
        watch = _WATCHES[registry] = DiskWatch(registry)
    return watch


_STANDALONE: list[DiskWatch] = []


def standalone(path: Path, what: str, log: Log = logger) -> FileStatus:
    """A status for a writer used outside a gateway (a tool, a test): private metrics."""
    if not _STANDALONE:
        _STANDALONE.append(DiskWatch(CollectorRegistry()))
    return FileStatus(_STANDALONE[0], path.parent, path.name, what, log)


@dataclass(frozen=True, slots=True)
class FileStatus:
    """One file's link to the :class:`DiskWatch`: where it is, what it counts as, its log."""

    watch: DiskWatch
    directory: Path
    name: str
    what: str
    """The ``what`` label: ``recording``, ``metadata`` or ``transcript``."""
    log: Log
    on_error: Callable[[], None] | None = None
    """Also called on each failed write (a pipeline's own error counter)."""

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def failed(self, exc: OSError, detail: str = "") -> None:
        self.watch.failed(self.directory, self.name, self.what, exc, self.log, detail)
        if self.on_error is not None:
            self.on_error()

    def recovered(self, detail: str = "") -> None:
        self.watch.recovered(self.directory, self.name, self.log, detail)

    def forget(self) -> None:
        """The file will not be written again: it no longer holds readiness back."""
        self.watch.recovered(self.directory, self.name, None)


# -- writers that hold what the disk refused ---------------------------------------------
