"""The bot's side of speech, for tests: a meeting bot that plays what the gateway sends.

:class:`PlayoutBot` connects like a Meeting BaaS bot (handshake, then real-time 20 ms
binary frames of the "meeting mix" on the output socket), optionally with a separate
input socket, and records every message the gateway sends back with its arrival time.
:func:`playout` replays those arrivals through the bot's player as PROTOCOL.md
describes it: 20 ms frames, playing starts once 80 ms is buffered, gaps are filled
with silence.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

Samples = npt.NDArray[np.int16]

PLAY_FRAME = 0.020
START_BUFFER = 0.080


@dataclass
class Arrival:
    at: float  # monotonic
    size: int  # bytes
    text: bool


@dataclass
class Playout:
    start: float | None
    max_queued: float
    """Most audio waiting in the bot's queue just after an arrival, seconds."""
    underruns: int
    """Play ticks that found the queue empty between the first and the last sample."""


def playout(arrivals: list[Arrival], rate: int) -> Playout:
    """Replay binary arrivals through the bot's 20 ms player with its 80 ms start buffer."""
    frame = round(PLAY_FRAME * rate)
    queued = 0
    start: float | None = None
    tick = 0.0
    max_queued = 0.0
    underruns = 0
    total = sum(a.size // 2 for a in arrivals if not a.text)
    played = 0
    for a in arrivals:
        if a.text:
            continue
        if start is not None:
            while tick <= a.at:
                if queued == 0 and played < total:
                    underruns += 1
                take = min(frame, queued)
                queued -= take
                played += take
                tick += PLAY_FRAME
        queued += a.size // 2
        if start is None and queued >= START_BUFFER * rate:
            start = tick = a.at
        max_queued = max(max_queued, queued / rate)
    return Playout(start, max_queued, underruns)


@dataclass
class PlayoutBot:
    url: str
    """The output URL (``ws://.../bots/KEY``); also the dual socket unless ``input_url``."""
    rate: int
    input_url: str | None = None
    mix: Samples = field(default_factory=lambda: np.zeros(0, dtype=np.int16))
    """Meeting audio to send after ``mix_at`` seconds of silence; silence afterwards."""
    mix_at: float = 0.0
    echo_delay: float | None = None
    """Mix what the gateway sent back into the meeting audio this much later (echo)."""
    frame_ms: int = 20
    bot_id: str = "11111111-2222-3333-4444-555555555555"

    arrivals: list[Arrival] = field(default_factory=list)
    audio: bytearray = field(default_factory=bytearray)
    mix_started: float | None = None
    """Monotonic time the first sample of ``mix`` was sent."""

    def __post_init__(self) -> None:
        self._echo: deque[int] = deque()
        self._echo_wait = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.output: ClientConnection | None = None
        self.input: ClientConnection | None = None
        self.output_messages = 0

    @property
    def received(self) -> Samples:
        return np.frombuffer(bytes(self.audio), dtype="<i2")

    @property
    def texts(self) -> int:
        return sum(a.text for a in self.arrivals)

    async def start(self) -> None:
        self.output = await connect(self.url, user_agent_header=None, compression="deflate")
        hs = {"protocol_version": 1, "bot_id": self.bot_id, "offset": 0.0, "sample_rate": self.rate}
        await self.output.send(json.dumps(hs))
        self._tasks.append(asyncio.create_task(self._send(self.output)))
        if self.input_url is None:
            self._tasks.append(asyncio.create_task(self._read(self.output)))
        else:
            self._tasks.append(asyncio.create_task(self._count_output(self.output)))
            await self.connect_input()

    async def connect_input(self) -> None:
        assert self.input_url is not None
        self.input = await connect(self.input_url, user_agent_header=None)
        self._input_reader = asyncio.create_task(self._read(self.input))
        self._tasks.append(self._input_reader)

    async def drop_input(self) -> None:
        """Kill the input socket's TCP connection with no close frame, as the bot does.

        Returns once the old socket's reader has taken every message that reached it
        before the abort, so ``received`` no longer grows from the dead connection.
        """
        assert self.input is not None
        self.input.transport.abort()
        await self._input_reader

    def roster(self, entries: list[dict[str, Any]]) -> asyncio.Future[None]:
        assert self.output is not None
        now = int(time.time() * 1000)
        return asyncio.ensure_future(
            self.output.send(json.dumps([{"timestamp": now, **e} for e in entries]))
        )

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                now = time.monotonic()
                text = isinstance(message, str)
                self.arrivals.append(Arrival(now, len(message), text))
                if not text:
                    assert isinstance(message, bytes)
                    self.audio += message
                    if self.echo_delay is not None:
                        if not self._echo:
                            self._echo_wait = round(self.echo_delay * self.rate)
                        self._echo.extend(np.frombuffer(message, dtype="<i2").tolist())
        except ConnectionClosed:
            pass

    async def _count_output(self, ws: ClientConnection) -> None:
        # With a separate input socket, nothing may come back on the output socket.
        try:
            async for _ in ws:
                self.output_messages += 1
        except ConnectionClosed:
            pass

    def _echo_frame(self, n: int) -> Samples:
        out = np.zeros(n, dtype=np.int16)
        for i in range(n):
            if self._echo_wait > 0:
                self._echo_wait -= 1
            elif self._echo:
                out[i] = self._echo.popleft()
        return out

    async def _send(self, ws: ClientConnection) -> None:
        frame = self.rate * self.frame_ms // 1000
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        pos = 0
        mix_start = round(self.mix_at * self.rate)
        try:
            while True:
                chunk = np.zeros(frame, dtype=np.int32)
                lo, hi = pos - mix_start, pos - mix_start + frame
                if hi > 0 and lo < len(self.mix):
                    part = self.mix[max(0, lo) : hi]
                    chunk[max(0, -lo) : max(0, -lo) + len(part)] += part
                    if self.mix_started is None:
                        self.mix_started = time.monotonic()
                if self.echo_delay is not None:
                    chunk += self._echo_frame(frame)
                await ws.send(np.clip(chunk, -32768, 32767).astype("<i2").tobytes())
                pos += frame
                await asyncio.sleep(max(0.0, t0 + pos / self.rate - loop.time()))
        except ConnectionClosed:
            pass

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ws in (self.output, self.input):
            if ws is not None:
                ws.transport.abort()
