"""A bot that streams and reconnects the way a Meeting BaaS bot's streaming client does.

The bot captures meeting audio in real time whether or not its socket is open: frame
``k`` belongs to wall time ``t0 + k * frame``. While connected it sends each frame at
its time; while away it drops what it captures. After any close or failed attempt it
retries after 1 s, doubling up to 60 s, and resets the backoff on every successful open
(which is why a refusal must come before the upgrade).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

BACKOFF_FIRST = 1.0
BACKOFF_CAP = 60.0


@dataclass
class BackoffBot:
    url: str
    samples: npt.NDArray[np.int16]
    rate: int
    bot_id: str = "bot-1"
    frame_ms: int = 10
    stop_after: float | None = None
    """Leave the meeting (close) after this many seconds of meeting time."""
    roster: list[dict[str, Any]] = field(default_factory=list)
    """Roster events ``{"at": seconds, "roster": [...]}`` (as
    :meth:`~benchmarks.conversations.Conversation.roster_script` makes them), each sent
    at its meeting time while connected; one due while away is lost, as the real
    client's are."""

    attempts: list[float] = field(default_factory=list)
    """Monotonic time of every connection attempt."""
    opens: int = 0
    sent: list[tuple[int, int]] = field(default_factory=list)
    """``[first, last)`` sample ranges sent, one per connection."""
    _ws: ClientConnection | None = None

    async def run(self) -> None:
        frame = self.rate * self.frame_ms // 1000
        frames = len(self.samples) // frame
        if self.stop_after is not None:
            frames = min(frames, int(self.stop_after * 1000 / self.frame_ms))
        t0 = time.monotonic()
        connector = asyncio.create_task(self._keep_connected())
        rosters = iter(self.roster)
        due = next(rosters, None)
        try:
            for k in range(frames):
                await asyncio.sleep(max(0.0, t0 + k * self.frame_ms / 1000 - time.monotonic()))
                ws = self._ws
                while due is not None and due["at"] <= k * self.frame_ms / 1000:
                    if ws is not None:
                        stamped = [
                            {**p, "timestamp": int(time.time() * 1000)} for p in due["roster"]
                        ]
                        with contextlib.suppress(ConnectionClosed):
                            await ws.send(json.dumps(stamped))
                    due = next(rosters, None)
                if ws is None:
                    continue  # away: the bot drops what it captures
                chunk = self.samples[k * frame : (k + 1) * frame]
                try:
                    await ws.send(chunk.tobytes())
                except ConnectionClosed:
                    self._ws = None
                    continue
                first, last = self.sent[-1]
                if first < 0:  # the first frame on this socket
                    self.sent[-1] = (k * frame, (k + 1) * frame)
                else:
                    self.sent[-1] = (first, last + frame)
        finally:
            connector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await connector
            if self._ws is not None:
                await self._ws.close()

    async def _keep_connected(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            self.attempts.append(time.monotonic())
            try:
                ws = await connect(self.url, open_timeout=5)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, BACKOFF_CAP)
                continue
            backoff = BACKOFF_FIRST  # as the real client: any open resets it
            self.opens += 1
            await ws.send(
                json.dumps({"protocol_version": 1, "bot_id": self.bot_id, "sample_rate": self.rate})
            )
            self.sent.append((-1, -1))  # replaced by the first frame sent on this socket
            self._ws = ws
            with contextlib.suppress(ConnectionClosed):
                async for _ in ws:
                    pass
            self._ws = None
            if self.sent and self.sent[-1] == (-1, -1):
                self.sent.pop()
            await asyncio.sleep(backoff)
            backoff = min(2 * backoff, BACKOFF_CAP)
