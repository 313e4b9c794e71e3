"""``journal.jsonl``: what a session needs to outlive its process, appended as it happens.

A gateway is restarted for every deploy and crashes now and then; a meeting lasts an
hour. Each session appends one short JSON line per fact worth keeping to its directory's
journal: who it is (key, bot_id, rate, URL parameters), where its clock is anchored,
every gap, every speaker learnt, the pipelines' notes (annotations), where the audio
stood whenever the bot left and every few seconds while it streams, and whether it was
suspended (the gateway stopped with the meeting still going) or ended. Nothing is
rewritten, so a line costs one ``write`` of a few dozen bytes, and a process killed at
any moment leaves every line before the last one intact.

At start-up the gateway reads the journals of sessions that did not end
(:func:`unfinished`) and folds each into a :class:`Resume`: the session comes back as
lingering, and a bot that reconnects within the linger continues it (one directory, one
recording with the outage as silence, one clock); one that does not is finalized when
the linger runs out, as if the process had never stopped.

The journal is sans-I/O apart from :class:`Journal`'s appends: :func:`fold` turns lines
into state and is tested without files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger("gateway.journal")

NAME = "journal.jsonl"


@dataclass(slots=True)
class Resume:
    """A session as its journal left it."""

    key: str
    directory: Path
    rate: int = 0
    bot_id: str | None = None
    protocol_version: int | None = None
    created_at: float = 0.0
    params: dict[str, str] = field(default_factory=dict)
    origin: float | None = None
    """Wall time of sample 0 (the clock's anchor), once audio started."""
    samples: int = 0
    """The furthest audio position recorded."""
    last_seen: float = 0.0
    """Wall time of the last sign of the bot (its leaving, or the last position line)."""
    gaps: list[dict[str, Any]] = field(default_factory=list)
    speakers: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    """The pipelines' notes on the session (``SessionContext.annotate``)."""
    connections: list[dict[str, Any]] = field(default_factory=list)
    reconnects: int = 0
    suspended: bool = False
    """The previous process stopped cleanly (SIGTERM) rather than dying."""
    ended: bool = False
    parts: list[dict[str, Any]] = field(default_factory=list)
    """Cluster mode: each node that served the session, where, from which sample on."""


def fold(key: str, directory: Path, lines: Iterable[str]) -> Resume:
    """The state ``lines`` of a journal describe. A line cut short by a crash, or one
    that is not a journal record, is skipped."""
    state = Resume(key, directory)
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        with contextlib.suppress(KeyError, TypeError, ValueError):
            _apply(state, record)
    return state


def _apply(state: Resume, r: dict[str, Any]) -> None:
    kind = r["t"]
    if kind == "session":
        state.key = str(r["key"])
        state.rate = int(r["rate"])
        state.bot_id = r.get("bot_id")
        state.protocol_version = r.get("protocol_version")
        state.created_at = float(r["created_at"])
        state.params = {str(k): str(v) for k, v in r.get("params", {}).items()}
    elif kind == "clock":
        state.origin = float(r["origin"])
    elif kind == "position":
        state.samples = max(state.samples, int(r["samples"]))
        state.last_seen = max(state.last_seen, float(r["wall"]))
        state.suspended = False
    elif kind == "gap":
        state.gaps.append(r["gap"])
        state.reconnects = int(r.get("reconnects", state.reconnects))
    elif kind == "speaker":
        state.speakers.append(r["speaker"])
    elif kind == "annotation":
        if r["value"] is None:
            state.annotations.pop(str(r["name"]), None)
        else:
            state.annotations[str(r["name"])] = str(r["value"])
    elif kind == "connection":
        state.connections.append(r["connection"])
    elif kind == "reconnect":
        state.reconnects = int(r["reconnects"])
    elif kind == "suspended":
        state.suspended = True
        state.last_seen = max(state.last_seen, float(r["wall"]))
    elif kind == "ended":
        state.ended = True
    elif kind == "part":
        state.parts.append({k: r[k] for k in ("node", "directory", "sample", "wall")})


def unfinished(root: Path) -> Iterator[Resume]:
    """Every session under ``root`` whose journal does not say it ended."""
    for path in sorted(root.glob(f"*/{NAME}")):
        state = unfinished_in(path.parent)
        if state is not None:
            yield state


def unfinished_in(directory: Path) -> Resume | None:
    """The session in ``directory`` if its journal does not say it ended."""
    path = directory / NAME
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.error("cannot read %s: %s", path, exc)
        return None
    # A directory is ``<key>`` or ``<key>.<n>`` (a later meeting with the same key): the
    # key itself is in the session line.
    state = fold("", directory, text.splitlines())
    return state if state.key and state.rate and not state.ended else None


def latest(root: Path, key: str) -> Path | None:
    """The newest directory of ``key`` under ``root`` (``key``, ``key.2``, ...), if any.

    Keys may hold dots, so ``a.2`` may be the second meeting of ``a`` or the first of the
    key ``a.2``: a directory whose journal names another key is not this key's. One
    without a readable journal (a disk that was full when it began) is taken as it is named.
    """
    found: Path | None = None
    path, n = root / key, 1
    while path.is_dir():
        if key_of(path) in (key, None):
            found = path
        n += 1
        path = root / f"{key}.{n}"
    return found


def key_of(directory: Path) -> str | None:
    """The session key a journal's first line names (a directory name may be ``key.n``)."""
    try:
        with (directory / NAME).open(encoding="utf-8", errors="replace") as f:
            first = json.loads(f.readline())
        return str(first["key"]) if first.get("t") == "session" else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class Journal:
    """Appends records to one session's journal. Never raises for the disk: a failed
    append is counted by the caller's ``on_error`` and the session goes on (it only
    loses the ability to resume precisely after a crash)."""

    def __init__(self, path: Path, on_error: Any = None) -> None:
        self.path = path
        self._fd: int | None = None
        self._on_error = on_error
        self._failed = False
        self._closed = False
        self.mirror: Callable[[str], None] | None = None
        """Cluster mode: every line is also kept in Redis (see :mod:`gateway.cluster`)."""

    def append(self, kind: str, **fields: Any) -> None:
        if self._closed:
            return  # the session was ended or handed over: its journal is another's now
        line = json.dumps({"t": kind, **fields}, separators=(",", ":")) + "\n"
        if self.mirror is not None:
            self.mirror(line)
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.write(self._fd, line.encode())
        except OSError as exc:
            if not self._failed:
                logger.error("cannot append to %s: %s", self.path, exc)
            self._failed = True
            if self._on_error is not None:
                self._on_error()
            return
        self._failed = False

    def close(self) -> None:
        self._closed = True
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
