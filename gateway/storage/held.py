"""Writers that keep what a full disk refused in memory and write it when they can.

:class:`HeldWriter` holds refused data up to a bound and retries with a back-off
(:data:`~gateway.storage.files.FIRST_RETRY` doubling to
:data:`~gateway.storage.files.MAX_RETRY`) until it goes through; :class:`HeldAppender` is
the one for line files (``speakers.jsonl``, ``transcript.jsonl``). Failures are reported
through a :class:`~gateway.storage.files.FileStatus`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import time
from collections import deque
from collections.abc import Callable

from .files import FIRST_RETRY, MAX_RETRY, FileStatus, create, no_space


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
