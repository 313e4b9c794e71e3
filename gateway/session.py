"""Sessions: one per meeting, surviving the bot's connections.

A session is keyed by the URL key (``/bots/{key}``), else by the handshake's ``bot_id``.
The bot reconnects with backoff (1 s doubling to 60 s) after any drop; each reconnect
resumes the same session, and the time the bot was away becomes a gap on the audio
clock. A session whose bot has not come back within ``linger`` seconds is finalized:
its pipelines drain and stop, and ``session.json`` is written. What it needs to outlive
the process is appended to its journal as it happens (:mod:`gateway.journal`).

The audio hot path (:meth:`Session.receive_audio`) does one copy into the ring and a
few integer updates; VAD, metrics and pipeline wake-ups run once per audio block.
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

from . import journal, reports
from .audio.resample import Resampler
from .audio.ring import RingBuffer
from .audio.vad import VoiceActivity
from .clock import AudioClock
from .config import Settings
from .files import disk_watch
from .keys import MAX_BOT_ID, clip
from .logs import SessionLog
from .metrics import Metrics
from .pipeline import Disconnected, Gap, PipelineFactory
from .playback import Player
from .protocol import Handshake, Roster
from .reports import ConnectionRecord, GapRecord, MetadataFile, connection_json, gap_json
from .runner import PipelineRunner
from .speakers import SpeakerTimeline, speaker_json
from .speech_out import SpeechOut

Samples = npt.NDArray[np.int16]
_NOTHING: Samples = np.zeros(0, dtype=np.int16)

logger = logging.getLogger("gateway.session")

#: VAD and pipeline bookkeeping run every this much audio. Shorter blocks detect speech
#: sooner (barge-in) but pay soxr's and Python's per-call cost more often.
BLOCK_MS = 100
#: ``session.json`` is rewritten (off the loop) at most this often while audio arrives.
METADATA_INTERVAL = 5.0


@dataclass(slots=True)
class _Counts:
    bytes: int = 0
    frames: int = 0
    samples: int = 0


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
        self.sample_rate = 0
        self.clock = AudioClock(self.settings.default_rate)
        self.speakers = SpeakerTimeline(
            self.clock, self.settings.bot_name, max_speakers=self.settings.max_speakers
        )
        self.ring: RingBuffer | None = None
        self.vad: VoiceActivity | None = None
        self.runners: list[PipelineRunner] = []
        self.connections: list[ConnectionRecord] = []
        self.gaps: list[GapRecord] = []
        self.rejected: dict[str, int] = {}
        self.handler_errors: set[str] = set()  # stages that failed, logged once each
        self.reconnects = 0
        self.ended_at: float | None = None
        self.output: Any = None  # the live output connection, if any
        self.input: Any = None  # the live separate input connection, if any
        self.player: Player | None = None
        self._away_since: float | None = None
        self._converter: Resampler | None = None  # this connection's rate to the session's
        self.totals = _Counts()
        self._unflushed = _Counts()
        self._vad_pos = 0
        self._block = 0
        self._started = False
        self.suspending = False  # stopping with the meeting on: a new process resumes it
        failed = disk_watch(self.metrics.registry).metrics.errors.labels("journal").inc
        self.journal = journal.Journal(self.directory / journal.NAME, failed)
        self.metadata_file = MetadataFile(self)
        self._metadata_at = 0.0

    # -- SessionContext -------------------------------------------------------------

    @property
    def state(self) -> str:
        if self.ended_at is not None:
            return "ended"
        if self.output is None:
            return "lingering" if self._started else "waiting"
        return "live" if self.clock.started else "waiting"

    @property
    def audio_seconds(self) -> float:
        return self.ring.written / self.sample_rate if self.ring is not None else 0.0

    # -- lifecycle --------------------------------------------------------------------

    def start(self, rate: int, position: int = 0) -> None:
        """Fix the session's rate and start its pipelines (on handshake or first audio).

        ``position``: where the clock stands (a session resumed by a new process).
        """
        if self._started:
            return
        self._started = True
        self.sample_rate = rate
        self.clock.rate = rate
        s = self.settings
        self.ring = RingBuffer(max(1, int(s.ring_seconds * rate)))
        self.ring.advance(position)
        self._vad_pos = position
        self.vad = VoiceActivity.configured(rate, s)
        self._block = rate * BLOCK_MS // 1000
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
                name, pipeline, self, self.ring, self.metrics, s.pipeline_queue, self.log
            )
            self.runners.append(runner)
            runner.start()
        self._journal_session()
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
        changed = (bot_id, hs.protocol_version) != (self.bot_id, self.protocol_version)
        self.bot_id = bot_id
        self.protocol_version = hs.protocol_version
        if self._started and changed:
            self._journal_session()
        rate = hs.sample_rate or url_rate
        if self._started and rate is not None:
            self._connection_rate(rate)
        self.start(rate or self.settings.default_rate)

    def _connection_rate(self, rate: int) -> None:
        """A reconnect says it sends ``rate``: the session keeps its own rate (one
        recording, one clock) and this connection's audio is resampled to it."""
        current = self._converter.in_rate if self._converter is not None else self.sample_rate
        if rate == current:
            return
        self._converter = None if rate == self.sample_rate else Resampler(rate, self.sample_rate)
        self.metrics.rate_changes.inc()
        self.log.warning(
            "bot reconnected at %d Hz; its audio is resampled to the session's %d Hz",
            rate,
            self.sample_rate,
        )

    def _journal_session(self) -> None:
        self.journal.append("session", **reports.identity(self))

    def away_since(self, wall: float) -> None:
        """The bot left at ``wall`` (a session resumed by a new process)."""
        self._away_since = wall

    def attach_output(self, conn: Any, record: ConnectionRecord) -> Any:
        """A bot's output socket connected; returns the connection it replaces, if any."""
        replaced, self.output = self.output, conn
        self.connections.append(record)
        self.connection_changed()
        if self._away_since is not None or replaced is not None:
            self.reconnects += 1
            self.metrics.resumes.inc()
            self.journal.append("reconnect", reconnects=self.reconnects)
            self.log.info("bot reconnected (reconnect %d)", self.reconnects)
        return replaced

    def detach_output(self, conn: Any, now: float) -> bool:
        """The output socket closed; True if the session is now without its bot."""
        if self.output is not conn:
            return False
        self.output = None
        if self._converter is not None and self.ring is not None:
            self.ring.write(self._converter.process(_NOTHING, last=True))  # the filter's tail
            self._converter = None  # per connection: a reconnect says its rate again
        self.flush_counts()
        self._away_since = now
        self.connection_changed()
        if self.vad is not None and self.ring is not None:
            self._process_block()
            self._post_all(self.vad.interrupt(self.ring.written))
            self._post_all([Disconnected(self.ring.written)])
            self.journal.position(self.ring.written, now)
        self.journal.append("connection", connection=connection_json(self.connections[-1]))
        return True

    # -- ingest -------------------------------------------------------------------------

    def receive_audio(self, samples: Samples, now: float) -> None:
        """Hot path: one copy into the ring, counters, and a block check."""
        if self._converter is not None:
            samples = self._converter.process(samples)
        ring = self.ring
        if ring is None:
            self.start(self.settings.default_rate)
            ring = self.ring
            assert ring is not None
        if self._away_since is not None:
            self._close_gap(now, len(samples))
        elif not self.clock.started:
            self._start_clock(now, len(samples))
        ring.write(samples)
        n = len(samples)
        c = self._unflushed
        c.samples += n
        c.frames += 1
        if ring.written - self._vad_pos >= self._block:
            self._process_block()
            if c.samples >= self.sample_rate:
                # About once a second: metrics cost a lock each. The lag is how far
                # behind real time the newest sample landed in the ring (the bot sends
                # in real time, so this is transport and scheduling delay).
                wall = self.clock.wall(ring.written)
                if wall is not None:
                    self.metrics.ingest_lag.observe(max(0.0, now - wall))
                self.flush_counts()
                if now - self.journal.last_position >= journal.POSITION_INTERVAL:
                    self.journal.position(ring.written, now)
                if now - self._metadata_at >= METADATA_INTERVAL:
                    self._metadata_at = now
                    self.metadata_file.update()

    def _start_clock(self, now: float, samples: int) -> None:
        self.clock.start(now, samples)
        self.journal.append("clock", origin=self.clock.origin)

    def _close_gap(self, now: float, arriving: int) -> None:
        assert self.ring is not None and self.vad is not None
        away_since, self._away_since = self._away_since, None
        if not self.clock.started:
            self._start_clock(now, arriving)
            return
        # Where the clock says this audio belongs, by the wall clock, versus where the
        # ring is: the difference is meeting time the bot did not send.
        expected = self.clock.at_wall(now) - arriving
        missing = expected - self.ring.written
        if missing <= 0:
            return
        at = self.ring.written
        self._process_block()
        self._post_all(self.vad.interrupt(at + missing))
        self._post_all([Gap(at, missing, "disconnected")])
        self.ring.advance(missing)
        self._vad_pos = self.ring.written
        seconds = missing / self.sample_rate
        self.gaps.append(GapRecord(at, seconds, away_since or now, now))
        self.journal.append("gap", gap=gap_json(self.gaps[-1], self.sample_rate))
        self.metrics.gap_seconds.inc(seconds)
        self.log.info("bot was away; %.2f s of silence inserted at %d", seconds, at)

    def _process_block(self) -> None:
        ring, vad = self.ring, self.vad
        assert ring is not None and vad is not None
        if ring.written > self._vad_pos:
            start = max(self._vad_pos, ring.oldest)
            events = []
            for view in ring.read(start, ring.written):
                events.extend(vad.feed(view))
            self._vad_pos = ring.written
            if events:
                self._post_all(events)
        for runner in self.runners:
            runner.poke()

    def flush_counts(self) -> None:
        c, t, m = self._unflushed, self.totals, self.metrics
        if c.frames:
            nbytes = 2 * c.samples
            m.frames.inc(c.frames)
            m.audio_bytes.inc(nbytes)
            m.audio_seconds.inc(c.samples / self.sample_rate)
            t.frames += c.frames
            t.samples += c.samples
            t.bytes += nbytes
            c.frames = c.samples = 0
        if self.vad is not None and self.vad.speech_samples:
            m.speech_seconds.inc(self.vad.speech_samples / self.sample_rate)
            self.vad.speech_samples = 0

    def count_bytes(self, n: int) -> None:
        """Bytes received that did not become samples (a carried odd byte)."""
        self.totals.bytes += n

    def roster(self, roster: Roster, now: float) -> None:
        forgotten = self.speakers.forgotten
        changes = tuple(self.speakers.update(roster, now))
        if self.speakers.forgotten != forgotten:
            self.metrics.speakers_forgotten.inc(self.speakers.forgotten - forgotten)
        for speaker in self.speakers.take_learnt():
            self.journal.append("speaker", speaker=speaker_json(speaker))
        self._post_all(changes, roster=True)

    def count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.metrics.rejected.labels(reason).inc()

    def _post_all(self, events: Sequence[Any], *, roster: bool = False) -> None:
        """Hand events to the player and every pipeline; a roster message's changes go as
        one entry of the droppable roster queue, anything else to the control queue."""
        if not events:
            return
        if self.player is not None:
            self.player.observe(events)  # barge-in first: it is the latency-critical reader
        for runner in self.runners:
            if roster:
                runner.post_batch(events[0].sample, tuple(events), roster=True)
            else:
                for event in events:
                    runner.post(event.sample, event)

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
        if self._started:
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
        if self.ring is not None:
            self.journal.position(self.ring.written, now)
        self.journal.append("suspended", wall=now)
        self.journal.close()
        if self._started:
            await self.metadata_file.flush()
        self.log.info("session suspended at %.1f s of audio", self.audio_seconds)

    async def _stop_pipelines(self, now: float) -> None:
        if self.ring is not None and self.vad is not None:
            self._process_block()
            self._post_all(self.vad.interrupt(self.ring.written))
        if self.player is not None:
            await self.player.close()
        # A speaker still marked speaking ends where the audio ends, not at this moment.
        end = self.clock.wall(self.ring.written) if self.ring is not None else None
        self._post_all(self.speakers.close(min(now, end) if end is not None else now))
        await asyncio.gather(*(r.close() for r in self.runners))
        self.flush_counts()

    def write_metadata(self) -> None:
        """Bring ``session.json`` up to date soon (off the loop; see :class:`MetadataFile`)."""
        self.metadata_file.update()
