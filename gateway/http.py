"""Plain HTTP on the gateway's port: health, metrics, sessions, and the live page.

=================================  ==================================================
``GET /healthz``                   the process is up
``GET /readyz``                    pipelines are loaded and the gateway can take work
``GET /metrics``                   Prometheus text format
``GET /sessions``                  every session as JSON (:func:`gateway.reports.summary`)
``GET /sessions/{key}/timeline``   who spoke when in one session, session-clock seconds
``GET /sessions/{key}/files``      the newest session of ``key``: its files on this node
``GET /sessions/{key}/files/{f}``  one of them (recording, transcripts, captions, roster)
``GET /``                          the live page (``gateway/page/``, no build, no CDN)
``GET /page/{asset}``              its script and style; ``config.json`` says if it is open
=================================  ==================================================

Every answer is built from memory and is cheap; nothing here blocks the loop (files are
looked up and read on the blocking pool, two at a time). In cluster mode ``/sessions``
lists every node's sessions (one Redis round trip). A listing serves every request for
:data:`LISTING_TTL`: each open page asks once a second, and with a thousand meetings a
listing costs the loop tens of milliseconds.

With a secret set, ``/sessions``, the timelines and the files name the people in every
meeting, so they need a ``read`` token (``Authorization: Bearer <token>`` or
``?token=``): one bound to ``*`` (or the secret itself) sees every session, one bound to
a key sees that session.
A request without one is refused with 401 before anything is looked up. Health, metrics
(no session keys or names in them) and the page's static files stay open.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.http11 import Request, Response

from . import reports, tokens
from .errors import AuthError, OverloadError
from .keys import valid_key
from .routes import response
from .storage import journal, offload
from .storage.files import disk_watch

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from .server import Gateway

#: The page's files, by the name they are served under, and their types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _asset(name: str) -> bytes:
    return resources.files("gateway.page").joinpath(name).read_bytes()


#: Seconds one listing of the sessions answers every ``GET /sessions`` for.
LISTING_TTL = 0.5
JSON = "application/json"


def _json(data: object) -> Response:
    # Compact: only then does the json module use its C encoder (500 rows: 2.4 against 9.2 ms).
    return response(200, JSON, json.dumps(data, separators=(",", ":")).encode())


@dataclass
class _Listing:
    at: float = float("-inf")
    rows: list[dict[str, Any]] = field(default_factory=list)
    body: bytes = b"[]"


_listings: weakref.WeakKeyDictionary[Gateway, _Listing] = weakref.WeakKeyDictionary()


async def _listing(gateway: Gateway) -> _Listing:
    """Every session's row, built at most once per :data:`LISTING_TTL`."""
    listing = _listings.setdefault(gateway, _Listing())
    if time.monotonic() - listing.at >= LISTING_TTL:
        if gateway.cluster is not None:
            rows = await gateway.cluster.sessions()  # every node's, from Redis
        else:
            rows = [reports.summary(s) for s in gateway.sessions]
        listing.rows, listing.at = rows, time.monotonic()
        listing.body = json.dumps(rows, separators=(",", ":")).encode()
    return listing


def readable(gateway: Gateway, request: Request) -> Callable[[str], bool] | None:
    """The session keys this request may read about: None for every one, else a test of
    one key. :class:`AuthError` for a request that may read about none at all."""
    secret = gateway.settings.secret
    if gateway.settings.open:
        return None
    params = dict(parse_qsl(urlsplit(request.path).query))
    token = tokens.presented(request.headers, params)
    if token is not None and hmac.compare_digest(token.encode(), secret.encode()):
        return None  # the operator's own key, as /v1/listen takes it
    return tokens.scope(secret, token, "read")


async def answer(
    gateway: Gateway, connection: ServerConnection, request: Request
) -> Response | None:
    """The response to a plain HTTP request, or None if it is not one of ours.

    Raises :class:`AuthError` for a session listing the request may not read.
    """
    path = urlsplit(request.path).path
    if path == "/sessions":
        allowed = readable(gateway, request)  # before any work: a refusal costs nothing
        listing = await _listing(gateway)
        if allowed is None:
            return response(200, JSON, listing.body)
        return _json([row for row in listing.rows if allowed(str(row.get("key")))])
    parts = [unquote(p) for p in path.split("/") if p]
    if len(parts) in (3, 4) and parts[0] == "sessions" and parts[2] == "files":
        return await _files_answer(gateway, connection, request, parts[1], parts[3:])
    return _answer(gateway, request, path)


def _may_read(gateway: Gateway, request: Request, key: str) -> None:
    allowed = readable(gateway, request)
    if allowed is not None and not allowed(key):
        raise AuthError("token does not grant read on this session", status=403)


# -- a session's files ---------------------------------------------------------------------

#: What ``/sessions/{key}/files`` serves, by suffix. Nothing else in a session's
#: directory is served, and neither is the journal (the gateway's own bookkeeping).
FILE_TYPES = {
    ".wav": "audio/wav",
    ".json": "application/json",
    ".jsonl": "application/x-ndjson",
    ".vtt": "text/vtt; charset=utf-8",
}
#: The largest file served: websockets sends a response whole, from memory, and cuts a
#: client that has not read it within its handshake timeouts (half a minute or so). This
#: is for transcripts, captions and short recordings (16 MiB is 8 minutes at 16 kHz); a
#: larger file gets 413 and stays on the data volume.
MAX_FILE_BYTES = 16 * 2**20
#: Bytes of files being sent at once per process, each counted until its connection
#: closes (a client that does not read holds its file that long); past it, 503.
FILE_BYTES_IN_FLIGHT = 64 * 2**20
#: Lookups and reads at once, on the blocking pool the sessions' own writes use; past it, 503.
FILE_READS = 2
_reads = 0
_sending = 0
_senders: set[asyncio.Future[None]] = set()


def _served(name: str) -> bool:
    return (
        name != journal.NAME
        and not name.startswith(".")
        and os.path.splitext(name)[1] in FILE_TYPES
    )


def _listing_of(root: Path, key: str) -> tuple[Path, list[dict[str, Any]]] | None:
    """The newest directory of ``key`` and the files in it that are served. Blocking."""
    directory = journal.latest(root, key)
    if directory is None:
        return None
    rows = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if _served(entry.name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                rows.append(
                    {"name": entry.name, "bytes": st.st_size, "modified": round(st.st_mtime, 3)}
                )
    return directory, sorted(rows, key=lambda row: str(row["name"]))


def _read(path: Path, start: int, length: int) -> bytes:
    """Up to ``length`` bytes from ``start``, as the file is now (a live recording grows;
    metadata is replaced whole). Blocking."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.pread(fd, length, start)
    finally:
        os.close(fd)


class RangeNotSatisfiable(ValueError):
    """A ``Range`` that starts past the end of the file."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The ``[start, stop)`` a ``Range`` header asks of a file of ``size`` bytes, or None
    for the whole file: no header, or one this server ignores as RFC 9110 allows (another
    unit, several ranges, malformed). Raises :class:`RangeNotSatisfiable`."""
    if header is None or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[6:].strip().partition("-")
    digits = first + last
    if not dash or not 0 < len(digits) <= 30 or not (digits.isascii() and digits.isdigit()):
        return None
    if not first:  # the last N bytes
        if int(last) == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(0, size - int(last)), size
    start = int(first)
    stop = size if not last else min(size, int(last) + 1)
    if last and int(last) < start:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, stop


def _count_until_closed(connection: ServerConnection, size: int) -> None:
    """Count ``size`` bytes as being sent until ``connection`` closes."""
    global _sending
    _sending += size
    closed = asyncio.ensure_future(connection.wait_closed())
    _senders.add(closed)

    def release(future: asyncio.Future[None]) -> None:
        global _sending
        _sending -= size
        _senders.discard(future)

    closed.add_done_callback(release)


def _too_big(name: str, size: int) -> Response:
    text = f"{name} is {size} bytes: ask for parts of at most {MAX_FILE_BYTES} with Range\n"
    return response(413, "text/plain", text.encode(), [("Accept-Ranges", "bytes")])


def _ranges(content_range: str) -> list[tuple[str, str]]:
    return [("Accept-Ranges", "bytes"), ("Content-Range", f"bytes {content_range}")]


async def _files_answer(
    gateway: Gateway, connection: ServerConnection, request: Request, key: str, name: list[str]
) -> Response:
    if not valid_key(key):
        return response(404, "text/plain", b"no such session\n")
    _may_read(gateway, request, key)
    global _reads
    if _reads >= FILE_READS:
        raise OverloadError("session files: too many being read at once", retry_after=1)
    _reads += 1
    try:
        found = await offload.blocking(_listing_of, gateway.sessions.root, key)
        if found is None:
            return response(404, "text/plain", b"no such session on this node\n")
        directory, files = found
        if not name:
            return _json(files)
        # Only a name the listing holds: never a path built from what the client sent.
        size = next((int(row["bytes"]) for row in files if row["name"] == name[0]), None)
        if size is None:
            return response(404, "text/plain", b"no such file\n")
        return await _file(connection, request, directory / name[0], size)
    finally:
        _reads -= 1


async def _file(connection: ServerConnection, request: Request, path: Path, size: int) -> Response:
    """The file, whole or the part a ``Range`` asks for, its bytes held against
    :data:`FILE_BYTES_IN_FLIGHT` until the connection closes."""
    global _sending
    try:
        wanted = byte_range(request.headers.get("Range"), size)
    except RangeNotSatisfiable:
        return response(416, "text/plain", b"range not satisfiable\n", _ranges(f"*/{size}"))
    if wanted is None:
        if size > MAX_FILE_BYTES:
            return _too_big(path.name, size)
        start, length = 0, MAX_FILE_BYTES + 1  # as it is now: a live recording grows
    else:
        # At most MAX_FILE_BYTES of it: a client asking from an offset to the end gets
        # the file in parts, as media players and download managers expect.
        start, length = wanted[0], min(wanted[1] - wanted[0], MAX_FILE_BYTES)
    held = min(size, length)
    if _sending + held > FILE_BYTES_IN_FLIGHT:
        raise OverloadError("session files: too many bytes being sent", retry_after=1)
    _sending += held
    try:
        data = await offload.blocking(_read, path, start, length)
    finally:
        _sending -= held
    if wanted is None and len(data) > MAX_FILE_BYTES:  # it grew since it was listed
        return _too_big(path.name, len(data))
    _count_until_closed(connection, len(data))
    kind = FILE_TYPES[path.suffix]
    if wanted is None:
        return response(200, kind, data, [("Accept-Ranges", "bytes")])
    return response(206, kind, data, _ranges(f"{start}-{start + len(data) - 1}/{size}"))


def _answer(gateway: Gateway, request: Request, path: str) -> Response | None:
    if path == "/healthz":
        return response(200, "text/plain", b"ok\n")
    if path == "/readyz":
        if not gateway.ready:
            return response(503, "text/plain", b"not ready\n")
        # A session that cannot write (a full data volume) keeps new meetings away
        # until its writes go through again; the check is a dictionary lookup.
        problem = disk_watch(gateway.metrics.registry).problem
        if problem is not None:
            return response(503, "text/plain", f"not ready: {problem}\n".encode())
        return response(200, "text/plain", b"ready\n")
    if path == "/metrics":
        gateway.sessions.refresh()  # states change on every connect; count them now
        return response(200, CONTENT_TYPE_LATEST, generate_latest(gateway.metrics.registry))
    parts = [unquote(p) for p in path.split("/") if p]
    if len(parts) == 3 and parts[0] == "sessions" and parts[2] == "timeline":
        _may_read(gateway, request, parts[1])
        session = gateway.sessions.get(parts[1])
        if session is None:
            return response(404, "text/plain", b"no such session\n")
        return _json(reports.timeline(session))
    upgrade = "upgrade" in request.headers.get("Connection", "").lower()
    if path == "/" and not upgrade:
        return response(200, ASSETS["index.html"], _asset("index.html"))
    if parts == ["page", "config.json"]:
        return _json({"open": gateway.settings.open})
    if len(parts) == 2 and parts[0] == "page" and parts[1] in ASSETS:
        return response(200, ASSETS[parts[1]], _asset(parts[1]))
    if not upgrade:
        return response(404, "text/plain", b"not found\n")
    return None
