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

    A token bound to :data:`ANY_KEY` grants ``role`` on every key.
    """
    if not token:
        raise AuthError("missing token")
    expiry_text, _, mac = token.partition(".")
    if not expiry_text.isdigit() or not mac:
        raise AuthError("malformed token")
    expiry = int(expiry_text)
    # Compare both candidates every time so timing does not say which key matched.
    ok_key = hmac.compare_digest(mac, _mac(secret, role, key, expiry))
    ok_any = hmac.compare_digest(mac, _mac(secret, role, ANY_KEY, expiry))
    if not (ok_key or ok_any):
        raise AuthError(f"token does not grant {role} on this session", status=403)
    if expiry < (time.time() if now is None else now):
        raise AuthError("token expired")
