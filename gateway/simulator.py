"""A Meeting BaaS bot, simulated: speaks the output-socket protocol exactly.

Like the newest bot it sends the handshake first, then binary PCM frames of
``frame_ms`` (10 ms by default) paced against a monotonic clock by sample count, roster
arrays with epoch-millisecond timestamps when a roster script says so, and at the end
kills the TCP connection without a close frame (the server sees 1006). It offers
permessage-deflate, as the bot does. With ``reconnect_after`` it drops the connection
mid-meeting, waits the bot's first backoff step, reconnects, handshakes again with the
same ``bot_id``, and goes on with the audio of "now": what the meeting produced while
it was away is lost, as with the real bot.

Roster script format (JSON)::

    [{"at": 0.0, "roster": [{"name": "Alice", "id": 1, "isSpeaking": true}]}, ...]

``at`` is seconds of audio; missing ``timestamp`` fields are filled, in epoch
milliseconds, with the meeting time of the audio being sent: the send time at real time,
and as far ahead of it as the audio is at ``speed`` above 1, so that rosters and audio
stay together on the gateway's session clock.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
import wave
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect

from .audio.resample import Resampler

Samples = npt.NDArray[np.int16]


def read_wav(path: Path, rate: int | None = None) -> tuple[Samples, int]:
    """Mono int16 samples of a 16-bit WAV, resampled to ``rate`` if given."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        channels, native = w.getnchannels(), w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype(np.int16)
    if rate is not None and rate != native:
        data = Resampler(native, rate).process(np.ascontiguousarray(data), last=True)
        native = rate
    return np.ascontiguousarray(data, dtype=np.int16), native


@dataclass
class SimulatedBot:
    url: str
    samples: Samples
    rate: int
    frame_ms: int = 10
    frame_bytes: int | None = None
    """Send raw byte chunks of this size instead (odd sizes split samples, as pipes do)."""
    speed: float = 1.0
    roster: list[dict[str, Any]] = field(default_factory=list)
    reconnect_after: float | None = None
    reconnect_delay: float = 1.0
    bot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    send_handshake: bool = True
    handshake_rate: bool = True
    on_input: Callable[[bytes, float], None] | None = None
    """Called with each binary message the gateway sends back, and its arrival time."""

    frames_sent: int = 0
    bytes_sent: int = 0
    connections: int = 0
    sent: list[tuple[int, int]] = field(default_factory=list)
    """Byte ranges of the audio actually sent, one per connection (for tests)."""
    send_times: list[float] = field(default_factory=list)
    """Monotonic send time of each frame, when ``record_times`` is set."""
    record_times: bool = False

    async def _open(self) -> ClientConnection:
        ws = await connect(self.url, compression="deflate", user_agent_header=None)
        self.connections += 1
        if self.send_handshake:
            hs: dict[str, Any] = {"protocol_version": 1, "bot_id": self.bot_id, "offset": 0.0}
            if self.handshake_rate:
                hs["sample_rate"] = self.rate
            await ws.send(json.dumps(hs))
        return ws

    async def _read_input(self, ws: ClientConnection) -> None:
        async for message in ws:
            if self.on_input is not None and isinstance(message, bytes):
                self.on_input(message, time.monotonic())

    async def run(self) -> None:
        data = self.samples.astype("<i2").tobytes()
        # Work in bytes so that odd chunk sizes are possible; 2 bytes per sample.
        frame = self.frame_bytes or 2 * max(1, self.rate * self.frame_ms // 1000)
        rate = 2 * self.rate  # bytes per second
        total = len(data)
        roster = sorted(self.roster, key=lambda r: float(r["at"]))
        ws = await self._open()
        reader = asyncio.create_task(self._read_input(ws))
        loop = asyncio.get_running_loop()
        t0, wall0 = loop.time(), time.time()
        pos = seg_start = 0
        dropped_at = self.reconnect_after
        try:
            while pos < total:
                while roster and float(roster[0]["at"]) * rate <= pos:
                    entries = stamped(roster.pop(0)["roster"], wall0 + pos / rate)
                    await ws.send(json.dumps(entries))
                if dropped_at is not None and pos >= dropped_at * rate:
                    dropped_at = None
                    self.sent.append((seg_start, pos))
                    ws.transport.abort()
                    reader.cancel()
                    await asyncio.sleep(self.reconnect_delay / self.speed)
                    ws = await self._open()
                    reader = asyncio.create_task(self._read_input(ws))
                    # The meeting went on without us: skip to "now".
                    pos = seg_start = min(
                        total, 2 * int((loop.time() - t0) * self.speed * self.rate)
                    )
                    continue
                chunk = data[pos : pos + frame]
                if self.record_times:
                    self.send_times.append(time.monotonic())
                await ws.send(chunk)
                self.frames_sent += 1
                self.bytes_sent += len(chunk)
                pos += len(chunk)
                delay = t0 + pos / (rate * self.speed) - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            self.sent.append((seg_start, pos))
        finally:
            # The newest bot ends a meeting by dropping TCP, with no close frame.
            ws.transport.abort()
            reader.cancel()


def stamped(roster: list[dict[str, Any]], when: float) -> list[dict[str, Any]]:
    """Roster entries with ``timestamp`` (wall time ``when``, epoch milliseconds) where
    they have none."""
    ms = int(when * 1000)
    return [{"timestamp": ms, **entry} for entry in roster]
