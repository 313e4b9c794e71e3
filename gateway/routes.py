"""Routes and plain HTTP answers: what a request target means, before any upgrade; and
which open connections read transcripts, closed last when the gateway drains."""

from __future__ import annotations

import asyncio
import http
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response
from websockets.typing import Subprotocol

from . import keywords
from .config import SUPPORTED_RATES
from .errors import BadRequest, ProtocolError, RouteError
from .keys import valid_key

#: Close codes of a draining gateway: the meetings go on in the next process (come
#: back), or the gateway is going away.
RESTART = (1012, "service restart")
GOING_AWAY = (1001, "")


#: Query parameters that list a meeting's terms, each repeatable; read as one ``keywords``.
TERM_PARAMS = ("keywords", "keyterm")


@dataclass(frozen=True, slots=True)
class Route:
    kind: str  # "output", "input" or an extra endpoint's name
    key: str | None
    params: Mapping[str, str]


def parse_route(target: str) -> Route:
    """Map a request target to a route; raise :class:`RouteError` for anything else, and
    :class:`BadRequest` for terms a meeting cannot take (:mod:`gateway.keywords`)."""
    url = urlsplit(target)
    pairs = parse_qsl(url.query, keep_blank_values=True)
    params = dict(pairs)
    # Deepgram's SDKs repeat keywords= and keyterm= once per term (gateway.keywords).
    if terms := [v for k, v in pairs if k in TERM_PARAMS]:
        try:
            params["keywords"] = ",".join(keywords.parse(",".join(terms), "keywords"))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
    parts = [p for p in url.path.split("/") if p]
    if not parts:
        return Route("output", None, params)
    if parts == ["v1", "listen"]:  # Deepgram's live API (gateway.listen)
        return Route("listen", None, params)
    if parts[0] == "bots" and len(parts) in (2, 3):
        key = parts[1]
        if not valid_key(key):
            raise RouteError(f"invalid session key {key[:40]!r}")
        return Route("output" if len(parts) == 2 else parts[2], key, params)
    if len(parts) == 1:
        return Route(parts[0], None, params)
    raise RouteError(f"no route for {url.path[:80]!r}")


def response(
    status: int, content_type: str, body: bytes, extra: list[tuple[str, str]] | None = None
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            *(extra or ()),
        ]
    )
    return Response(status, http.HTTPStatus(status).phrase, headers, body)


def remote_ip(ws: Any) -> str:
    address = ws.remote_address
    return str(address[0]) if isinstance(address, tuple) else str(address)


def select_subprotocol(ws: Any, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Browsers pass a Deepgram key as ``Sec-WebSocket-Protocol: token, <key>`` and
    need ``token`` back; anyone else offers none and gets none."""
    return Subprotocol("token") if "token" in offered else None


def url_rate(params: Mapping[str, str]) -> int | None:
    for name in ("sample_rate", "rate"):
        value = params.get(name, "")
        if value.isdigit() and int(value) in SUPPORTED_RATES:
            return int(value)
    return None


def reads(ws: Any, routes: Mapping[str, tuple[str, Any]]) -> bool:
    """Whether connection ``ws`` reads transcripts: an endpoint of the ``read`` role, or
    a Deepgram client (``/v1/listen``: its transcript comes back on the same socket)."""
    try:
        kind = parse_route(ws.request.path).kind if ws.request is not None else ""
    except ProtocolError:
        return False
    return kind == "listen" or (kind in routes and routes[kind][0] == "read")


async def close_all(
    connections: Iterable[Any],
    but_readers_of: Mapping[str, tuple[str, Any]] | None = None,
    close: tuple[int, str] = GOING_AWAY,
) -> None:
    """Close ``connections`` (1001 unless ``close`` says otherwise) and wait for their
    closing handshakes; all but the transcript readers when given the extra endpoints
    (``but_readers_of``)."""
    closing = [
        asyncio.create_task(ws.close(*close))
        for ws in connections
        if but_readers_of is None or not reads(ws, but_readers_of)
    ]
    if closing:
        await asyncio.wait(closing)
