"""Sessions: one per meeting, surviving the bot's connections.

A session is keyed by the URL key (``/bots/{key}``), else by the handshake's ``bot_id``.
The bot reconnects with backoff (1 s doubling to 60 s) after any drop; each reconnect
resumes the same session, and the time the bot was away becomes a gap on the audio
clock. A session whose bot has not come back within ``linger`` seconds is finalized:
its pipelines drain and stop, and ``session.json`` is written.

The audio hot path (:meth:`Session.receive_audio`) does one copy into the ring and a
few integer updates; VAD, metrics and pipeline wake-ups run once per audio block.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from pipelines.base import Disconnected, Gap, PipelineFactory
from pipelines.speech import resample, tts

from .audio.ring import RingBuffer
from .audio.vad import VoiceActivity
from .clock import AudioClock
from .config import Settings
from .metrics import Metrics
from .playback import Player
from .protocol import Handshake, Roster
from .runner import PipelineRunner
from .speakers import Speaker, SpeakerChange, SpeakerTimeline

Samples = npt.NDArray[np.int16]

logger = logging.getLogger("gateway.session")

#: Keys as they appear in URLs and directory names: a safe alphabet, 128 at most.
_KEY_OK = re.compile(r"^[A-Za-z0-9~][A-Za-z0-9._~-]{0,127}$")
#: A bot_id in this form is its own key. Anything else is encoded behind a ``~``, which
#: such a bot_id never contains, so two different bot_ids never share a key.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Longest bot_id kept in metadata and logs; the key still comes from the whole id.
MAX_BOT_ID = 256

#: VAD and pipeline bookkeeping run every this much audio. Shorter blocks detect speech
#: sooner (barge-in) but pay soxr's and Python's per-call cost more often.
BLOCK_MS = 100


def valid_key(key: str) -> bool:
    """A key from a URL is used as a directory name: accept only a safe alphabet."""
    return bool(_KEY_OK.match(key))


def key_from_bot_id(bot_id: str) -> str:
    """A key for ``bot_id`` (which arrives from the network): distinct ids, distinct keys.

    A bot_id of letters, digits, ``.``, ``_`` and ``-`` (every real one: a UUID) is used
    as it is. Any other is encoded, never stripped: ``~`` and the base32 of its UTF-8,
    or, past 128 characters, ``~~`` and 40 hex digits of its SHA-256.
    """
    if _PLAIN_ID.match(bot_id):
        return bot_id
    raw = bot_id.encode("utf-8", "surrogatepass")
    encoded = base64.b32encode(raw).decode().rstrip("=").lower()
    if len(encoded) < 128:
        return "~" + encoded
    return "~~" + hashlib.sha256(raw).hexdigest()[:40]


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut for a log line or a metadata field, marked where it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session key."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '-'}] {msg}", kwargs


@dataclass(slots=True)
class ConnectionRecord:
    role: str
    remote: str
    connected_at: float
    closed_at: float | None = None
    close_code: int | None = None


@dataclass(slots=True)
class GapRecord:
    sample: int
    seconds: float
    wall_start: float
    wall_end: float


@dataclass(slots=True)
class _Counts:
    bytes: int = 0
    frames: int = 0
    samples: int = 0


@dataclass
class Session:
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
        self._total = _Counts()
        self._unflushed = _Counts()
        self._vad_pos = 0
        self._block = 0
        self._started = False

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

    def start(self, rate: int) -> None:
        """Fix the session's rate and start its pipelines (on handshake or first audio)."""
        if self._started:
            return
        self._started = True
        self.sample_rate = rate
        self.clock.rate = rate
        s = self.settings
        self.ring = RingBuffer(max(1, int(s.ring_seconds * rate)))
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
        for name in self._pipeline_names():
            pipeline = self.factories[name].create(self)
            runner = PipelineRunner(
                name, pipeline, self, self.ring, self.metrics, s.pipeline_queue, self.log
            )
            self.runners.append(runner)
            runner.start()
        self.write_metadata()
        self.log.info(
            "session started at %d Hz with pipelines %s",
            rate,
            ",".join(r.name for r in self.runners) or "none",
        )

    def _pipeline_names(self) -> list[str]:
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
        self.bot_id = bot_id
        self.protocol_version = hs.protocol_version
        self.start(hs.sample_rate or url_rate or self.settings.default_rate)

    def attach_output(self, conn: Any, record: ConnectionRecord) -> Any:
        """A bot's output socket connected; returns the connection it replaces, if any."""
        replaced, self.output = self.output, conn
        self.connections.append(record)
        self.connection_changed()
        if self._away_since is not None or replaced is not None:
            self.reconnects += 1
            self.metrics.resumes.inc()
            self.log.info("bot reconnected (reconnect %d)", self.reconnects)
        return replaced

    def detach_output(self, conn: Any, now: float) -> bool:
        """The output socket closed; True if the session is now without its bot."""
        if self.output is not conn:
            return False
        self.output = None
        self.flush_counts()
        self._away_since = now
        self.connection_changed()
        if self.vad is not None and self.ring is not None:
            self._process_block()
            self._post_all(self.vad.interrupt(self.ring.written))
            self._post_all([Disconnected(self.ring.written)])
        return True

    # -- ingest -------------------------------------------------------------------------

    def receive_audio(self, samples: Samples, now: float) -> None:
        """Hot path: one copy into the ring, counters, and a block check."""
        ring = self.ring
        if ring is None:
            self.start(self.settings.default_rate)
            ring = self.ring
            assert ring is not None
        if self._away_since is not None:
            self._close_gap(now, len(samples))
        elif not self.clock.started:
            self.clock.start(now, len(samples))
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

    def _close_gap(self, now: float, arriving: int) -> None:
        assert self.ring is not None and self.vad is not None
        away_since, self._away_since = self._away_since, None
        if not self.clock.started:
            self.clock.start(now, arriving)
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
        c, t, m = self._unflushed, self._total, self.metrics
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
        self._total.bytes += n

    def roster(self, roster: Roster, now: float) -> None:
        forgotten = self.speakers.forgotten
        changes = tuple(self.speakers.update(roster, now))
        if self.speakers.forgotten != forgotten:
            self.metrics.speakers_forgotten.inc(self.speakers.forgotten - forgotten)
        if not changes:
            return
        if self.player is not None:
            self.player.observe(changes)
        for runner in self.runners:
            runner.post_batch(changes[0].sample, changes, roster=True)

    def count_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        self.metrics.rejected.labels(reason).inc()

    def _post_all(self, events: list[Any]) -> None:
        if self.player is not None and events:
            self.player.observe(events)  # barge-in first: it is the latency-critical reader
        for event in events:
            for runner in self.runners:
                runner.post(event.sample, event)

    # -- speech -------------------------------------------------------------------------

    def speak(self, samples: Samples, rate: int) -> str:
        """Queue int16 mono ``samples`` at ``rate`` for the meeting; returns the utterance id.

        Raises :class:`~gateway.playback.PlaybackFull` when too much is queued and
        ``RuntimeError`` before the session has a rate (pipelines never see that).
        """
        return self._player().enqueue(resample(samples, rate, self.sample_rate), "pipeline")

    def say(self, text: str, kind: str = "say") -> str:
        """Queue ``text`` as speech (synthesized sentence by sentence while it plays)."""
        return self._player().enqueue(tts(text, self.sample_rate), kind, text)

    def _player(self) -> Player:
        if self.player is None:
            raise RuntimeError("the session has no sample rate yet")
        return self.player

    def playback_target(self) -> Any:
        """Where speech goes: the separate input socket once the bot opened one, else the
        output (dual) socket. A bot with a separate input never plays the output socket.
        """
        if self.input is not None or any(c.role == "input" for c in self.connections):
            return self.input
        return self.output

    def connection_changed(self) -> None:
        """An output or input socket attached or detached: the player may go on."""
        if self.player is not None:
            self.player.connection_changed()

    def _bot_speaking(self, speaking: bool, wall: float) -> None:
        # The timeline only knows what rosters say; the gateway knows exactly when the bot
        # plays what it sent, so pipelines hear it as a bot speaker change.
        name = self.settings.bot_name or "bot"
        bot = self.speakers.bot or Speaker("gateway:voice", None, name, True)
        event = SpeakerChange(self.clock.at_wall(wall), wall, bot, speaking)
        for runner in self.runners:
            runner.post(event.sample, event)

    # -- end ----------------------------------------------------------------------------

    async def finalize(self) -> None:
        """Drain and stop every pipeline, then write the final metadata."""
        if self.ended_at is not None:
            return
        now = time.time()
        if self.ring is not None and self.vad is not None:
            self._process_block()
            self._post_all(self.vad.interrupt(self.ring.written))
        if self.player is not None:
            await self.player.close()
        self._post_all(self.speakers.close(now))
        await asyncio.gather(*(r.close() for r in self.runners))
        self.flush_counts()
        self.ended_at = now
        if self._started:
            self.write_metadata()
        self.log.info(
            "session ended: %.1f s of audio, %d reconnects, %d gaps",
            self.audio_seconds,
            self.reconnects,
            len(self.gaps),
        )

    # -- views ----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """What ``GET /sessions`` shows."""
        return {
            "key": self.key,
            "bot_id": self.bot_id,
            "state": self.state,
            "sample_rate": self.sample_rate or None,
            "connected": self.output is not None,
            "input_connected": self.input is not None,
            "audio_seconds": round(self.audio_seconds, 3),
            "speakers": [s.name for s in self.speakers.speakers],
            "gaps": [
                {"at": round(g.sample / self.sample_rate, 3), "seconds": round(g.seconds, 3)}
                for g in self.gaps
            ],
            "reconnects": self.reconnects,
            "pipelines": {r.name: ("failed" if r.failed else "running") for r in self.runners},
        }

    def metadata(self) -> dict[str, Any]:
        t = self._total
        return {
            "key": self.key,
            "bot_id": self.bot_id,
            "sample_rate": self.sample_rate,
            "protocol_version": self.protocol_version,
            "created_at": self.created_at,
            "audio_started_at": self.clock.origin,
            "ended_at": self.ended_at,
            "audio_seconds": round(self.audio_seconds, 6),
            "bytes_received": t.bytes,
            "frames_received": t.frames,
            "reconnects": self.reconnects,
            "gaps": [
                {
                    "sample": g.sample,
                    "at": round(g.sample / self.sample_rate, 6),
                    "seconds": round(g.seconds, 6),
                    "wall_start": g.wall_start,
                    "wall_end": g.wall_end,
                }
                for g in self.gaps
            ],
            "connections": [
                {
                    "role": c.role,
                    "remote": c.remote,
                    "connected_at": c.connected_at,
                    "closed_at": c.closed_at,
                    "close_code": c.close_code,
                }
                for c in self.connections
            ],
            "speakers": [
                {"key": s.key, "id": s.id, "name": s.name, "is_bot": s.is_bot}
                for s in self.speakers.speakers
            ],
            "speakers_forgotten": self.speakers.forgotten,
            "roster_size": self.speakers.roster_size,
            "pipelines": {
                r.name: {"failed": r.failed, "dropped_events": r.dropped} for r in self.runners
            },
            "rejected": dict(self.rejected),
        }

    def write_metadata(self) -> None:
        """Write ``session.json`` atomically (a crash leaves the old or the new file).

        Never raises for the disk: a failed write removes its temporary file, keeps the
        previous ``session.json``, is counted (``gateway_disk_errors_total{what=
        "metadata"}``), logged once, holds ``/readyz`` back and is retried with a back-off
        (:func:`gateway.files.DiskWatch.retry_later`) with the metadata of that moment.
        """
        from .files import FileStatus, disk_watch, write_atomically

        watch = disk_watch(self.metrics.registry)
        status = FileStatus(watch, self.directory, "session.json", "metadata", self.log)
        try:
            write_atomically(status.path, (json.dumps(self.metadata(), indent=2) + "\n").encode())
        except OSError as exc:
            status.failed(exc, "the previous session.json is kept; retrying")
            if not watch.retry_later(status.path, self.write_metadata):
                self.log.error("giving up on session.json for now: %s", exc)
                status.forget()
            return
        watch.retry_done(status.path)
        status.recovered()
