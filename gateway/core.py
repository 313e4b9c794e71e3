"""The session core: one meeting's ingest state machine, with no I/O in it.

Fed audio, rosters and connection changes, each with the wall time it happened at, it
keeps what a meeting is made of: the audio clock and its anchor, the ring of samples,
the VAD's cadence, the gaps where the bot was away, the speaker timeline, and the
counters. What it decides goes out through a :class:`Sink`, synchronously and in clock
order: events for the player and the pipelines, a nudge when a block of audio is ready,
a tick about once a second, and the records a journal must keep to resume the meeting
in another process (:mod:`gateway.storage.journal` folds them back).

It never reads a clock, a socket or a file, and never touches the event loop:
:class:`gateway.session.Session` is the asyncio shell that owns the connections,
pipelines and files around it, and the tests drive it directly with made-up times.

The audio hot path (:meth:`SessionCore.receive_audio`) does one copy into the ring and a
few integer updates; VAD, metrics and pipeline wake-ups run once per audio block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .audio.resample import Resampler
from .audio.ring import RingBuffer
from .audio.vad import VoiceActivity
from .config import Settings
from .ingest.clock import AudioClock
from .ingest.protocol import Roster
from .ingest.speakers import SpeakerTimeline, speaker_json
from .metrics import Metrics
from .pipeline import Disconnected, Gap
from .reports import GapRecord, gap_json

Samples = npt.NDArray[np.int16]
_NOTHING: Samples = np.zeros(0, dtype=np.int16)

#: VAD and pipeline bookkeeping run every this much audio. Shorter blocks detect speech
#: sooner (barge-in) but pay soxr's and Python's per-call cost more often.
BLOCK_MS = 100
#: A ``position`` record is kept at most this often while audio arrives, seconds.
POSITION_INTERVAL = 2.0


class Sink(Protocol):
    """Where the core's decisions go (the session shell, or a test's recorder)."""

    def post(self, events: Sequence[Any], *, roster: bool) -> None:
        """Events for the player and every pipeline, in clock order. ``roster``: the
        changes of one roster message (droppable as one entry)."""

    def poke(self) -> None:
        """A block of audio is in the ring."""

    def tick(self, now: float) -> None:
        """About once a second of audio: time for periodic work."""

    def persist(self, kind: str, fields: dict[str, Any]) -> None:
        """A journal record (see :mod:`gateway.storage.journal`)."""


@dataclass(slots=True)
class Counts:
    bytes: int = 0
    frames: int = 0
    samples: int = 0


class SessionCore:
    def __init__(
        self, settings: Settings, metrics: Metrics, sink: Sink, log: Any, phase: float = 0.0
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.sink = sink
        self.log = log
        #: Where in each second of audio this session's once-a-second work falls, in
        #: [0, 1) (:func:`gateway.keys.phase`): sessions whose audio started together
        #: then do it, and observe their ingest lag, at moments spread over the second,
        #: not all in the same loop iteration.
        self.phase = phase
        self.rate = 0
        self.clock = AudioClock(settings.default_rate)
        self.speakers = SpeakerTimeline(
            self.clock, settings.bot_name, max_speakers=settings.max_speakers
        )
        self.ring: RingBuffer | None = None
        self.vad: VoiceActivity | None = None
        self.gaps: list[GapRecord] = []
        self.reconnects = 0
        self.totals = Counts()
        self._unflushed = Counts()
        self._vad_pos = 0
        self._block = 0
        self._away_since: float | None = None
        self._converter: Resampler | None = None  # this connection's rate to the session's
        self._positioned = 0.0  # wall time of the last position record
        self._tick_at = 0  # ring position of the next once-a-second work
        self._connection_start = -1  # where a reconnect's audio began (-1: not one)

    @property
    def started(self) -> bool:
        return self.ring is not None

    @property
    def away(self) -> bool:
        return self._away_since is not None

    @property
    def audio_seconds(self) -> float:
        return self.ring.written / self.rate if self.ring is not None else 0.0

    # -- lifecycle --------------------------------------------------------------------

    def start(self, rate: int, position: int = 0) -> None:
        """Fix the rate; ``position`` is where the clock stands (a resumed session)."""
        if self.ring is not None:
            return
        self.rate = self.clock.rate = rate
        self.ring = RingBuffer(max(1, int(self.settings.ring_seconds * rate)))
        self.ring.advance(position)
        self._vad_pos = position
        self._tick_at = position + int(self.phase * rate)
        self.vad = VoiceActivity.configured(rate, self.settings)
        self._block = rate * BLOCK_MS // 1000

    def resume(self, origin: float | None, gaps: list[GapRecord], away_since: float) -> None:
        """Take back a clock anchor and gaps an earlier process kept; the bot is away."""
        self.clock.origin = origin
        self.gaps = list(gaps)
        self._away_since = away_since

    def connection_rate(self, rate: int) -> bool:
        """The bot's connection says it sends ``rate``. The session keeps its own rate
        (one recording, one clock): other rates are resampled to it. True if it changed."""
        current = self._converter.in_rate if self._converter is not None else self.rate
        if self.ring is None or rate == current or self.ring.written != self._connection_start:
            return False  # the first connection, or this one's audio already came
        self._converter = None if rate == self.rate else Resampler(rate, self.rate)
        self.metrics.rate_changes.inc()
        return True

    def attached(self, replacing: bool) -> bool:
        """A bot's output socket connected; True if that resumes the meeting."""
        self._connection_start = -1
        if self._away_since is None and not replacing:
            return False
        if self.ring is not None:
            self._connection_start = self.ring.written
        self.reconnects += 1
        self.metrics.resumes.inc()
        self.sink.persist("reconnect", {"reconnects": self.reconnects})
        return True

    def detached(self, now: float) -> None:
        """The bot's output socket closed at ``now``: finish what was heard."""
        ring = self.ring
        if self._converter is not None and ring is not None:
            ring.write(self._converter.process(_NOTHING, last=True))  # the filter's tail
        self._converter = None  # per connection: a reconnect says its rate again
        self.flush_counts()
        self._away_since = now
        if ring is not None and self.vad is not None:
            self._process_block()
            self._post(self.vad.interrupt(ring.written))
            self._post([Disconnected(ring.written)])
            self._position(now)

    def flush(self) -> None:
        """Finish what was heard so far now (a client asked): the speech open at this
        point ends, and pipelines finalize it as at a dropped connection."""
        ring = self.ring
        if ring is not None and self.vad is not None:
            self._process_block()
            self._post(self.vad.interrupt(ring.written))
            self._post([Disconnected(ring.written)])

    def end(self, now: float) -> None:
        """The session stops (ended or suspended): close open speech and speakers, at the
        end of the audio rather than at ``now``."""
        ring = self.ring
        if ring is not None and self.vad is not None:
            self._process_block()
            self._post(self.vad.interrupt(ring.written))
        end = self.clock.wall(ring.written) if ring is not None else None
        # Rosters are placed with the audio (see SpeakerTimeline), even audio sent faster
        # than real time, whose end is later than ``now``.
        self._post(self.speakers.close(end if end is not None else now))
        self.flush_counts()
        if ring is not None:
            self._position(now)

    # -- ingest -------------------------------------------------------------------------

    def receive_audio(self, samples: Samples, now: float) -> None:
        """Hot path: one copy into the ring, counters, and a block check. Call
        :meth:`start` first."""
        if self._converter is not None:
            samples = self._converter.process(samples)
        ring = self.ring
        assert ring is not None
        if self._away_since is not None:
            self._close_gap(now, len(samples))
        elif self.clock.origin is None:
            self._start_clock(now, len(samples))
        ring.write(samples)
        c = self._unflushed
        c.samples += len(samples)
        c.frames += 1
        if ring.written - self._vad_pos >= self._block:
            self._process_block()
            if ring.written >= self._tick_at:
                self._tick_at += self.rate
                if self._tick_at <= ring.written:  # the clock jumped (a gap filled)
                    self._tick_at = ring.written + self.rate
                # About once a second: metrics cost a lock each. The lag is how far
                # behind real time the newest sample landed in the ring (the bot sends
                # in real time, so this is transport and scheduling delay).
                wall = self.clock.wall(ring.written)
                if wall is not None:
                    self.metrics.ingest_lag.observe(max(0.0, now - wall))
                self.flush_counts()
                if now - self._positioned >= POSITION_INTERVAL:
                    self._position(now)
                self.sink.tick(now)

    def _position(self, now: float) -> None:
        assert self.ring is not None
        self.sink.persist("position", {"samples": self.ring.written, "wall": now})
        self._positioned = now

    def _start_clock(self, now: float, samples: int) -> None:
        self.clock.start(now, samples)
        self.sink.persist("clock", {"origin": self.clock.origin})

    def _close_gap(self, now: float, arriving: int) -> None:
        ring, vad = self.ring, self.vad
        assert ring is not None and vad is not None
        away_since, self._away_since = self._away_since, None
        if self.clock.origin is None:
            self._start_clock(now, arriving)
            return
        # Where the clock says this audio belongs, by the wall clock, versus where the
        # ring is: the difference is meeting time the bot did not send.
        missing = self.clock.at_wall(now) - arriving - ring.written
        if missing <= 0:
            return
        at = ring.written
        self._process_block()
        self._post(vad.interrupt(at + missing))
        self._post([Gap(at, missing, "disconnected")])
        ring.advance(missing)
        self._vad_pos = ring.written
        seconds = missing / self.rate
        self.gaps.append(GapRecord(at, seconds, away_since or now, now))
        self.sink.persist("gap", {"gap": gap_json(self.gaps[-1], self.rate)})
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
                self._post(events)
        self.sink.poke()

    def flush_counts(self) -> None:
        c, t, m = self._unflushed, self.totals, self.metrics
        if c.frames:
            nbytes = 2 * c.samples
            m.frames.inc(c.frames)
            m.audio_bytes.inc(nbytes)
            m.audio_seconds.inc(c.samples / self.rate)
            t.frames += c.frames
            t.samples += c.samples
            t.bytes += nbytes
            c.frames = c.samples = 0
        if self.vad is not None and self.vad.speech_samples:
            m.speech_seconds.inc(self.vad.speech_samples / self.rate)
            self.vad.speech_samples = 0

    def roster(self, roster: Roster, now: float) -> None:
        forgotten = self.speakers.forgotten
        heard = self.clock.wall(self.ring.written) if self.ring is not None else None
        changes = tuple(self.speakers.update(roster, now, heard))
        if self.speakers.forgotten != forgotten:
            self.metrics.speakers_forgotten.inc(self.speakers.forgotten - forgotten)
        for speaker in self.speakers.take_learnt():
            self.sink.persist("speaker", {"speaker": speaker_json(speaker)})
        if changes:
            self.sink.post(changes, roster=True)

    def _post(self, events: Sequence[Any]) -> None:
        if events:
            self.sink.post(events, roster=False)
