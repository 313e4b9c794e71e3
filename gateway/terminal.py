"""The terminal views: ``meeting-gateway watch [KEY]`` and ``meeting-gateway sessions``.

``watch`` follows one session's live transcript (``/bots/{key}/transcripts``) or every
session's (``/transcripts``): a speaker's finals make a line (``12:03  Alice  Hello
there. How are you?``) that grows as they come, with the partial still forming after it,
each speaker in a colour of their own (none with ``NO_COLOR`` set). Written to a pipe or
a file, it prints finals only, each line once it ends, and no escape codes, so ``watch KEY
> meeting.txt`` is a plain transcript. When the
gateway restarts with the meeting on (close code 1012) or its connection is lost (1006: the
gateway was killed), it reconnects and goes on without printing a final twice.

``sessions`` prints ``GET /sessions`` as a table; ``files KEY [NAME]`` lists a session's
files or downloads one (in ``Range`` parts, as the gateway sends a big file).

:class:`Renderer` turns messages into text and is sans-I/O (tested without a terminal).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TextIO
from urllib.parse import quote, urlsplit

#: The close codes after which ``watch`` reconnects (a gateway restarting with the meeting
#: on; a connection lost, as when the gateway is killed), and for how long it tries, seconds.
RESTART = 1012
LOST = 1006
RESTART_WAIT = 120.0
#: ANSI colours for speakers (no red: it reads as an error).
COLOURS = (32, 33, 34, 35, 36, 92, 93, 94, 95, 96)
CLEAR_LINE = "\r\x1b[2K"
#: A line is ended after a sentence once it is this long, characters: a transcript reads
#: a paragraph per turn, and a pipe gets each line a sentence or so after it was said.
SENTENCE_LINE = 60
#: The most a line written to a pipe or a file takes, characters (a terminal: its width).
PIPE_WIDTH = 160
#: A partial is shown after the line when at least this many characters of it fit.
MIN_PARTIAL = 8


def _clock(seconds: float) -> str:
    minutes, rest = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{rest:02d}" if hours else f"{minutes:02d}:{rest:02d}"


@dataclass(slots=True)
class _Line:
    """A line being written: whose it is (session, speaker), its head (plain and as
    shown) and its text so far."""

    whose: tuple[str, str]
    head: tuple[str, str]
    text: str

    @property
    def length(self) -> int:
        return len(self.head[0]) + len(self.text)


class Renderer:
    """Live transcript messages in, text for a terminal out.

    Finals come a few words at a time (progressive finals): a speaker's run of them is
    one line, as on the live page, ended at the end of their speech (``speech_final``,
    ``UtteranceEnd``), at someone else's final, and after a sentence once the line
    is :data:`SENTENCE_LINE` characters long; in a terminal also before it would wrap,
    since only the last row can be rewritten. A terminal (``live``) sees the line grow
    with each final and the partial still forming after it, dimmed; it has one line at a
    time. Otherwise each session has a line of its own, written whole once it ends
    (:meth:`flush` ends them at the end of the stream)."""

    def __init__(
        self, *, live: bool, colour: bool, sessions: bool, width: int = PIPE_WIDTH
    ) -> None:
        self.live = live
        """Rewrite partials in place (a terminal); otherwise print finals only."""
        self.colour = colour
        self.sessions = sessions
        """Prefix each line with its session (watching every session)."""
        self.width = max(40, width)
        """Characters a line may take: a terminal's columns."""
        # Where the last final printed ends, per session: its key and its ``request_id``
        # (a new session under the same key starts its clock at 0 again).
        self._printed: dict[tuple[str, str], float] = {}
        self._skip: dict[tuple[str, str], float] = {}
        self._lines: dict[str, _Line] = {}  # the open lines, by session

    def reconnected(self) -> None:
        """A new connection replays each session's finals from its first: the ones
        printed already (ending where the last one printed ends, or before) are not
        printed again. By time, not by count: after a kill the replay may lack the
        last finals the killed process sent. Per session run: a session that starts again
        under the same key (another ``request_id``) is printed from its first final."""
        self._skip = dict(self._printed)

    def flush(self, session: str | None = None) -> str:
        """The open line of ``session`` (of every session: the stream ends), ended."""
        keys = list(self._lines) if session is None else [session]
        lines = [line for key in keys if (line := self._lines.pop(key, None)) is not None]
        clear = CLEAR_LINE if self.live else ""
        return "".join(f"{clear}{line.head[1]}{line.text}\n" for line in lines)

    def _speaker(self, name: str) -> str:
        if not self.colour:
            return name
        code = COLOURS[zlib.crc32(name.encode()) % len(COLOURS)]
        return f"\x1b[1;{code}m{name}\x1b[0m"

    def _line_head(self, message: Mapping[str, Any]) -> tuple[str, str]:
        """``12:03  Alice  `` (with the session first when watching all), plain and as shown."""
        name = message.get("speaker_name") or "Unknown"
        where = f"{message.get('session', '')}  " if self.sessions else ""
        clock = _clock(float(message.get("start", 0.0)))
        return f"{where}{clock}  {name}  ", f"{where}{clock}  {self._speaker(name)}  "

    @staticmethod
    def _words(message: Mapping[str, Any]) -> str:
        alternative = message["channel"]["alternatives"][0]
        return str(
            alternative.get("transcript")
            or " ".join(w.get("punctuated_word") or w["word"] for w in alternative.get("words", ()))
        )

    @staticmethod
    def _whose(message: Mapping[str, Any]) -> tuple[str, str]:
        return str(message.get("session", "")), str(message.get("speaker_name") or "Unknown")

    def feed(self, message: Mapping[str, Any]) -> str:
        """What to write for one message (may be empty)."""
        kind = message.get("type")
        if kind == "UtteranceEnd":
            return self.flush(str(message.get("session", "")))
        if kind != "Results" or not message["channel"]["alternatives"][0].get("words"):
            return ""
        if message.get("is_final"):
            return self._final(message)
        return self._partial(message) if self.live else ""

    def _final(self, message: Mapping[str, Any]) -> str:
        meta = message.get("metadata") or {}
        run = (str(message.get("session", "")), str(meta.get("request_id", "")))
        end = float(message.get("start", 0.0)) + float(message.get("duration", 0.0))
        if end <= self._skip.get(run, -1.0) + 1e-3:
            return ""
        self._skip.pop(run, None)  # the replay is over: the rest is new
        self._printed[run] = end
        text = self._words(message)
        whose = self._whose(message)
        session = whose[0]
        # A terminal rewrites one row: another session's line ends first.
        out = "".join(self.flush(key) for key in list(self._lines) if self.live and key != session)
        line = self._lines.get(session)
        if line is not None and (line.whose != whose or line.length + 1 + len(text) > self.width):
            out += self.flush(session)
            line = None
        if line is None:
            line = self._lines[session] = _Line(whose, self._line_head(message), text)
        else:
            line.text = f"{line.text} {text}"
        sentence = line.text.endswith((".", "?", "!")) and len(line.text) >= SENTENCE_LINE
        if message.get("speech_final") or line.length >= self.width or sentence:
            return out + self.flush(session)
        return f"{out}{CLEAR_LINE}{line.head[1]}{line.text}" if self.live else out

    def _partial(self, message: Mapping[str, Any]) -> str:
        """The row rewritten: the open line with the partial after it, dimmed, named
        when it is someone else's (their finals often come after the next speaker's
        first partial: the line stays open for them); with no line open, the partial on
        a row of its own."""
        line = next(iter(self._lines.values()), None)
        whose = self._whose(message)
        if line is None:
            plain, shown = self._line_head(message)
        elif line.whose == whose:
            plain, shown = f"{line.head[0]}{line.text} ", f"{line.head[1]}{line.text} "
        else:
            where = f"{whose[0]} " if self.sessions else ""
            plain = f"{line.head[0]}{line.text}  {where}{whose[1]}: "
            shown = f"{line.head[1]}{line.text}  {where}{self._speaker(whose[1])}: "
        text = self._words(message)
        room = self.width - len(plain) - 1
        if line is not None and room < MIN_PARTIAL:  # no room left on the row: the line alone
            return f"{CLEAR_LINE}{line.head[1]}{line.text}"
        if len(text) > room:  # its newest words, on the one row that can be rewritten
            text = "…" + text[len(text) - room + 1 :]
        dim = f"\x1b[2m{text}\x1b[0m" if self.colour else text
        return f"{CLEAR_LINE}{shown}{dim}"


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
    width = shutil.get_terminal_size().columns if tty else PIPE_WIDTH
    colour = tty and not os.environ.get("NO_COLOR")
    renderer = Renderer(live=tty, colour=colour, sessions=sessions, width=width)
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
        out.write(renderer.flush())
        out.flush()
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


def _request(
    base: str, path: str, token: str | None, headers: Mapping[str, str] | None = None
) -> urllib.request.Request:
    """A GET of ``path`` on the gateway at ``base`` (http(s) or ws(s)), bearing ``token``."""
    parts = urlsplit(base)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme or "http")
    if scheme not in ("http", "https"):
        raise ValueError(f"not a gateway URL: {base!r}")
    sent = {"Authorization": f"Bearer {token}"} if token else {}
    sent.update(headers or {})
    return urllib.request.Request(f"{scheme}://{parts.netloc}{path}", headers=sent)


def fetch_sessions(
    base: str, token: str | None = None, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """``GET /sessions``, with a read token when the gateway has a secret."""
    with urllib.request.urlopen(_request(base, "/sessions", token), timeout=timeout) as r:
        rows: list[dict[str, Any]] = json.loads(r.read())
    return rows


def fetch_files(
    base: str, key: str, token: str | None = None, timeout: float = 10.0
) -> list[dict[str, Any]]:
    """``GET /sessions/{key}/files``: the files of the key's newest meeting."""
    path = f"/sessions/{quote(key, safe='')}/files"
    with urllib.request.urlopen(_request(base, path, token), timeout=timeout) as r:
        rows: list[dict[str, Any]] = json.loads(r.read())
    return rows


def files_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """``GET /sessions/{key}/files`` as a table: name, bytes, when last written (UTC)."""
    lines = [("NAME", "BYTES", "MODIFIED")] + [
        (
            str(r["name"]),
            str(r["bytes"]),
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(r["modified"]))),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(3)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def download(
    base: str, key: str, name: str, out: BinaryIO, token: str | None = None, timeout: float = 30.0
) -> int:
    """One of a session's files into ``out``, in the parts the gateway answers ``Range``
    requests with (an answer carries at most 16 MiB), as the file was when the first part
    came (a live recording grows). Returns the bytes written."""
    path = f"/sessions/{quote(key, safe='')}/files/{quote(name, safe='')}"
    start, total = 0, None
    while total is None or start < total:
        request = _request(base, path, token, {"Range": f"bytes={start}-"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as r:
                body = r.read()
                span = r.headers.get("Content-Range") if r.status == 206 else None
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and start == 0:
                return 0  # an empty file: there is no first byte to ask for
            raise
        if span is None:  # the whole file at once
            out.write(body)
            return len(body)
        total = int(span.rsplit("/", 1)[1]) if total is None else total
        if not body:
            raise ValueError(f"the gateway sent an empty part at byte {start}")
        body = body[: total - start]
        out.write(body)
        start += len(body)
    return start
