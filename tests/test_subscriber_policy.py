"""The slow-subscriber policy: readers that fall behind are closed, counted and logged.

A subscriber that stops reading can hide in kernel socket buffers for minutes without
its message queue filling; the lag watch finds it by how long its pings go unanswered.
The pure decisions (:class:`LagWatch`) are tested on a simulated clock; the rest over
real sockets on 127.0.0.1 port 0: a :class:`SubscriberHub` behind a plain websockets
server (so the tests choose the keepalive and close timeouts), and the gateway itself.
Never-reading subscribers are raw TCP clients with a small receive buffer that complete
the WebSocket handshake and then read nothing until the test looks at what they got.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.config import KEEPALIVE_TIMEOUT, Settings
from gateway.errors import ConfigError
from pipelines.transcription.backpressure import DEFAULT_MAX_LAG, MAX_LAG_LIMIT, LagWatch
from pipelines.transcription.subscribers import DROP_REASONS, SubscriberHub

from .conftest import GatewayFactory, wait_for
from .test_transcript_outputs import Bot, final, start
from .timing import scaled

LOGGER = "pipelines.transcription.subscribers"
DROPS = "gateway_transcript_subscriber_drops_total"

# -- the pure policy ---------------------------------------------------------------------


def test_pings_on_schedule_and_lags_by_the_oldest_unanswered_ping() -> None:
    watch = LagWatch(10.0, now=100.0)
    assert watch.interval == 5.0
    assert watch.ping_due(100.0)
    first = watch.sent(100.0)
    assert not watch.ping_due(104.9)
    assert watch.wake_at() == 105.0
    assert watch.lag(103.0) == 3.0
    second = watch.sent(105.0)  # pings go out whether or not earlier ones came back
    third = watch.sent(110.0)
    assert watch.unanswered == 3
    assert watch.wake_at() == 110.0  # the first ping's deadline
    assert watch.lagging(110.0)
    # A pong answers its ping and every earlier one; a late pong for an earlier ping
    # changes nothing.
    watch.answered(second)
    watch.answered(first)
    assert watch.unanswered == 1
    assert watch.lag(112.0) == 2.0
    assert not watch.lagging(119.99)
    assert watch.lagging(120.0)
    watch.answered(third)
    assert watch.lag(500.0) == 0.0
    assert not watch.lagging(500.0)
    assert watch.wake_at() == 115.0


def test_max_lag_must_be_positive() -> None:
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="max_lag"):
            LagWatch(bad, now=0.0)
        with pytest.raises(ValueError, match="max_lag"):
            SubscriberHub(CollectorRegistry(), capacity=1, memory=1, max_lag=bad)


def _drop_time(max_lag: float, stop: float, rtt: float, t0: float) -> float:
    """Drive a watch the way the hub does, for a reader that answers every ping ``rtt``
    after it was sent until it stops reading at ``stop``; return when it is dropped."""
    watch = LagWatch(max_lag, now=t0)
    pongs: list[tuple[float, int]] = []  # (arrival, ping), arrivals in order
    now = t0
    for _ in range(100_000):
        while pongs and pongs[0][0] <= now:
            watch.answered(pongs.pop(0)[1])
        if watch.lagging(now):
            return now
        if watch.ping_due(now):
            ping = watch.sent(now)
            if now + rtt <= stop:  # read before the reader stopped: answered
                pongs.append((now + rtt, ping))
        wake = watch.wake_at()
        now = min(wake, pongs[0][0]) if pongs else wake
    raise AssertionError("never dropped")


@given(
    max_lag=st.floats(0.05, MAX_LAG_LIMIT),
    stop=st.floats(0.0, 100.0),
    rtt_share=st.floats(0.0, 0.99),
    t0=st.floats(-50.0, 50.0),
)
def test_a_reader_that_stops_is_dropped_within_one_and_a_half_max_lag(
    max_lag: float, stop: float, rtt_share: float, t0: float
) -> None:
    rtt = rtt_share * max_lag
    dropped = _drop_time(max_lag, t0 + stop, rtt, t0)
    # Not while it kept up (every ping back within max_lag), soon after it stopped.
    assert dropped >= t0 + stop
    assert dropped - (t0 + stop) <= LagWatch(max_lag, now=0.0).detects_within + 1e-9


def test_a_reader_that_keeps_up_is_never_dropped() -> None:
    # Pongs just under max_lag late, for an hour of pings.
    watch = LagWatch(2.0, now=0.0)
    pending: list[tuple[float, int]] = []
    now = 0.0
    while now < 3600:
        while pending and pending[0][0] <= now:
            watch.answered(pending.pop(0)[1])
        assert not watch.lagging(now)
        if watch.ping_due(now):
            pending.append((now + 1.99, watch.sent(now)))
        now = min(watch.wake_at(), pending[0][0]) if pending else watch.wake_at()


def test_the_policy_always_acts_before_the_keepalive() -> None:
    # websockets fails a connection whose ping is KEEPALIVE_TIMEOUT s unanswered. Our
    # first ping after the keepalive's is sent within one interval and waits at least as
    # long, so the policy drops the reader by interval + max_lag after that ping: at the
    # largest max_lag allowed that still leaves a margin for a busy event loop.
    worst = LagWatch(MAX_LAG_LIMIT, now=0.0).detects_within
    assert worst <= KEEPALIVE_TIMEOUT - 2
    Settings(subscriber_max_lag=MAX_LAG_LIMIT).validate()
    for bad in (0.0, -1.0, MAX_LAG_LIMIT + 0.01, float("nan")):
        with pytest.raises(ConfigError, match="subscriber_max_lag"):
            Settings(subscriber_max_lag=bad).validate()
    assert Settings().subscriber_max_lag == DEFAULT_MAX_LAG


# -- raw clients that never read -----------------------------------------------------------


@dataclass
class NeverReads:
    """A WebSocket client that completes the handshake, then reads nothing (until asked)."""

    port: int
    path: str
    rcvbuf: int = 4096
    sock: socket.socket = field(init=False)

    async def __aenter__(self) -> NeverReads:
        loop = asyncio.get_running_loop()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        # Small, so the server's kernel buffers and then its own fill up quickly.
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        self.sock.setblocking(False)
        await loop.sock_connect(self.sock, ("127.0.0.1", self.port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        await loop.sock_sendall(self.sock, request.encode())
        response = b""
        while not response.endswith(b"\r\n\r\n"):  # byte by byte: leave frames unread
            chunk = await loop.sock_recv(self.sock, 1)
            assert chunk, f"connection closed during the handshake: {response!r}"
            response += chunk
        assert response.startswith(b"HTTP/1.1 101"), response
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def frames_until_close(self, within: float = 5.0) -> list[tuple[int, bytes]]:
        """Now read: every frame up to and including the server's close frame."""
        loop = asyncio.get_running_loop()
        buffer = b""
        frames: list[tuple[int, bytes]] = []
        async with asyncio.timeout(scaled(within)):
            while not frames or frames[-1][0] != 0x8:
                chunk = await loop.sock_recv(self.sock, 65536)
                assert chunk, f"connection ended without a close frame after {frames[-3:]}"
                buffer += chunk
                while (parsed := _frame(buffer)) is not None:
                    opcode, payload, buffer = parsed
                    frames.append((opcode, payload))
        return frames


def _frame(buffer: bytes) -> tuple[int, bytes, bytes] | None:
    """One unmasked server frame off the front of ``buffer``: opcode, payload, rest."""
    if len(buffer) < 2:
        return None
    opcode, length, at = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
    if length == 126:
        if len(buffer) < 4:
            return None
        (length,), at = struct.unpack("!H", buffer[2:4]), 4
    elif length == 127:
        if len(buffer) < 10:
            return None
        (length,), at = struct.unpack("!Q", buffer[2:10]), 10
    if len(buffer) < at + length:
        return None
    return opcode, buffer[at : at + length], buffer[at + length :]


def _close_frame(frames: list[tuple[int, bytes]]) -> tuple[int, str]:
    opcode, payload = frames[-1]
    assert opcode == 0x8
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


# -- a hub behind a plain websockets server -------------------------------------------------


@dataclass
class Hub:
    hub: SubscriberHub
    registry: CollectorRegistry
    port: int
    served: list[ServerConnection]
    finished: list[ServerConnection]

    def drops(self, reason: str) -> float:
        return self.registry.get_sample_value(DROPS, {"reason": reason}) or 0.0

    def url(self, key: str) -> str:
        return f"ws://127.0.0.1:{self.port}/{key}"


@contextlib.asynccontextmanager
async def hub_server(*, max_lag: float, capacity: int = 256, **server: Any) -> AsyncIterator[Hub]:
    """A hub serving ``/{key}`` (one session) and ``/`` (all) on 127.0.0.1 port 0."""
    registry = CollectorRegistry()
    hub = SubscriberHub(registry, capacity=capacity, memory=100, max_lag=max_lag)
    served: list[ServerConnection] = []
    finished: list[ServerConnection] = []

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None
        served.append(ws)
        await hub.serve(ws, ws.request.path.strip("/") or None)
        finished.append(ws)

    async with serve(handler, "127.0.0.1", 0, **server) as listening:
        port = next(iter(listening.sockets)).getsockname()[1]
        yield Hub(hub, registry, port, served, finished)
    await hub.shutdown()


def _text(n: int, size: int = 200) -> str:
    return json.dumps({"type": "Results", "n": n, "pad": "x" * size})


def _drop_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= 30]


async def test_a_subscriber_that_never_reads_is_dropped_as_lagging_and_a_reader_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    max_lag = 1.0
    async with hub_server(max_lag=max_lag, close_timeout=5) as h:
        channel = h.hub.open("m1", tmp_path / "m1.jsonl")
        received: list[int] = []
        async with connect(h.url("m1")) as reader:

            async def read() -> None:
                with contextlib.suppress(ConnectionClosed):
                    async for message in reader:
                        received.append(json.loads(message)["n"])  # noqa: PERF401 - as they come

            reading = asyncio.create_task(read())
            loop = asyncio.get_running_loop()
            async with NeverReads(h.port, "/m1") as silent:
                await wait_for(lambda: len(h.served) == 2)
                began = loop.time()
                published = 0
                # A quiet meeting: a small final every 50 ms, far from filling any queue.
                while not h.drops("lagging"):
                    assert loop.time() - began < scaled(10), (
                        "the silent subscriber was never dropped"
                    )
                    h.hub.publish(channel, _text(published), final=True, partial=False)
                    published += 1
                    await asyncio.sleep(0.05)
                took = loop.time() - began
                # The policy acted in time, and without a queue ever filling.
                assert took <= LagWatch(max_lag, 0.0).detects_within + scaled(0.5)
                assert {r: h.drops(r) for r in DROP_REASONS} == {
                    "queue_full": 0,
                    "lagging": 1,
                    "keepalive": 0,
                }
                # The silent subscriber's stream ends with 1008 "too slow" (pings and the
                # messages before it are still in its socket buffer).
                frames = await silent.frames_until_close()
                assert _close_frame(frames) == (1008, "too slow")
                assert {opcode for opcode, _ in frames} <= {0x1, 0x8, 0x9}
                assert 0x9 in {opcode for opcode, _ in frames}  # it was pinged
            # The reader kept everything, in order, and still does.
            await wait_for(lambda: len(received) == published)
            h.hub.publish(channel, _text(published), final=True, partial=False)
            await wait_for(lambda: len(received) == published + 1)
            assert received == list(range(published + 1))
            assert reader.state is State.OPEN
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        assert h.drops("lagging") == 1
    warnings = _drop_warnings(caplog)
    assert len(warnings) == 1
    assert "session m1" in warnings[0]
    assert "lagging" in warnings[0]


async def test_a_subscriber_behind_a_full_socket_is_dropped_and_disconnected(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Enough to fill every buffer: the sender waits in send() and the lag watch's own
    # ping waits behind it. Neither may keep the connection, nor the close frame that
    # can never be delivered, from ending it.
    caplog.set_level(logging.WARNING, LOGGER)
    async with (
        hub_server(max_lag=1.0, capacity=10_000, close_timeout=0.5) as h,
        NeverReads(h.port, "/"),  # every session
    ):
        channel = h.hub.open("m2", tmp_path / "m2.jsonl")
        await wait_for(lambda: h.served)
        ws = h.served[0]
        n = 0
        while ws.transport.get_write_buffer_size() <= 32 * 1024:  # writing paused
            h.hub.publish(channel, _text(n, 64 * 1024), final=True, partial=False)
            n += 1
            await asyncio.sleep(0.01)
            assert n < 1000, "the server's send buffer never filled"
        await wait_for(lambda: h.finished, within=5)
        assert ws.state is State.CLOSED
        assert {r: h.drops(r) for r in DROP_REASONS} == {
            "queue_full": 0,
            "lagging": 1,
            "keepalive": 0,
        }
    warnings = _drop_warnings(caplog)
    assert len(warnings) == 1
    assert "every session" in warnings[0]


async def test_a_full_queue_is_dropped_as_queue_full(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    async with hub_server(max_lag=10.0, capacity=2) as h:
        channel = h.hub.open("m3", tmp_path / "m3.jsonl")
        async with NeverReads(h.port, "/m3") as silent:
            await wait_for(lambda: h.served)
            for n in range(4):  # without yielding: nothing is sent, the queue overflows
                h.hub.publish(channel, _text(n), final=True, partial=False)
            assert _close_frame(await silent.frames_until_close()) == (1008, "too slow")
        assert h.drops("queue_full") == 1
        assert h.drops("lagging") == 0
    warnings = _drop_warnings(caplog)
    assert len(warnings) == 1
    assert "session m3" in warnings[0]
    assert "queue_full" in warnings[0]


async def test_a_keepalive_timeout_is_counted_not_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A policy too lenient to act (max_lag beyond what the settings allow) and a fast
    # keepalive: the keepalive fails the connection, and that is a drop too.
    caplog.set_level(logging.WARNING, LOGGER)
    keepalive = {"ping_interval": 0.2, "ping_timeout": 0.3, "close_timeout": 0.2}
    async with hub_server(max_lag=60.0, **keepalive) as h:
        async with NeverReads(h.port, "/m4"):
            await wait_for(lambda: h.finished, within=5)
        assert h.served[0].protocol.close_sent is not None
        assert h.served[0].protocol.close_sent.code == 1011
        assert {r: h.drops(r) for r in DROP_REASONS} == {
            "queue_full": 0,
            "lagging": 0,
            "keepalive": 1,
        }
    warnings = _drop_warnings(caplog)
    assert len(warnings) == 1
    assert "session m4" in warnings[0]
    assert "keepalive" in warnings[0]


async def test_subscribers_that_leave_normally_are_not_drops(tmp_path: Path) -> None:
    async with hub_server(max_lag=0.2) as h:
        channel = h.hub.open("m5", tmp_path / "m5.jsonl")
        async with connect(h.url("m5")) as sub:
            h.hub.publish(channel, _text(0), final=True, partial=False)
            assert json.loads(await sub.recv())["n"] == 0
            await wait_for(lambda: h.served[0].latency > 0)  # it answers pings
        await wait_for(lambda: h.finished)
        h.hub.close(channel)
        assert sum(h.drops(r) for r in DROP_REASONS) == 0


# -- through the gateway ---------------------------------------------------------------------


async def test_the_gateway_drops_a_silent_subscriber_by_its_setting(
    start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, LOGGER)
    running, pub = await start(start_gateway, subscriber_max_lag=1.0)
    hub = pub.outputs.hub
    assert hub.max_lag == 1.0, "TranscriptOutputs must pass settings.subscriber_max_lag on"

    def drops(reason: str) -> float:
        value = running.gateway.metrics.registry.get_sample_value(DROPS, {"reason": reason})
        return value or 0.0

    async with (
        Bot(running, "g1"),
        connect(running.url("/bots/g1/transcripts")) as reader,
        NeverReads(running.port, "/bots/g1/transcripts") as silent,
    ):
        await wait_for(lambda: "g1" in pub.sessions)
        pub.sessions["g1"].publish(final(1))
        assert json.loads(await reader.recv())["start"] == 1.0
        await wait_for(lambda: drops("lagging"), within=LagWatch(1.0, 0.0).detects_within + 2)
        assert _close_frame(await silent.frames_until_close()) == (1008, "too slow")
        pub.sessions["g1"].publish(final(2))
        assert json.loads(await reader.recv())["start"] == 2.0
    assert drops("lagging") == 1
    assert drops("queue_full") == drops("keepalive") == 0
    warnings = _drop_warnings(caplog)
    assert len(warnings) == 1
    assert "session g1" in warnings[0]
