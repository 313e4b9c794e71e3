"""Session keys: from URLs as given, from a bot_id encoded so none collide.

A key names a directory and appears in URLs, so it keeps to a safe alphabet. Two
different bot_ids never share a key: an unusual one is encoded, never stripped.
"""

from __future__ import annotations

import base64
import hashlib
import re
import zlib

#: Keys as they appear in URLs and directory names: a safe alphabet, 128 at most.
_KEY_OK = re.compile(r"^[A-Za-z0-9~][A-Za-z0-9._~-]{0,127}$")
#: A bot_id in this form is its own key. Anything else is encoded behind a ``~``, which
#: such a bot_id never contains, so two different bot_ids never share a key.
_PLAIN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Longest bot_id kept in metadata and logs; the key still comes from the whole id.
MAX_BOT_ID = 256


def valid_key(key: str) -> bool:
    """A key from a URL is used as a directory name: accept only a safe alphabet."""
    return bool(_KEY_OK.match(key))


def key_from_bot_id(bot_id: str) -> str:
    """A key for ``bot_id`` (which arrives from the network): distinct ids, distinct keys.

    A bot_id of letters, digits, ``.``, ``_`` and ``-`` (every real one: a UUID) is used
    as it is. Any other is encoded, never stripped: ``~`` and the base32 of its UTF-8,
    or, past 128 characters, ``~~`` and 40 hex digits of its SHA-256.
    """
    if _PLAIN_ID.match(bot_id):
        return bot_id
    raw = bot_id.encode("utf-8", "surrogatepass")
    encoded = base64.b32encode(raw).decode().rstrip("=").lower()
    if len(encoded) < 128:
        return "~" + encoded
    return "~~" + hashlib.sha256(raw).hexdigest()[:40]


def phase(key: str) -> float:
    """Where in a period this session's periodic work falls, in [0, 1): the same for a
    key in every process, and spread evenly over keys, so meetings that started together
    do not all do that work in the same instant."""
    return zlib.crc32(key.encode()) / 2**32


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut for a log line or a metadata field, marked where it was cut."""
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"
