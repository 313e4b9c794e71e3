"""What a session shows of itself: ``GET /sessions`` rows and ``session.json``, and the
records of its connections and gaps that go into them."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .storage.files import FileStatus, disk_watch, write_atomically
from .storage.offload import blocking

if TYPE_CHECKING:
    from .session import Session


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


def connection_json(c: ConnectionRecord) -> dict[str, Any]:
    return asdict(c)


def gap_json(g: GapRecord, rate: int) -> dict[str, Any]:
    return {
        "sample": g.sample,
        "at": round(g.sample / rate, 6),
        "seconds": round(g.seconds, 6),
        "wall_start": g.wall_start,
        "wall_end": g.wall_end,
    }


def identity(session: Session) -> dict[str, Any]:
    """Who a session is: the journal's ``session`` line."""
    return {
        "key": session.key,
        "bot_id": session.bot_id,
        "rate": session.sample_rate,
        "protocol_version": session.protocol_version,
        "created_at": session.created_at,
        "params": dict(session.params),
    }


def summary(session: Session) -> dict[str, Any]:
    """What ``GET /sessions`` shows."""
    return {
        "key": session.key,
        "bot_id": session.bot_id,
        "state": session.state,
        "sample_rate": session.sample_rate or None,
        "connected": session.output is not None,
        "input_connected": session.input is not None,
        "audio_seconds": round(session.audio_seconds, 3),
        "speakers": [s.name for s in session.speakers.speakers],
        "gaps": [
            {"at": round(g.sample / session.sample_rate, 3), "seconds": round(g.seconds, 3)}
            for g in session.gaps
        ],
        "reconnects": session.reconnects,
        "pipelines": {r.name: ("failed" if r.failed else "running") for r in session.runners},
        "speaking": [s.name for s in session.speakers.speaking_now],
        "annotations": dict(session.annotations),
        "level_db": level_db(session),
    }


#: The audio level is measured over this much of the newest audio, seconds.
LEVEL_WINDOW = 0.1


def level_db(session: Session) -> float | None:
    """The newest audio's level, dBFS (RMS over :data:`LEVEL_WINDOW`), measured when asked:
    nothing on the ingest path. None before audio or while the bot is away."""
    ring = session.ring
    if ring is None or session.output is None or not ring.written:
        return None
    start = max(ring.oldest, ring.written - int(LEVEL_WINDOW * session.sample_rate))
    views = ring.read(start, ring.written)
    samples = np.concatenate(views).astype(np.float64) if views else np.zeros(0)
    if not len(samples):
        return None
    rms = float(np.sqrt(np.mean(np.square(samples)))) / 32768.0
    return round(20 * math.log10(max(rms, 1e-5)), 1)


def timeline(session: Session) -> dict[str, Any]:
    """Who spoke when: each speaker's intervals in session-clock seconds (an open one
    ends at the newest audio)."""
    origin = session.clock.origin
    now = session.audio_seconds

    def seconds(wall: float | None) -> float:
        if wall is None or origin is None:
            return round(now, 3)
        return round(max(0.0, wall - origin), 3)

    return {
        "audio_seconds": round(now, 3),
        "speakers": [
            {
                "name": s.name,
                "is_bot": s.is_bot,
                "intervals": [
                    [seconds(a), seconds(b)] for a, b in session.speakers.intervals(s.key)
                ],
            }
            for s in session.speakers.speakers
        ],
    }


def metadata(session: Session) -> dict[str, Any]:
    """What ``session.json`` holds (written while live and when the session ends)."""
    t = session.totals
    return {
        "key": session.key,
        "bot_id": session.bot_id,
        "sample_rate": session.sample_rate,
        "protocol_version": session.protocol_version,
        "created_at": session.created_at,
        "audio_started_at": session.clock.origin,
        "ended_at": session.ended_at,
        "audio_seconds": round(session.audio_seconds, 6),
        "bytes_received": t.bytes,
        "frames_received": t.frames,
        "reconnects": session.reconnects,
        "gaps": [gap_json(g, session.sample_rate) for g in session.gaps],
        "connections": [connection_json(c) for c in session.connections],
        "speakers": [
            {"key": s.key, "id": s.id, "name": s.name, "is_bot": s.is_bot}
            for s in session.speakers.speakers
        ],
        "speakers_forgotten": session.speakers.forgotten,
        "roster_size": session.speakers.roster_size,
        "pipelines": {
            r.name: {"failed": r.failed, "dropped_events": r.dropped} for r in session.runners
        },
        "rejected": dict(session.rejected),
        "state": session.state,
        "start_time": session.start_time,
        "annotations": dict(session.annotations),
        "provider": session.provider,
        "parts": parts(session),
    }


def parts(session: Session) -> list[dict[str, Any]]:
    """Cluster mode: the directories the session's files are in, in order, one per run of
    a node without the data directory of the one before (see README, Cluster)."""
    out: list[dict[str, Any]] = []
    for p in session.parts:
        if out and out[-1]["directory"] == p["directory"] and out[-1]["node"] == p["node"]:
            continue
        rate = session.sample_rate or 1
        out.append({"node": p["node"], "directory": p["directory"], "from": p["sample"] / rate})
    return out


class MetadataFile:
    """``session.json``, replaced atomically and written off the event loop.

    :meth:`update` (from anywhere on the loop) writes the session as it is by then; while
    a write is in flight, updates fold into one more write after it, so a session never
    has two writes racing and the file always ends with the latest state. A write the
    disk refuses keeps the previous file, is counted
    (``gateway_disk_errors_total{what="metadata"}``), logged once, holds ``/readyz``
    back and is retried with a back-off (:meth:`gateway.storage.files.DiskWatch.retry_later`).
    """

    def __init__(self, session: Session) -> None:
        self._session = session
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def update(self) -> None:
        if self._task is not None and not self._task.done():
            self._again = True
            return
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def flush(self) -> None:
        """Write the session as it is now, and wait until that write is done."""
        self.update()
        while self._task is not None and not self._task.done():
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        session = self._session
        watch = disk_watch(session.metrics.registry)
        status = FileStatus(watch, session.directory, "session.json", "metadata", session.log)
        while True:
            self._again = False
            data = (json.dumps(metadata(session), indent=2) + "\n").encode()
            try:
                await blocking(write_atomically, status.path, data)
            except OSError as exc:
                status.failed(exc, "the previous session.json is kept; retrying")
                if not watch.retry_later(status.path, self.update):
                    session.log.error("giving up on session.json for now: %s", exc)
                    status.forget()
                return
            watch.retry_done(status.path)
            status.recovered()
            if not self._again:
                return
