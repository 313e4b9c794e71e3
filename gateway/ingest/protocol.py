"""The bot's output-socket protocol, sans I/O.

:class:`OutputDecoder` takes each WebSocket message as the library delivers it (``bytes``
for a binary frame, ``str`` for a text frame) and returns exactly one typed event:

* :class:`Audio`: PCM samples, a read-only ``int16`` view over the received bytes;
* :class:`Handshake`: the first text message of every connection;
* :class:`Roster`: the full speaker roster, sent on change;
* :class:`ProviderEvent`: the vendor's own live transcript events (its v2 transcription
  mode sends ``{"event", "bot_id", "data"}`` objects instead of audio);
* :class:`Rejected`: anything else, with a short, bounded ``reason`` for the metrics.

Kinds are told apart by opcode only: a binary frame is audio and is never JSON-parsed; a
text frame is JSON. Whatever a text frame holds, it becomes an event or a :class:`Rejected`:
its size is bounded by the server's message limit, its nesting by :data:`MAX_DEPTH`
(checked before parsing, so no input can exhaust the interpreter's stack), and every
number is checked to be finite and in range before it is used. Every variant listed in
PROTOCOL.md is accepted: handshakes without
``sample_rate``, with ``protocol_version`` 2, ``start_time``, or unknown keys; audio of any
length (an odd trailing byte is carried into the next message); rosters with ``id`` null or
0 and timestamps in milliseconds or seconds.

No asyncio here: the decoder is driven by the server and tested synchronously.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from ..config import SUPPORTED_RATES
from ..errors import UnsupportedRate

__all__ = [
    "REJECT_REASONS",
    "Audio",
    "Event",
    "Handshake",
    "OutputDecoder",
    "ProviderEvent",
    "Rejected",
    "Roster",
    "RosterEntry",
    "epoch_seconds",
]

Samples = npt.NDArray[np.int16]

#: Epoch values above this are milliseconds (1e11 s is the year 5138).
MS_THRESHOLD: Final = 1e11
#: Epoch timestamps beyond this (milliseconds: the year 5138) are not times.
MAX_EPOCH: Final = 1e14
#: Offsets beyond this many seconds (a year) are not offsets.
MAX_OFFSET: Final = 366 * 86400.0
#: Integers beyond this are not ids or versions; JSON numbers this large lose precision.
MAX_INT: Final = 2**53
#: Deepest nesting a text frame may have. Handshakes are 1 deep and rosters 2; unknown
#: keys may nest a little more. Python's JSON decoder recurses once per level.
MAX_DEPTH: Final = 32
#: Longest name or id string kept from a roster; longer ones are cut.
MAX_NAME: Final = 256

RejectReason = Literal[
    "malformed_json",
    "too_deep",
    "not_json_object_or_array",
    "bad_handshake",
    "bad_roster",
    "empty_audio",
    "bad_provider_event",
]
#: Every reason a message can be rejected for; metrics label values come from here only.
REJECT_REASONS: Final[tuple[RejectReason, ...]] = (
    "malformed_json",
    "too_deep",
    "not_json_object_or_array",
    "bad_handshake",
    "bad_roster",
    "empty_audio",
    "bad_provider_event",
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
class ProviderEvent:
    """``session.started``, ``transcript.segment``, ``error`` ... from the vendor."""

    event: str
    bot_id: str | None
    data: dict[str, Any]


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


Event = Audio | Handshake | Roster | ProviderEvent | Rejected

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
        if too_deep(text):
            return Rejected("too_deep", f"JSON nested deeper than {MAX_DEPTH} levels")
        try:
            value = json.loads(text)
        except ValueError as exc:  # also a number of more digits than int() takes
            return Rejected("malformed_json", f"text message is not JSON: {str(exc)[:120]}")
        except RecursionError:  # unreachable past too_deep(); kept as the last guard
            return Rejected("too_deep", "JSON nested too deep to decode")
        if isinstance(value, dict):
            if isinstance(value.get("event"), str) and "protocol_version" not in value:
                return parse_provider(value)
            return parse_handshake(value)
        if isinstance(value, list):
            return parse_roster(value)
        return Rejected("not_json_object_or_array", f"JSON {type(value).__name__} is neither")


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^][{}]+")


def too_deep(text: str, limit: int = MAX_DEPTH) -> bool:
    """Whether ``text`` nests arrays and objects deeper than ``limit`` (before parsing).

    Text with fewer brackets than the limit cannot be too deep; only then are strings
    skipped and brackets counted, which for a 10,000-person roster takes a few ms.
    """
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    for c in _NOT_BRACKET.sub("", _STRING.sub("", text)):
        if c in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_provider(obj: dict[str, Any]) -> ProviderEvent | Rejected:
    data = obj.get("data")
    if not isinstance(data, dict):
        return Rejected("bad_provider_event", "provider event without a data object")
    bot_id = obj.get("bot_id")
    return ProviderEvent(
        clip(obj["event"], 64), clip(bot_id) if isinstance(bot_id, str) and bot_id else None, data
    )


def clip(text: str, limit: int = MAX_NAME) -> str:
    return text if len(text) <= limit else text[:limit]


def _number(value: Any, bound: float = math.inf) -> float | None:
    """``value`` as a float if it is a finite number with ``abs(value) <= bound``.

    Python ints are unbounded: one of 400 digits overflows a float, so it is compared
    as an int before any conversion.
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return float(value) if abs(value) <= min(bound, MAX_INT) else None
    if isinstance(value, float) and math.isfinite(value) and abs(value) <= bound:
        return value
    return None


def _epoch(value: Any) -> float | None:
    """An epoch time in seconds or milliseconds, as seconds; ``None`` if not one."""
    number = _number(value, MAX_EPOCH)
    return epoch_seconds(number) if number is not None and number > 0 else None


def _show(value: Any) -> str:
    """A short rendering of a bad value for a rejection's detail (never the whole value)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        return "an integer out of range"
    return (
        clip(repr(value), 40)
        if isinstance(value, str | int | float | bool)
        else type(value).__name__
    )


def parse_handshake(obj: dict[str, Any]) -> Handshake | Rejected:
    bot_id = obj.get("bot_id")
    if not isinstance(bot_id, str) or not bot_id:
        return Rejected("bad_handshake", "handshake without a string bot_id")
    version = obj.get("protocol_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 1000:
        return Rejected("bad_handshake", f"protocol_version {_show(version)} is not a version")
    rate_value = obj.get("sample_rate")
    rate: int | None = None
    if rate_value is not None:
        number = _number(rate_value, 1e6)
        if number is None or number != int(number):
            return Rejected("bad_handshake", f"sample_rate {_show(rate_value)} is not a rate")
        rate = int(number)
        if rate not in SUPPORTED_RATES:
            raise UnsupportedRate(f"handshake sample_rate {rate} not in {SUPPORTED_RATES}")
    # Informational fields: a value out of range is ignored rather than refused.
    offset = _number(obj.get("offset", 0.0), MAX_OFFSET)
    return Handshake(
        bot_id=bot_id,
        protocol_version=version,
        sample_rate=rate,
        offset=offset if offset is not None else 0.0,
        start_time=_epoch(obj.get("start_time")),
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
        name = clip(name)
        speaking = item.get("isSpeaking", False)
        if not isinstance(speaking, bool):
            return Rejected("bad_roster", f"roster entry {i}: isSpeaking is not a boolean")
        raw_id = item.get("id")
        if raw_id is not None and (
            isinstance(raw_id, bool) or not isinstance(raw_id, int) or not 0 <= raw_id <= MAX_INT
        ):
            return Rejected("bad_roster", f"roster entry {i}: id {_show(raw_id)} is not an id")
        raw_ts = item.get("timestamp")
        if raw_ts is not None and (isinstance(raw_ts, bool) or not isinstance(raw_ts, int | float)):
            return Rejected("bad_roster", f"roster entry {i}: timestamp is not a number")
        # A number that is no time (NaN, negative, 400 digits) is ignored: arrival time
        # stands in for it, as for a roster without timestamps.
        timestamp = _epoch(raw_ts)
        device = item.get("deviceId")
        is_self = item.get("isSelf", False)
        entries.append(
            RosterEntry(
                name=name,
                id=raw_id or None,
                timestamp=timestamp,
                is_speaking=speaking,
                device_id=clip(device) if isinstance(device, str) else None,
                is_self=is_self is True,
            )
        )
    return Roster(tuple(entries))
