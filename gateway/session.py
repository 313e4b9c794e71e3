"""Sessions: one per meeting, surviving the bot's connections and the process.

A session is keyed by the URL key (``/bots/{key}``), else by the handshake's ``bot_id``.
The bot reconnects with backoff (1 s doubling to 60 s) after any drop; each reconnect
resumes the same session, and the time the bot was away becomes a gap on the audio
clock. A session whose bot has not come back within ``linger`` seconds is finalized:
its pipelines drain and stop, and ``session.json`` is written. What it needs to outlive
the process is appended to its journal as it happens (:mod:`gateway.storage.journal`).

:class:`Session` is the asyncio shell: it owns the connections, the pipelines' runners,
the player and the files. Everything the meeting's audio decides (clock, ring, VAD,
gaps, speakers) happens in its :class:`~gateway.core.SessionCore`, which has no I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import reports
from .audio.ring import RingBuffer
from .audio.vad import SpeechPaused, VoiceActivity
from .config import Settings
from .core import Counts, SessionCore
from .ingest.protocol import Handshake, ProviderEvent, Roster
from .ingest.runner import PipelineRunner
from .keys import MAX_BOT_ID, clip, phase
from .logs import SessionLog
from .metrics import Metrics
from .pipeline import PipelineFactory, ProviderSegment
from .reports import ConnectionRecord, GapRecord, MetadataFile, connection_json
from .speech.playback import Player
from .speech.speech_out import SpeechOut
from .storage import journal
from .storage.files import disk_watch

Samples = npt.NDArray[np.int16]

logger = logging.getLogger("gateway.session")

#: Notes pipelines may put on a session (``annotate``).
MAX_ANNOTATIONS = 16
#: ``session.json`` is rewritten (off the loop) this often while audio arrives, seconds:
#: the first time at once, the second after one to two intervals (the session's own
#: phase in it, from its key), then every interval.
METADATA_INTERVAL = 5.0


@dataclass
class Session(SpeechOut):
    """One meeting's state. Created and finalized by :class:`SessionManager`."""

    key: str
    directory: Path
    settings: Settings
    metrics: Metrics
    factories: Mapping[str, PipelineFactory]
    params: Mapping[str, str] = field(default_factory=dict)
    bot_id: str | None = None
    protocol_version: int | None = None
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.log: logging.LoggerAdapter[logging.Logger] = SessionLog(logger, {"session": self.key})
        self.core = SessionCore(self.settings, self.metrics, self, self.log, phase(self.key))
        self.clock = self.core.clock
        self.speakers = self.core.speakers
        self.runners: list[PipelineRunner] = []
        self.connections: list[ConnectionRecord] = []
        self.rejected: dict[str, int] = {}
        self.handler_errors: set[str] = set()  # stages that failed, logged once each
        self.ended_at: float | None = None
        self.output: Any = None  # the live output connection, if any
        self.input: Any = None  # the live separate input connection, if any
        self.player: Player | None = None
        self.suspending = False  # stopping with the meeting on: a new process resumes it
        failed = disk_watch(self.metrics.registry).metrics.errors.labels("journal").inc
        self.journal = journal.Journal(self.directory / journal.NAME, failed)
        self.metadata_file = MetadataFile(self)
        self._metadata_due = 0.0  # wall time of the next periodic session.json
        self.annotations: dict[str, str] = {}  # pipelines' notes (annotate)
        self.parts: list[dict[str, Any]] = []  # cluster mode: the nodes that served it
        self._unwritten_parts: list[dict[str, Any]] = []
        self.provider: str | None = None  # the vendor's transcription provider, if any
        self.start_time: float | None = None  # the handshake's start_time, epoch seconds

    # -- what the core keeps ----------------------------------------------------------

    @property
    def sample_rate(self) -> int:
        return self.core.rate

    @property
    def ring(self) -> RingBuffer | None:
        return self.core.ring

    @property
    def vad(self) -> VoiceActivity | None:
        return self.core.vad

    @property
    def gaps(self) -> list[GapRecord]:
        return self.core.gaps

    @property
    def reconnects(self) -> int:
        return self.core.reconnects

    @property
    def totals(self) -> Counts:
        return self.core.totals

    @property
    def state(self) -> str:
        if self.ended_at is not None:
            return "ended"
        if self.output is None:
            return "lingering" if self.core.started else "waiting"
        return "live" if self.clock.started else "waiting"

    @property
    def audio_seconds(self) -> float:
        return self.core.audio_seconds

    # -- lifecycle --------------------------------------------------------------------

    def start(self, rate: int, position: int = 0) -> None:
        """Fix the session's rate and start its pipelines (on handshake or first audio).

        ``position``: where the clock stands (a session resumed by a new process).
        """
        if self.core.started:
            return
        self.core.start(rate, position)
        assert self.core.ring is not None
        # From now on audio goes straight to the core: nothing in between on the hot path.
        self.receive_audio = self.core.receive_audio  # type: ignore[method-assign]
        s = self.settings
        self.player = Player(
            rate,
            s,
            self.metrics,
            self.playback_target,
            self.clock.wall,
            self._bot_speaking,
            self.log,
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            # A full disk: every writer makes the directory when it can write again.
            self.log.error("cannot create %s yet: %s", self.directory, exc)
        for name in self.pipeline_names():
            pipeline = self.factories[name].create(self)
            runner = PipelineRunner(
                name, pipeline, self, self.core.ring, self.metrics, s.pipeline_queue, self.log
            )
            self.runners.append(runner)
            runner.start()
        self._journal_session()
        for part in self._unwritten_parts:
            self.journal.append("part", **part)
        self._unwritten_parts.clear()
        self.metadata_file.update()
        self.log.info(
            "session started at %d Hz with pipelines %s",
            rate,
            ",".join(r.name for r in self.runners) or "none",
        )

    def pipeline_names(self) -> list[str]:
        asked = self.params.get("pipelines")
        if asked is None:
            return list(self.factories)
        names = []
        for name in (n.strip() for n in asked.split(",")):
            if name in self.factories:
                names.append(name)
            elif name:
                self.count_rejected("unknown_pipeline")
                self.log.warning("URL asks for pipeline %r, which is not enabled", name[:64])
        return names

    def handshake(self, hs: Handshake, url_rate: int | None) -> None:
        bot_id = clip(hs.bot_id, MAX_BOT_ID)
        if self.bot_id is not None and bot_id != self.bot_id:
            self.log.warning("bot_id changed from %s to %s", clip(self.bot_id), clip(bot_id))
        if hs.start_time is not None:
            self.start_time = hs.start_time  # the bot's capture start, epoch seconds
        changed = (bot_id, hs.protocol_version) != (self.bot_id, self.protocol_version)
        self.bot_id = bot_id
        self.protocol_version = hs.protocol_version
        if self.core.started and changed:
            self._journal_session()
        rate = hs.sample_rate or url_rate
        if rate is not None and self.core.connection_rate(rate):
            self.log.warning(
                "bot reconnected at %d Hz; its audio is resampled to the session's %d Hz",
                rate,
                self.sample_rate,
            )
        self.start(rate or self.settings.default_rate)

    def add_part(self, part: dict[str, Any]) -> None:
        """Cluster mode: a node serves the session from now on (in the journal once the
        session's directory exists)."""
        self.parts.append(part)
        if self.core.started:
            self.journal.append("part", **part)
        else:
            self._unwritten_parts.append(part)

    def _journal_session(self) -> None:
        self.journal.append("session", **reports.identity(self))

    def attach_output(self, conn: Any, record: ConnectionRecord) -> Any:
        """A bot's output socket connected; returns the connection it replaces, if any."""
        replaced, self.output = self.output, conn
        self.connections.append(record)
        self.connection_changed()
        if self.core.attached(replacing=replaced is not None):
            self.log.info("bot reconnected (reconnect %d)", self.reconnects)
        return replaced

    def detach_output(self, conn: Any, now: float) -> bool:
        """The output socket closed; True if the session is now without its bot."""
        if self.output is not conn:
            return False
        self.output = None
        self.core.detached(now)
        self.connection_changed()
        self.journal.append("connection", connection=connection_json(self.connections[-1]))
        return True

    # -- ingest -------------------------------------------------------------------------

    def receive_audio(self, samples: Samples, now: float) -> None:
        """Audio before the session started (no handshake yet): start at the default
        rate. Once started, this name is the core's own method."""
        self.start(self.settings.default_rate)
        self.core.receive_audio(samples, now)

    def roster(self, roster: Roster, now: float) -> None:
        self.core.roster(roster, now)

    def provider_event(self, event: ProviderEvent) -> None:
        """The vendor's own transcription (its v2 transcription mode) sent ``event``."""
        if not self.core.started:
            self.start(self.settings.default_rate)  # no audio comes in this mode
        if event.event == "transcript.segment":
            ring = self.core.ring
            self.post([ProviderSegment(ring.written if ring else 0, event.data)], roster=False)
        elif event.event == "session.started":
            provider = event.data.get("provider")
            self.provider = clip(provider) if isinstance(provider, str) else "unknown"
            self.metadata_file.update()
        elif event.event == "error":
            self.count_rejected("provider_error")
            self.log.warning("the bot's transcription provider reports %s", str(event.data)[:300])
        else:
            self.count_rejected("unknown_provider_event")

    def annotate(self, name: str, value: str | None) -> None:
        """A pipeline's note on the session (see :class:`gateway.pipeline.SessionContext`)."""
        name = clip(name, 64)
        if value is not None:
            value = clip(value, 256)
        if self.annotations.get(name) == value:
            return
        if value is None:
            del self.annotations[name]
        elif name in self.annotations or len(self.annotations) < MAX_ANNOTATIONS:
            self.annotations[name] = value
        else:
            return
        self.journal.append("annotation", name=name, value=value)

    def flush(self) -> None:
        """Finalize what was heard so far now (a client's ``Finalize``)."""
        self.core.flush()

    def flush_counts(self) -> None:
        self.core.flush_counts()

    def count_bytes(self, n: int) -> None:
        """Bytes received that did not become samples (a carried odd byte)."""
        self.core.totals.bytes += n

    def count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.metrics.rejected.labels(reason).inc()

    # -- the core's sink ------------------------------------------------------------------

    def post(self, events: Sequence[Any], *, roster: bool) -> None:
        """Hand events to the player and every pipeline; a roster message's changes go as
        one entry of the droppable roster queue, anything else to the control queue."""
        if self.player is not None:
            self.player.observe(events)  # barge-in first: it is the latency-critical reader
        for runner in self.runners:
            if roster:
                runner.post_batch(events[0].sample, tuple(events), roster=True)
            else:
                for event in events:
                    # A pause goes with the audio that told it (the final it may bring needs it).
                    at = event.heard if isinstance(event, SpeechPaused) else event.sample
                    runner.post(at, event)

    def poke(self) -> None:
        for runner in self.runners:
            runner.poke()

    def tick(self, now: float) -> None:
        if now >= self._metadata_due:
            # Meetings that start together (a fleet's on the hour) would otherwise rewrite
            # their files in one burst every interval, and hold up every meeting's audio
            # on the loop while they are encoded: 200 at once took about 40 ms.
            later = 1.0 + self.core.phase if self._metadata_due == 0.0 else 1.0
            self._metadata_due = now + later * METADATA_INTERVAL
            self.metadata_file.update()

    def persist(self, kind: str, fields: dict[str, Any]) -> None:
        self.journal.append(kind, **fields)

    # -- end ----------------------------------------------------------------------------

    async def finalize(self) -> None:
        """Drain and stop every pipeline, then write the final metadata."""
        if self.ended_at is not None:
            return
        now = time.time()
        await self._stop_pipelines(now)
        self.ended_at = now
        self.journal.append("ended", wall=now)
        self.journal.close()
        if self.core.started:
            await self.metadata_file.flush()
        self.log.info(
            "session ended: %.1f s of audio, %d reconnects, %d gaps",
            self.audio_seconds,
            self.reconnects,
            len(self.gaps),
        )

    async def suspend(self) -> None:
        """The gateway is stopping with the meeting still on: stop the pipelines (they
        keep their files for the next process), note where the audio stands."""
        if self.ended_at is not None:
            return
        self.suspending = True
        now = time.time()
        await self._stop_pipelines(now)
        self.journal.append("suspended", wall=now)
        self.journal.close()
        if self.core.started:
            await self.metadata_file.flush()
        self.log.info("session suspended at %.1f s of audio", self.audio_seconds)

    async def _stop_pipelines(self, now: float) -> None:
        if self.player is not None:
            await self.player.close()
        self.core.end(now)
        await asyncio.gather(*(r.close() for r in self.runners))

    def write_metadata(self) -> None:
        """Bring ``session.json`` up to date soon (off the loop; see :class:`MetadataFile`)."""
        self.metadata_file.update()
