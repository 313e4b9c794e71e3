"""All sessions of the process, and the linger timers that end them.

A session outlives its bot's connections: when the output socket drops, the session waits
``linger`` seconds (longer than the bot's 60 s backoff cap) for a reconnect before it is
finalized. Sessions are keyed by URL key or sanitized ``bot_id``; each gets a directory of
its own, so a later meeting with the same key never overwrites an earlier one's files.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .config import Settings
from .memory import Trimmer
from .metrics import Metrics
from .pipeline import PipelineFactory
from .session import Session


class SessionManager:
    """All sessions of the process, with the linger timers that end them."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        factories: Mapping[str, PipelineFactory],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.factories = factories
        self._sessions: dict[str, Session] = {}
        self._linger: dict[str, asyncio.TimerHandle] = {}
        self._finalizing: set[asyncio.Task[None]] = set()
        self._time = clock
        self.root = settings.data_dir / "sessions"
        self.trimmer = Trimmer()

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: str) -> Session | None:
        return self._sessions.get(key)

    def open(self, key: str, params: Mapping[str, str]) -> Session:
        """The live session for ``key``, or a new one."""
        session = self._sessions.get(key)
        if session is not None:
            handle = self._linger.pop(key, None)
            if handle is not None:
                handle.cancel()
            return session
        session = Session(
            key=key,
            directory=self._directory(key),
            settings=self.settings,
            metrics=self.metrics,
            factories=self.factories,
            params=dict(params),
        )
        self._sessions[key] = session
        self._update_gauge()
        session.log.info("session opened")
        return session

    def _directory(self, key: str) -> Path:
        """A fresh directory: an earlier session with the same key keeps its files."""
        path = self.root / key
        n = 1
        while path.exists():
            n += 1
            path = self.root / f"{key}.{n}"
        return path

    def linger(self, session: Session) -> None:
        """The bot is gone; finalize unless it comes back within the linger time."""
        loop = asyncio.get_running_loop()
        old = self._linger.pop(session.key, None)
        if old is not None:
            old.cancel()
        self._linger[session.key] = loop.call_later(self.settings.linger, self._expire, session.key)
        self._update_gauge()

    def _expire(self, key: str) -> None:
        self._linger.pop(key, None)
        session = self._sessions.get(key)
        if session is not None and session.output is None:
            session.log.info("bot did not come back within %.0f s", self.settings.linger)
            task = asyncio.create_task(self.finalize(session))
            self._finalizing.add(task)
            task.add_done_callback(self._finalizing.discard)

    async def finalize(self, session: Session) -> None:
        handle = self._linger.pop(session.key, None)
        if handle is not None:
            handle.cancel()
        try:
            await session.finalize()
        finally:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]
            self._update_gauge()
            self.trimmer.session_ended()

    async def finalize_all(self) -> None:
        await asyncio.gather(*(self.finalize(s) for s in list(self._sessions.values())))
        if self._finalizing:
            await asyncio.gather(*self._finalizing, return_exceptions=True)
        await self.trimmer.close()

    def _update_gauge(self) -> None:
        counts = {"waiting": 0, "live": 0, "lingering": 0}
        for s in self._sessions.values():
            if s.state in counts:
                counts[s.state] += 1
        for state, n in counts.items():
            self.metrics.sessions.labels(state).set(n)

    def refresh(self) -> None:
        """Bring the session gauges and counters up to date (before a scrape)."""
        for session in self._sessions.values():
            if session.sample_rate:
                session.flush_counts()
        self._update_gauge()
