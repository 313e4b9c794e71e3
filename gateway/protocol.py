"""The bot's output-socket protocol, sans I/O.

:class:`OutputDecoder` takes each WebSocket message as the library delivers it (``bytes``
for a binary frame, ``str`` for a text frame) and returns exactly one typed event:

* :class:`Audio`: PCM samples, a read-only ``int16`` view over the received bytes;
* :class:`Handshake`: the first text message of every connection;
* :class:`Roster`: the full speaker roster, sent on change;
* :class:`Rejected`: anything else, with a short, bounded ``reason`` for the metrics.

Kinds are told apart by opcode only: a binary frame is audio and is never JSON-parsed; a
text frame is JSON. Every variant listed in PROTOCOL.md is accepted: handshakes without
``sample_rate``, with ``protocol_version`` 2, ``start_time``, or unknown keys; audio of any
length (an odd trailing byte is carried into the next message); rosters with ``id`` null or
0 and timestamps in milliseconds or seconds.

No asyncio here: the decoder is driven by the server and tested synchronously.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from .config import SUPPORTED_RATES
from .errors import UnsupportedRate

__all__ = [
    "REJECT_REASONS",
    "Audio",
    "Event",
    "Handshake",
    "OutputDecoder",
    "Rejected",
    "Roster",
    "RosterEntry",
    "epoch_seconds",
]

Samples = npt.NDArray[np.int16]

#: Epoch values above this are milliseconds (1e11 s is the year 5138).
MS_THRESHOLD: Final = 1e11

RejectReason = Literal[
    "malformed_json",
    "not_json_object_or_array",
    "bad_handshake",
    "bad_roster",
    "empty_audio",
]
#: Every reason a message can be rejected for; metrics label values come from here only.
REJECT_REASONS: Final[tuple[RejectReason, ...]] = (
    "malformed_json",
    "not_json_object_or_array",
    "bad_handshake",
    "bad_roster",
    "empty_audio",
)


@dataclass(frozen=True, slots=True)
class Handshake:
    bot_id: str
    protocol_version: int
    sample_rate: int | None
    offset: float
    start_time: float | None
    """Epoch seconds, when the bot sent one."""


@dataclass(frozen=True, slots=True)
class Audio:
    samples: Samples
    """Read-only view over the message's bytes; valid as long as the message is."""


@dataclass(frozen=True, slots=True)
class RosterEntry:
    name: str
    id: int | None
    timestamp: float | None
    """Epoch seconds (converted from milliseconds when needed)."""
    is_speaking: bool
    device_id: str | None
    is_self: bool


@dataclass(frozen=True, slots=True)
class Roster:
    entries: tuple[RosterEntry, ...]


@dataclass(frozen=True, slots=True)
class Rejected:
    reason: RejectReason
    detail: str


Event = Audio | Handshake | Roster | Rejected

_EMPTY: Final = np.zeros(0, dtype=np.int16)
_EMPTY.flags.writeable = False


def epoch_seconds(value: float) -> float:
    """Normalise an epoch timestamp in seconds or milliseconds to seconds."""
    return value / 1000.0 if value > MS_THRESHOLD else float(value)


class OutputDecoder:
    """Decodes one output-socket connection's messages. One instance per connection."""

    __slots__ = ("_odd",)

    def __init__(self) -> None:
        self._odd: bytes = b""

    @property
    def pending_odd_byte(self) -> bool:
        return bool(self._odd)

    def receive(self, message: bytes | str) -> Event:
        """Classify and decode one message.

        Raises :class:`~gateway.errors.UnsupportedRate` for a handshake at a rate the
        gateway cannot take: continuing would record audio at the wrong speed.
        """
        if isinstance(message, str):
            return self._text(message)
        samples = self.samples(message)
        if samples is None:
            return Rejected("empty_audio", "binary message with no bytes")
        return Audio(samples)

    def samples(self, data: bytes) -> Samples | None:
        """Decode a binary message straight to samples: the per-frame fast path.

        Returns a read-only view over ``data`` (no copy) when no byte is carried, which
        is every message of a well-behaved bot; ``None`` for an empty message, which
        :meth:`receive` reports as ``empty_audio``.
        """
        if not self._odd and not len(data) & 1:
            return np.frombuffer(data, dtype="<i2") if data else None
        if self._odd:
            data = self._odd + data
            self._odd = b""
        if len(data) & 1:
            # Chunking split a sample: keep its first byte for the next message.
            self._odd = data[-1:]
            data = data[:-1]
        return np.frombuffer(data, dtype="<i2") if data else _EMPTY

    def _text(self, text: str) -> Event:
        try:
            value = json.loads(text)
        except ValueError as exc:
            return Rejected("malformed_json", f"text message is not JSON: {exc}")
        if isinstance(value, dict):
            return parse_handshake(value)
        if isinstance(value, list):
            return parse_roster(value)
        return Rejected("not_json_object_or_array", f"JSON {type(value).__name__} is neither")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value):
        return None
    return float(value)


def parse_handshake(obj: dict[str, Any]) -> Handshake | Rejected:
    bot_id = obj.get("bot_id")
    if not isinstance(bot_id, str) or not bot_id:
        return Rejected("bad_handshake", "handshake without a string bot_id")
    version = obj.get("protocol_version", 1)
    if isinstance(version, bool) or not isinstance(version, int):
        return Rejected("bad_handshake", f"protocol_version {version!r} is not an integer")
    rate_value = obj.get("sample_rate")
    rate: int | None = None
    if rate_value is not None:
        number = _number(rate_value)
        if number is None or number != int(number):
            return Rejected("bad_handshake", f"sample_rate {rate_value!r} is not an integer")
        rate = int(number)
        if rate not in SUPPORTED_RATES:
            raise UnsupportedRate(f"handshake sample_rate {rate} not in {SUPPORTED_RATES}")
    offset = _number(obj.get("offset", 0.0))
    start = obj.get("start_time")
    start_time = _number(start) if start is not None else None
    return Handshake(
        bot_id=bot_id,
        protocol_version=version,
        sample_rate=rate,
        offset=offset if offset is not None else 0.0,
        start_time=epoch_seconds(start_time) if start_time else None,
    )


def parse_roster(items: list[Any]) -> Roster | Rejected:
    entries = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return Rejected("bad_roster", f"roster entry {i} is not an object")
        name = item.get("name")
        if name is None:
            name = "Unknown"
        if not isinstance(name, str):
            return Rejected("bad_roster", f"roster entry {i}: name is not a string")
        speaking = item.get("isSpeaking", False)
        if not isinstance(speaking, bool):
            return Rejected("bad_roster", f"roster entry {i}: isSpeaking is not a boolean")
        raw_id = item.get("id")
        if raw_id is not None and (isinstance(raw_id, bool) or not isinstance(raw_id, int)):
            return Rejected("bad_roster", f"roster entry {i}: id is not an integer")
        raw_ts = item.get("timestamp")
        timestamp = _number(raw_ts) if raw_ts is not None else None
        if raw_ts is not None and timestamp is None:
            return Rejected("bad_roster", f"roster entry {i}: timestamp is not a number")
        device = item.get("deviceId")
        is_self = item.get("isSelf", False)
        entries.append(
            RosterEntry(
                name=name,
                id=raw_id or None,
                timestamp=epoch_seconds(timestamp) if timestamp else None,
                is_speaking=speaking,
                device_id=device if isinstance(device, str) else None,
                is_self=is_self is True,
            )
        )
    return Roster(tuple(entries))
