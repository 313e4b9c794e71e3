"""Hundreds of simulated bots from one process, cheap enough to share a 2-core machine.

A ``websockets`` client per bot costs a coroutine wake-up and a frame encode per message,
which at 100 messages per second per bot eats the core the server under test needs.
Here each bot is a bare :class:`asyncio.Protocol`: it performs a real RFC 6455 opening
handshake (key, accept check, permessage-deflate offered as the bot does), sends the
JSON handshake as its first text frame, then writes pre-encoded masked binary frames.
One timer loop serves every bot: the bots are spread over ``phases`` slots of a frame
period, like bots whose browsers started at different moments, and each slot writes
what its bots owe by sample count against the monotonic clock, so a late wake-up sends
a burst (as the real bot does) instead of drifting. Pings are answered with pongs.

The generator measures its own lateness (actual send time against schedule): where it
falls behind, lag seen by the server is the generator's, not the server's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import numpy.typing as npt

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA
#: Lateness histogram resolution and range: 0.1 ms bins up to 2 s.
LATE_BINS_PER_S = 10_000
LATE_BINS = 2 * LATE_BINS_PER_S + 1


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame, masked with a fresh random key as RFC 6455 requires."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = os.urandom(4)
    key = np.frombuffer(mask * (n // 4 + 1), dtype=np.uint8)[:n]
    return header + mask + (np.frombuffer(payload, dtype=np.uint8) ^ key).tobytes()


def audio_frames(samples: npt.NDArray[np.int16], frame: int) -> list[bytes]:
    """The audio cut into ``frame``-sample binary frames, each masked with its own key."""
    usable = len(samples) - len(samples) % frame
    return [encode_frame(BINARY, samples[i : i + frame].tobytes()) for i in range(0, usable, frame)]


class BotConnection(asyncio.Protocol):
    """One bot's socket: the opening handshake, then frames out and control frames in."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self.request_key = base64.b64encode(os.urandom(16)).decode()
        self._request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {self.request_key}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n"
        ).encode()
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._open = False
        self.close_sent = False
        self.server_closed = False
        self.pings = 0
        #: Times the socket's send buffer passed its high-water mark: the peer is not
        #: reading as fast as we write.
        self.write_pauses = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._open:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buf[:end]).decode("latin-1")
            del self._buf[: end + 4]
            error = self._check_response(head)
            if error:
                if not self.opened.done():
                    self.opened.set_exception(ConnectionError(error))
                assert self.transport is not None
                self.transport.abort()
                return
            self._open = True
            self.opened.set_result(None)
        self._frames()

    def _check_response(self, head: str) -> str | None:
        lines = head.split("\r\n")
        if not lines[0].startswith("HTTP/1.1 101"):
            return f"handshake refused: {lines[0]!r}"
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
        accept = base64.b64encode(hashlib.sha1(self.request_key.encode() + GUID).digest())
        if headers.get("sec-websocket-accept") != accept.decode():
            return "bad Sec-WebSocket-Accept"
        if headers.get("sec-websocket-extensions"):
            # Pre-encoded frames cannot be compressed per connection.
            return "server accepted an extension; run it without compression"
        return None

    def _frames(self) -> None:
        buf = self._buf
        while len(buf) >= 2:
            opcode, n, at = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if n == 126:
                if len(buf) < 4:
                    return
                n, at = int.from_bytes(buf[2:4], "big"), 4
            elif n == 127:
                if len(buf) < 10:
                    return
                n, at = int.from_bytes(buf[2:10], "big"), 10
            if len(buf) < at + n:
                return
            payload = bytes(buf[at : at + n])
            del buf[: at + n]
            if opcode == PING:
                self.pings += 1
                self.send(encode_frame(PONG, payload))
            elif opcode == CLOSE:
                self.server_closed = True
                if not self.close_sent:
                    self.close(payload[:2])

    def send(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self, payload: bytes = b"") -> None:
        """Send a close frame; an empty payload is what older bots send (the server sees 1005)."""
        if not self.close_sent:
            self.close_sent = True
            self.send(encode_frame(CLOSE, payload))

    def pause_writing(self) -> None:
        self.write_pauses += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass(eq=False)
class Bot:
    conn: BotConnection
    key: str
    offset: int
    """Index of this bot's first audio frame, so bots do not all say the same thing."""
    bot_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    t0: float = 0.0
    frames_sent: int = 0
    rosters_sent: int = 0
    next_roster: float = 0.0


class LoadGenerator:
    """Bots connected to ``host:port`` at ``/bots/{prefix}-{i}?rate={rate}``.

    Call :meth:`connect`, then :meth:`start_audio`; :meth:`stop_audio` before
    :meth:`close`. The lateness histogram covers sends since :meth:`reset_lateness`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        frames: list[bytes],
        frame_samples: int,
        rate: int,
        *,
        prefix: str = "bench",
        phases: int = 5,
        roster_every: float = 3.0,
    ) -> None:
        self.host, self.port = host, port
        self.frames, self.frame_samples, self.rate = frames, frame_samples, rate
        self.period = frame_samples / rate
        self.early = min(0.002, self.period / phases / 2)
        self.prefix, self.phases, self.roster_every = prefix, phases, roster_every
        self.bots: list[Bot] = []
        self.late = [0] * LATE_BINS
        self._task: asyncio.Task[None] | None = None
        self._running = False

    async def connect(self, n: int, concurrency: int = 64) -> None:
        """Open ``n`` more bots; each has sent its JSON handshake when this returns."""
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        first = len(self.bots)

        async def one(i: int) -> Bot:
            key = f"{self.prefix}-{i}"
            path = f"/bots/{key}?rate={self.rate}"
            async with gate:
                _, conn = await loop.create_connection(
                    lambda: BotConnection(self.host, self.port, path), self.host, self.port
                )
                await asyncio.wait_for(conn.opened, 30)
            bot = Bot(conn, key, offset=(i * 997) % len(self.frames))
            hello = {"protocol_version": 1, "bot_id": bot.bot_id, "offset": 0.0}
            conn.send(encode_frame(TEXT, json.dumps(hello | {"sample_rate": self.rate}).encode()))
            return bot

        self.bots += await asyncio.gather(*(one(i) for i in range(first, first + n)))

    def start_audio(self) -> None:
        self._running = True
        self._task = asyncio.create_task(self._pace(), name="loadgen-pace")

    async def stop_audio(self) -> None:
        self._running = False
        if self._task is not None:
            await self._task

    def reset_lateness(self) -> None:
        self.late = [0] * LATE_BINS

    async def _pace(self) -> None:
        groups = [self.bots[p :: self.phases] for p in range(self.phases)]
        slot = self.period / self.phases
        start = time.monotonic() + 0.05
        for p, group in enumerate(groups):
            for j, bot in enumerate(group):
                bot.t0 = start + p * slot
                # Stagger roster changes so they do not all land in one tick.
                bot.next_roster = bot.t0 + self.roster_every * (1 + j / max(1, len(group)))
        tick = 0
        while self._running:
            delay = start + tick * slot - time.monotonic()
            # A negative delay still yields, so pings get answered when we run late.
            await asyncio.sleep(max(0.0, delay))
            for bot in groups[tick % self.phases]:
                self._serve(bot)
            tick += 1

    def _serve(self, bot: Bot) -> None:
        now = time.monotonic()
        k, period, late = bot.frames_sent, self.period, self.late
        due = bot.t0 + k * period
        # Timers fire up to a millisecond early (uvloop rounds to ms); a frame due that
        # soon goes now rather than a whole period late at this bot's next slot.
        horizon = now + self.early
        if due > horizon:
            return
        frames, nf, last = self.frames, len(self.frames), LATE_BINS - 1
        parts = []
        while due <= horizon:
            late[min(max(0, int((now - due) * LATE_BINS_PER_S)), last)] += 1
            parts.append(frames[(bot.offset + k) % nf])
            k += 1
            due = bot.t0 + k * period
        bot.conn.send(parts[0] if len(parts) == 1 else b"".join(parts))
        bot.frames_sent = k
        if now >= bot.next_roster:
            self._roster(bot)
            bot.next_roster += self.roster_every

    def _roster(self, bot: Bot) -> None:
        ms = int(time.time() * 1000)
        speaker = bot.rosters_sent % 2
        roster = [
            {"name": name, "id": i + 1, "timestamp": ms, "isSpeaking": i == speaker}
            | {"deviceId": f"d-{i + 1}", "isSelf": False}
            for i, name in enumerate(("Alice", "Bob"))
        ]
        bot.conn.send(encode_frame(TEXT, json.dumps(roster).encode()))
        bot.rosters_sent += 1

    async def close(self, limit: float = 30.0) -> int:
        """Close every bot with a close frame so the server reads all it was sent.

        Returns how many did not see the server close within ``limit`` seconds (then aborted).
        """
        for bot in self.bots:
            bot.conn.close()
        pending = [b.conn.closed for b in self.bots if not b.conn.closed.done()]
        if pending:
            await asyncio.wait(pending, timeout=limit)
        stuck = 0
        for bot in self.bots:
            if bot.conn.transport is not None and not bot.conn.closed.done():
                stuck += 1
                bot.conn.transport.abort()
        return stuck

    # -- results ----------------------------------------------------------------------

    @property
    def frames_sent(self) -> int:
        return sum(b.frames_sent for b in self.bots)

    @property
    def write_pauses(self) -> int:
        return sum(b.conn.write_pauses for b in self.bots)

    def lateness_ms(self) -> dict[str, float | int | None]:
        """p50, p99 and max of send lateness (ms, 0.1 ms resolution) since the reset."""
        return lateness_ms(self.late)


def lateness_ms(late: list[int]) -> dict[str, float | int | None]:
    """p50, p99 and max of a lateness histogram (ms, 0.1 ms resolution)."""
    total = sum(late)
    if not total:
        return {"p50": None, "p99": None, "max": None, "frames": 0}
    out: dict[str, float | int | None] = {"frames": total}
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        rank, seen = q * total, 0
        for i, count in enumerate(late):
            seen += count
            if seen >= rank:
                out[name] = round((i + 1) * 1000 / LATE_BINS_PER_S, 1)
                break
    top = max(i for i, count in enumerate(late) if count)
    out["max"] = round((top + 1) * 1000 / LATE_BINS_PER_S, 1)
    return out
