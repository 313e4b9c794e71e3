"""The terminal views: ``meeting-gateway watch [KEY]`` and ``meeting-gateway sessions``.

``watch`` follows one session's live transcript (``/bots/{key}/transcripts``) or every
session's (``/transcripts``): finals become lines (``12:03  Alice  Hello there.``), the
partial still forming is rewritten in place under them, each speaker in a colour of
their own. Written to a pipe or a file, or with ``NO_COLOR`` set, it prints finals only
and no escape codes, so ``watch KEY > meeting.txt`` is a plain transcript. When the
gateway restarts with the meeting on (close code 1012) or its connection is lost (1006: the
gateway was killed), it reconnects and goes on without printing a final twice.

``sessions`` prints ``GET /sessions`` as a table.

:class:`Renderer` turns messages into text and is sans-I/O (tested without a terminal).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, TextIO
from urllib.parse import quote, urlsplit

#: The close codes after which ``watch`` reconnects (a gateway restarting with the meeting
#: on; a connection lost, as when the gateway is killed), and for how long it tries, seconds.
RESTART = 1012
LOST = 1006
RESTART_WAIT = 120.0
#: ANSI colours for speakers (no red: it reads as an error).
COLOURS = (32, 33, 34, 35, 36, 92, 93, 94, 95, 96)
CLEAR_LINE = "\r\x1b[2K"


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes:02d}:{rest:02d}"


class Renderer:
    """Live transcript messages in, text for a terminal out."""

    def __init__(self, *, live: bool, colour: bool, sessions: bool) -> None:
        self.live = live
        """Rewrite partials in place (a terminal); otherwise print finals only."""
        self.colour = colour
        self.sessions = sessions
        """Prefix each line with its session (watching every session)."""
        self._partial = False
        # Where the last final printed ends, per session: its key and its ``request_id``
        # (a new session under the same key starts its clock at 0 again).
        self._printed: dict[tuple[str, str], float] = {}
        self._skip: dict[tuple[str, str], float] = {}

    def reconnected(self) -> None:
        """A new connection replays each session's finals from its first: the ones
        printed already (ending where the last one printed ends, or before) are not
        printed again. By time, not by count: after a kill the replay may lack the
        last finals the killed process sent. Per session run: a session that starts again
        under the same key (another ``request_id``) is printed from its first final."""
        self._skip = dict(self._printed)

    def _speaker(self, name: str) -> str:
        if not self.colour:
            return name
        code = COLOURS[zlib.crc32(name.encode()) % len(COLOURS)]
        return f"\x1b[1;{code}m{name}\x1b[0m"

    def _line(self, message: Mapping[str, Any]) -> str:
        alternative = message["channel"]["alternatives"][0]
        text = alternative.get("transcript") or " ".join(
            w.get("punctuated_word") or w["word"] for w in alternative.get("words", ())
        )
        name = message.get("speaker_name") or "Unknown"
        where = f"{message.get('session', '')}  " if self.sessions else ""
        return f"{where}{_clock(float(message.get('start', 0.0)))}  {self._speaker(name)}  {text}"

    def feed(self, message: Mapping[str, Any]) -> str:
        """What to write for one message (may be empty)."""
        if message.get("type") != "Results":
            return ""
        alternative = message["channel"]["alternatives"][0]
        if not alternative.get("words"):
            return ""
        erase = CLEAR_LINE if self._partial else ""
        if message.get("is_final"):
            meta = message.get("metadata") or {}
            session = (str(message.get("session", "")), str(meta.get("request_id", "")))
            end = float(message.get("start", 0.0)) + float(message.get("duration", 0.0))
            if end <= self._skip.get(session, -1.0) + 1e-3:
                return ""
            self._skip.pop(session, None)  # the replay is over: the rest is new
            self._printed[session] = end
            self._partial = False
            return f"{erase}{self._line(message)}\n"
        if not self.live:
            return ""
        self._partial = True
        line = self._line(message)
        dim = f"\x1b[2m{line}\x1b[0m" if self.colour else line
        return f"{erase}{dim}"


def transcripts_url(base: str, key: str | None, token: str | None) -> str:
    """The subscriber URL for ``key`` (every session when None) on gateway ``base``."""
    parts = urlsplit(base)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme or "ws")
    path = f"/bots/{quote(key, safe='')}/transcripts" if key else "/transcripts"
    query = f"?token={quote(token, safe='')}" if token else ""
    return f"{scheme}://{parts.netloc}{path}{query}"


async def watch(url: str, out: TextIO = sys.stdout, *, sessions: bool) -> int:
    """Print the transcript stream at ``url`` until it ends; returns the exit code.

    Closed with 1012 (the gateway restarts with the meeting on) or 1006 (the connection
    lost), it reconnects, retrying for up to :data:`RESTART_WAIT` seconds, and goes on
    where it was."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake

    tty = out.isatty()
    renderer = Renderer(live=tty, colour=tty and not os.environ.get("NO_COLOR"), sessions=sessions)
    restarting: float | None = None
    while True:
        try:
            ws = await connect(url, max_size=None)
        except (OSError, InvalidHandshake, TimeoutError):
            if restarting is None or time.monotonic() - restarting > RESTART_WAIT:
                raise
            await asyncio.sleep(1.0)
            continue
        async with ws:
            try:
                async for message in ws:
                    text = renderer.feed(json.loads(message))
                    if text:
                        out.write(text)
                        out.flush()
            except ConnectionClosed:
                pass
        if ws.close_code in (RESTART, LOST):
            what = "is restarting" if ws.close_code == RESTART else "connection was lost"
            print(f"the gateway {what}: reconnecting", file=sys.stderr)
            restarting = time.monotonic()
            renderer.reconnected()
            await asyncio.sleep(1.0)
            continue
        if ws.close_code not in (1000, None):
            print(f"closed by the gateway: {ws.close_code} {ws.close_reason}", file=sys.stderr)
            return 1
        return 0


def sessions_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``GET /sessions`` as an aligned table."""
    header = ("KEY", "STATE", "RATE", "AUDIO", "SPEAKERS", "GAPS", "RECONNECTS")
    lines = [header] + [
        (
            str(r["key"]),
            str(r["state"]),
            str(r.get("sample_rate") or "-"),
            _clock(float(r.get("audio_seconds") or 0)),
            ", ".join(r.get("speakers") or ()) or "-",
            str(len(r.get("gaps") or ())),
            str(r.get("reconnects", 0)),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def fetch_sessions(base: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    parts = urlsplit(base)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    if scheme not in ("http", "https"):
        raise ValueError(f"not a gateway URL: {base!r}")
    with urllib.request.urlopen(f"{scheme}://{parts.netloc}/sessions", timeout=timeout) as r:
        rows: list[dict[str, Any]] = json.loads(r.read())
    return rows
