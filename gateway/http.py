"""Plain HTTP on the gateway's port: health, metrics, sessions, and the live page.

=================================  ==================================================
``GET /healthz``                   the process is up
``GET /readyz``                    pipelines are loaded and the gateway can take work
``GET /metrics``                   Prometheus text format
``GET /sessions``                  every session as JSON (:func:`gateway.reports.summary`)
``GET /sessions/{key}/timeline``   who spoke when in one session, session-clock seconds
``GET /``                          the live page (``gateway/page/``, no build, no CDN)
``GET /page/{asset}``              its script and style; ``config.json`` says if it is open
=================================  ==================================================

Every answer is built from memory and is cheap; nothing here blocks the loop. In cluster
mode ``/sessions`` lists every node's sessions (one Redis round trip).
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.http11 import Request, Response

from . import reports
from .routes import response
from .storage.files import disk_watch

if TYPE_CHECKING:
    from .server import Gateway

#: The page's files, by the name they are served under, and their types.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def _asset(name: str) -> bytes:
    return resources.files("gateway.page").joinpath(name).read_bytes()


def _json(data: object) -> Response:
    return response(200, "application/json", json.dumps(data, indent=1).encode())


async def answer(gateway: Gateway, request: Request) -> Response | None:
    """The response to a plain HTTP request, or None if it is not one of ours."""
    path = urlsplit(request.path).path
    if path == "/sessions" and gateway.cluster is not None:
        return _json(await gateway.cluster.sessions())  # every node's, from Redis
    return _answer(gateway, request, path)


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
    if path == "/sessions":
        return _json([reports.summary(s) for s in gateway.sessions])
    parts = [unquote(p) for p in path.split("/") if p]
    if len(parts) == 3 and parts[0] == "sessions" and parts[2] == "timeline":
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
