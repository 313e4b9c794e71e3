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

import abc
import asyncio
import contextlib
import errno
import logging
import os
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry

from .metrics import DiskMetrics

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


class HeldWriter(abc.ABC):
    """Back-off, retry timer and reporting for a writer that holds data for the disk.

    A subclass keeps what could not be written and implements :meth:`_write_held`, which
    writes it all or raises ``OSError`` (keeping whatever is left). Callers call
    :meth:`_try` whenever there is something new; while failing, that only writes once
    the back-off has passed, and a timer retries too, so a session whose bot went quiet
    still recovers (and stops holding ``/readyz`` back) when space returns.
    """

    def __init__(self, status: FileStatus) -> None:
        self.status = status
        self.failing = False
        self._delay = FIRST_RETRY
        self._next_try = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @abc.abstractmethod
    def _write_held(self) -> None:
        """Write everything held, in order; raise ``OSError`` when the disk refuses."""

    @property
    @abc.abstractmethod
    def holding(self) -> bool:
        """Whether anything waits for the disk."""

    def _recovery_detail(self) -> str:
        return ""

    def _failure_detail(self) -> str:
        return ""

    def _try(self, *, force: bool = False) -> bool:
        """Write what is held if it is time to; True once nothing is held."""
        if self.failing and not force and time.monotonic() < self._next_try:
            return False
        try:
            self._write_held()
        except OSError as exc:
            self._failed(exc)
            return False
        if self.failing:
            self.failing = False
            self._delay = FIRST_RETRY
            self.status.recovered(self._recovery_detail())
        return True

    def _failed(self, exc: OSError) -> None:
        """A write failed: count, log on the first, and retry after the back-off."""
        self.failing = True
        self.status.failed(exc, self._failure_detail())
        now = time.monotonic()
        self._next_try = now + self._delay
        self._delay = min(MAX_RETRY, self._delay * 2)
        if self._timer is None and not self._closed:
            with contextlib.suppress(RuntimeError):  # no running loop: retry on calls only
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self._next_try - now, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._closed and (self.failing or self.holding):
            self._try(force=True)

    def _stop_retrying(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class HeldAppender(HeldWriter):
    """An append-only file of lines; what the disk refuses waits, in order, bounded.

    At most ``max_lines`` lines wait; beyond that the oldest waiting line that has not been
    started on disk is dropped (counted through ``on_drop``), so a line is never torn. The
    file is opened with ``O_APPEND`` and written unbuffered: a short write keeps exactly
    the rest of its line for later.
    """

    def __init__(
        self,
        status: FileStatus,
        *,
        max_lines: int,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        super().__init__(status)
        self.path = status.path
        self._max_lines = max(1, max_lines)
        self._on_drop = on_drop
        self._held: deque[memoryview] = deque()
        self._started = False  # the first held line is partly on disk
        self._fd: int | None = None
        self.dropped = 0
        self.lost = 0
        self._try(force=True)  # create the file now, as before; retried if it cannot be

    @property
    def holding(self) -> bool:
        return bool(self._held)

    @property
    def held_lines(self) -> int:
        return len(self._held)

    def _open(self) -> int:
        if self._fd is None:
            self._fd = create(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        return self._fd

    def append(self, line: bytes) -> None:
        """Append one complete line (with its newline). Never raises for the disk."""
        if self._closed:
            return
        self._held.append(memoryview(line))
        if len(self._held) > self._max_lines:
            # Never the line already started on disk: the file would get a torn line.
            index = 1 if self._started else 0
            del self._held[index]
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(1)
            if self.dropped == 1:
                self.status.log.error(
                    "more than %d lines waiting for the disk; dropping the oldest of %s",
                    self._max_lines,
                    self.status.name,
                )
        self._try()

    def _write_held(self) -> None:
        fd = self._open()
        held = self._held
        while held:
            view = held[0]
            n = os.write(fd, view)
            if n <= 0:
                raise no_space()
            if n < len(view):
                held[0] = view[n:]
                self._started = True
                continue
            held.popleft()
            self._started = False

    def _failure_detail(self) -> str:
        return f"holding up to {self._max_lines} lines in memory and retrying"

    def finish(self) -> None:
        """Last attempt at what is held; whatever is left is lost (counted, logged)."""
        if self._closed:
            return
        self._try(force=True)
        self._stop_retrying()
        if self._held:
            self.lost = len(self._held)
            if self._on_drop is not None:
                self._on_drop(self.lost)
            self.status.log.error(
                "%d lines could not be written to %s and are lost", self.lost, self.status.name
            )
            self._held.clear()
        self.status.forget()

    def sync(self) -> None:
        """fsync the file (after :meth:`finish`); raises ``OSError``."""
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """:meth:`finish`, then close the file. Never raises for the disk."""
        self.finish()
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
