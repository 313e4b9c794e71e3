"""What a session shows of itself: ``GET /sessions`` rows and ``session.json``, and the
records of its connections and gaps that go into them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
        "gaps": [
            {
                "sample": g.sample,
                "at": round(g.sample / session.sample_rate, 6),
                "seconds": round(g.seconds, 6),
                "wall_start": g.wall_start,
                "wall_end": g.wall_end,
            }
            for g in session.gaps
        ],
        "connections": [
            {
                "role": c.role,
                "remote": c.remote,
                "connected_at": c.connected_at,
                "closed_at": c.closed_at,
                "close_code": c.close_code,
            }
            for c in session.connections
        ],
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
    }
