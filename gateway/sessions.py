"""All sessions of the process, and the linger timers that end them.

A session outlives its bot's connections: when the output socket drops, the session waits
``linger`` seconds (the bot's backoff cap, 60 s, plus the outage it covers) for a
reconnect before it is finalized, also across a restart of the process (:meth:`recover`).
Sessions are keyed by URL key or sanitized ``bot_id``; each gets a directory of its own,
so a later meeting with the same key never overwrites an earlier one's files.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .config import Settings
from .memory import Trimmer
from .metrics import Metrics
from .pipeline import PipelineFactory
from .reports import ConnectionRecord, GapRecord
from .session import Session
from .storage import journal

logger = logging.getLogger("gateway.sessions")


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
        self.adopt = False
        """Cluster mode: a key with no live session here continues the unfinished session
        another node left in the shared data directory (see :mod:`gateway.cluster`)."""
        self.on_ended: Callable[[str], None] = lambda key: None
        self.on_opened: Callable[[Session], None] = lambda session: None
        self.mirror: Callable[[str, str], None] | None = None
        """Cluster mode: ``mirror(key, line)`` keeps every journal line in Redis too."""

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
        if self.adopt:
            latest = journal.latest(self.root, key)
            state = journal.unfinished_in(latest) if latest is not None else None
            if state is not None:
                session = self._restore(state)
                self._sessions[key] = session
                self._update_gauge()
                self.on_opened(session)
                session.log.info(
                    "session continued from %s at %.1f s of audio",
                    state.directory,
                    session.audio_seconds,
                )
                return session
        session = Session(
            key=key,
            directory=self._directory(key),
            settings=self.settings,
            metrics=self.metrics,
            factories=self.factories,
            params=dict(params),
        )
        self._mirrored(session)
        self._sessions[key] = session
        self._update_gauge()
        self.on_opened(session)
        session.log.info("session opened")
        return session

    def _mirrored(self, session: Session) -> None:
        mirror, key = self.mirror, session.key
        if mirror is not None:
            session.journal.mirror = lambda line: mirror(key, line)

    def new_directory(self, key: str) -> Path:
        return self._directory(key)

    def _directory(self, key: str) -> Path:
        """A fresh directory: an earlier session with the same key keeps its files."""
        path = self.root / key
        n = 1
        while path.exists():
            n += 1
            path = self.root / f"{key}.{n}"
        return path

    def linger(self, session: Session, seconds: float | None = None) -> None:
        """The bot is gone; finalize unless it comes back within the linger time."""
        if self._sessions.get(session.key) is not session:
            return  # handed over to another node, or already ended
        loop = asyncio.get_running_loop()
        old = self._linger.pop(session.key, None)
        if old is not None:
            old.cancel()
        delay = self.settings.linger if seconds is None else max(0.0, seconds)
        self._linger[session.key] = loop.call_later(delay, self._expire, session.key)
        self._update_gauge()

    def recover(self, states: Iterable[journal.Resume] | None = None) -> int:
        """Bring back the sessions an earlier process left unfinished (see
        :mod:`gateway.storage.journal`; by default every one under the data directory),
        each lingering for what is left of its linger, counted from the last sign of its
        bot. Returns how many came back."""
        now = self._time()
        found = sorted(
            journal.unfinished(self.root) if states is None else states,
            key=lambda r: r.created_at,
        )
        for state in found:
            previous = self._sessions.get(state.key)
            if previous is not None:
                # Two unfinished directories of one key: the later meeting is the one its
                # bot can come back to; the earlier one ends now.
                self._finalize_soon(previous)
            session = self._restore(state)
            self._sessions[state.key] = session
            self.linger(session, self.settings.linger - (now - state.last_seen))
            session.log.info(
                "session recovered from %s at %.1f s of audio (%s); lingering",
                state.directory,
                session.audio_seconds,
                "suspended" if state.suspended else "the previous process died",
            )
        self._update_gauge()
        return len(found)

    def _restore(self, state: journal.Resume) -> Session:
        session = Session(
            key=state.key,
            directory=state.directory,
            settings=self.settings,
            metrics=self.metrics,
            factories=self.factories,
            params=state.params,
            bot_id=state.bot_id,
            protocol_version=state.protocol_version,
            created_at=state.created_at,
        )
        self._mirrored(session)
        session.parts = list(state.parts)
        session.speakers.restore(state.speakers)
        session.annotations.update(state.annotations)
        session.speakers.take_learnt()  # already in the journal
        gaps = [
            GapRecord(g["sample"], g["seconds"], g["wall_start"], g["wall_end"]) for g in state.gaps
        ]
        session.core.resume(state.origin, gaps, state.last_seen or self._time())
        session.core.reconnects = state.reconnects
        session.connections = [ConnectionRecord(**c) for c in state.connections]
        # The audio reached at least as far as any pipeline's files say (a process killed
        # between two position lines still wrote its recording up to the kill).
        names = session.pipeline_names()
        position = max(
            [state.samples]
            + [self.factories[n].resume_position(state.directory, state.rate) for n in names]
        )
        session.start(state.rate, position)
        return session

    def _finalize_soon(self, session: Session) -> None:
        task = asyncio.create_task(self.finalize(session))
        self._finalizing.add(task)
        task.add_done_callback(self._finalizing.discard)

    def _expire(self, key: str) -> None:
        self._linger.pop(key, None)
        session = self._sessions.get(key)
        if session is not None and session.output is None:
            session.log.info("bot did not come back within %.0f s", self.settings.linger)
            self._finalize_soon(session)

    async def finalize(self, session: Session) -> None:
        handle = self._linger.pop(session.key, None)
        if handle is not None:
            handle.cancel()
        try:
            await session.finalize()
        finally:
            if self._sessions.get(session.key) is session:
                del self._sessions[session.key]
                self.on_ended(session.key)
            self._update_gauge()
            self.trimmer.session_ended()

    async def hand_over(self, key: str) -> None:
        """Another node continues ``key``: close its bot's sockets, suspend it (its files
        and journal stay complete for the next owner) and forget it here."""
        session = self._sessions.pop(key, None)
        handle = self._linger.pop(key, None)
        if handle is not None:
            handle.cancel()
        if session is None:
            return
        self._update_gauge()
        for ws in (session.output, session.input):
            if ws is not None:
                asyncio.get_running_loop().create_task(ws.close(1012, "session moved"))
        await session.suspend()
        self.trimmer.session_ended()

    async def finalize_all(self) -> None:
        await asyncio.gather(*(self.finalize(s) for s in list(self._sessions.values())))
        if self._finalizing:
            await asyncio.gather(*self._finalizing, return_exceptions=True)
        await self.trimmer.close()

    async def suspend_all(self) -> None:
        """The process stops with meetings still on: every session that has audio is
        suspended for the next process to resume; one that never started ends."""
        for handle in self._linger.values():
            handle.cancel()
        self._linger.clear()
        if self._finalizing:
            await asyncio.gather(*self._finalizing, return_exceptions=True)
        sessions = list(self._sessions.values())
        self._sessions.clear()
        await asyncio.gather(
            *(s.suspend() if s.state != "waiting" else s.finalize() for s in sessions)
        )
        self._update_gauge()
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
