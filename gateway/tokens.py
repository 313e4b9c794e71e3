"""Signed URL tokens.

A bot cannot send headers, so a token travels in the URL query (``?token=...``). It is
bound to a role (``output``, ``input``, ``read``, ``control``) and a session key (``*``
for endpoints that span sessions) and carries its expiry::

    token = "<expiry epoch seconds>.<base64url HMAC-SHA256(secret, 'v1|role|key|expiry')>"

Verification recomputes the MAC and compares in constant time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Literal

from .errors import AuthError

Role = Literal["output", "input", "read", "control"]
ROLES: tuple[Role, ...] = ("output", "input", "read", "control")

#: The key a token is bound to when it opens every session (``/transcripts``).
ANY_KEY = "*"


def _mac(secret: str, role: str, key: str, expiry: int) -> str:
    message = f"v1|{role}|{key}|{expiry}".encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mint(secret: str, role: Role, key: str, ttl: float, now: float | None = None) -> str:
    """A token for ``role`` on session ``key`` valid for ``ttl`` seconds."""
    expiry = int((time.time() if now is None else now) + ttl)
    return f"{expiry}.{_mac(secret, role, key, expiry)}"


def verify(secret: str, token: str | None, role: Role, key: str, now: float | None = None) -> None:
    """Raise :class:`AuthError` unless ``token`` grants ``role`` on ``key`` now.

    A token bound to :data:`ANY_KEY` grants ``role`` on every key. Missing, malformed and
    expired tokens are 401; a valid token for another role or key is 403.
    """
    expiry, mac = _parse(token, now)
    # Compare both candidates every time so timing does not say which key matched.
    ok_key = hmac.compare_digest(mac, _mac(secret, role, key, expiry))
    ok_any = hmac.compare_digest(mac, _mac(secret, role, ANY_KEY, expiry))
    if not (ok_key or ok_any):
        raise AuthError(f"token does not grant {role} on this session", status=403)


def scope(
    secret: str, token: str | None, role: Role, now: float | None = None
) -> Callable[[str], bool] | None:
    """Which keys ``token`` grants ``role`` on, for a request that spans sessions: None
    for every key (a token bound to :data:`ANY_KEY`), else a test of one key (true for
    the key the token was minted for, if it is for ``role``).

    Raises :class:`AuthError` (401) for a missing, malformed or expired token.
    """
    expiry, mac = _parse(token, now)
    if hmac.compare_digest(mac, _mac(secret, role, ANY_KEY, expiry)):
        return None
    return lambda key: hmac.compare_digest(mac, _mac(secret, role, key, expiry))


def presented(headers: Mapping[str, str], params: Mapping[str, str]) -> str | None:
    """The token or key a request presents, wherever a client can put it.

    ``Authorization: Bearer <t>`` (or Deepgram's ``Token <t>``), the WebSocket
    subprotocols ``token, <t>`` (browsers cannot set headers on a WebSocket), or
    ``?token=<t>`` (bots cannot set either).
    """
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() in ("token", "bearer") and value.strip():
        return value.strip()
    protocols = headers.get("Sec-WebSocket-Protocol", "")
    offered = [p.strip() for p in protocols.split(",")]
    if len(offered) >= 2 and offered[0].lower() == "token" and offered[1]:
        return offered[1]
    return params.get("token") or None


def _parse(token: str | None, now: float | None) -> tuple[int, str]:
    if not token:
        raise AuthError("missing token")
    expiry_text, _, mac = token.partition(".")
    if not expiry_text.isdigit() or not mac:
        raise AuthError("malformed token")
    expiry = int(expiry_text)
    # The expiry is in the clear, so checking it before the MAC tells nothing secret.
    if expiry < (time.time() if now is None else now):
        raise AuthError("token expired")
    return expiry, mac
