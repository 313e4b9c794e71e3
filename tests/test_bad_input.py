"""Bad input gets a clear close code or a counted skip, and audio already received stays."""

from __future__ import annotations

import asyncio
import json
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway import tokens
from gateway.session import Session

from .conftest import (
    GatewayFactory,
    ended_metadata,
    read_recording,
    refusals,
    refused_with,
    session_dir,
    wait_for,
)

RATE = 16000
PCM = np.arange(-8000, 8000, dtype="<i2").tobytes()  # one second


async def hello(ws: ClientConnection, rate: int = RATE) -> None:
    await ws.send(json.dumps({"protocol_version": 1, "bot_id": "b", "sample_rate": rate}))


async def closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        await ws.recv()
    return ws.close_code


async def recording_of(gw: object, key: str) -> bytes:
    directory = session_dir(gw.data_dir, key)  # type: ignore[attr-defined]
    await wait_for(lambda: ended_metadata(directory))
    return read_recording(directory)[0]


async def test_oversize_message_closes_1009_and_keeps_the_recording(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(max_message_bytes=64 * 1024)
    async with connect(gw.url("/bots/big"), max_size=None) as ws:
        await hello(ws)
        await ws.send(PCM)
        await ws.send(b"\0" * (64 * 1024 + 2))
        assert await closed_with(ws) == 1009
    assert await recording_of(gw, "big") == PCM


async def test_invalid_utf8_closes_1007_and_keeps_the_recording(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway()
    async with connect(gw.url("/bots/utf")) as ws:
        await hello(ws)
        await ws.send(PCM)
        await ws.send(b"\xff\xfe not utf-8", text=True)
        assert await closed_with(ws) == 1007
    assert await recording_of(gw, "utf") == PCM


async def test_unsupported_rate_closes_1003(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    async with connect(gw.url("/bots/rate")) as ws:
        await hello(ws, 11025)
        assert await closed_with(ws) == 1003
        assert ws.close_reason == "unsupported sample rate"


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ("{oops", "malformed_json"),
        ('[{"name": "A", "isSpeaking": "yes"}]', "bad_roster"),
        ('{"no_bot_id": true}', "bad_handshake"),
        ("12", "not_json_object_or_array"),
    ],
)
async def test_bad_text_is_counted_and_skipped(
    start_gateway: GatewayFactory, message: str, reason: str
) -> None:
    gw = await start_gateway()
    async with connect(gw.url("/bots/skip")) as ws:
        await hello(ws)
        await ws.send(PCM[: len(PCM) // 2])
        for _ in range(3):
            await ws.send(message)
        await ws.send(PCM[len(PCM) // 2 :])
        session: Session = await wait_for(lambda: gw.gateway.sessions.get("skip"))
        await wait_for(lambda: session.audio_seconds >= 1.0)
        assert session.rejected == {reason: 3}
        metric = gw.gateway.metrics.registry.get_sample_value(
            "gateway_messages_rejected_total", {"reason": reason}
        )
        assert metric == 3
    assert await recording_of(gw, "skip") == PCM


async def test_flood_of_tiny_frames_loses_nothing(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    data = np.random.default_rng(5).integers(-9000, 9000, RATE * 2, dtype=np.int16).tobytes()
    async with connect(gw.url("/bots/flood")) as ws:
        await hello(ws)
        # 16,000 messages of one sample each, then odd-sized ones, as fast as possible.
        for i in range(0, RATE * 2, 2):
            await ws.send(data[i : i + 2])
        for i in range(RATE * 2, len(data), 3):
            await ws.send(data[i : i + 3])
        session: Session = await wait_for(lambda: gw.gateway.sessions.get("flood"))
        await wait_for(lambda: session.audio_seconds * 2 * RATE >= len(data) // 2 - 1)
    assert await recording_of(gw, "flood") == data


async def test_connection_limits_refuse_before_the_upgrade(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(max_connections_per_ip=2, max_connections=3)
    async with connect(gw.url("/bots/a")), connect(gw.url("/bots/b")):
        status, headers = await refused_with(gw.url("/bots/c"))
        assert (status, headers["retry-after"]) == (429, "10")
    gw.gateway.admission.max_connections = 1
    async with connect(gw.url("/bots/a")):
        status, headers = await refused_with(gw.url("/bots/b"))
        assert (status, headers["retry-after"]) == (503, "5")
    assert refusals(gw, "overload") == 2


async def test_unknown_route_and_bad_key_refused_with_404(
    start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway()
    for path in ("/bots/a/b/c", "/bots/..", "/nothing-here", "/nothing-here"):
        assert (await refused_with(gw.url(path)))[0] == 404
    assert refusals(gw, "route") == 4
    # Logged once a minute per address, however often it retries.
    logged = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(logged) == 1


class TestTokens:
    SECRET = "s3cret"

    async def test_valid_tokens_open_their_own_role_and_key_only(
        self, start_gateway: GatewayFactory
    ) -> None:
        gw = await start_gateway(secret=self.SECRET)
        good = tokens.mint(self.SECRET, "output", "k1", 60)
        other_key = tokens.mint(self.SECRET, "output", "k2", 60)
        input_role = tokens.mint(self.SECRET, "input", "k1", 60)
        expired = tokens.mint(self.SECRET, "output", "k1", 60, now=time.time() - 3600)
        forged = tokens.mint("not the secret", "output", "k1", 60)
        statuses = [
            (await refused_with(gw.url(f"/bots/k1?token={bad}")))[0]
            for bad in ("", other_key, input_role, expired, forged, good[:-2] + "xx", "123")
        ]
        # Missing, malformed or expired: 401; a valid token for something else: 403.
        assert statuses == [401, 403, 403, 401, 403, 403, 401]
        async with connect(gw.url(f"/bots/k1?token={good}")) as ws:
            await hello(ws)
            await ws.send(PCM)
            session: Session = await wait_for(lambda: gw.gateway.sessions.get("k1"))
            await wait_for(lambda: session.audio_seconds >= 1.0)
        async with connect(gw.url(f"/bots/k1/input?token={input_role}")) as ws:
            await wait_for(lambda: session.input is not None)
        assert refusals(gw, "auth") == 7

    async def test_bare_url_refused_when_a_secret_is_set(
        self, start_gateway: GatewayFactory
    ) -> None:
        gw = await start_gateway(secret=self.SECRET)
        assert (await refused_with(gw.url("/")))[0] == 401

    async def test_session_listings_need_a_read_token(self, start_gateway: GatewayFactory) -> None:
        """With a secret, who is in which meeting is not for anyone who can reach the port."""
        gw = await start_gateway(secret=self.SECRET)
        bots = []
        for key in ("k1", "k2"):
            bots.append(
                ws := await connect(
                    gw.url(f"/bots/{key}?token={tokens.mint(self.SECRET, 'output', key, 60)}")
                )
            )
            await hello(ws)
            await ws.send(json.dumps([{"name": f"Person of {key}", "id": 1, "isSpeaking": True}]))
            await ws.send(PCM)
        # Both rosters in: a listing serves every request for a moment.
        await wait_for(lambda: [len(s.speakers.speakers) for s in gw.gateway.sessions] == [1, 1])

        def read(key: str, **kw: float) -> str:
            return tokens.mint(self.SECRET, "read", key, 60, **kw)

        async def get(path: str, token: str | None = None) -> tuple[int, object]:
            status, body = await asyncio.to_thread(_get, gw.http + path, token)
            return status, json.loads(body) if status == 200 else body

        def keys(body: object) -> list[str]:
            assert isinstance(body, list)
            return [row["key"] for row in body]

        assert await get("/sessions") == (401, "unauthorized\n")
        assert (await get("/sessions", read("*", now=time.time() - 3600)))[0] == 401
        forged = tokens.mint("not the secret", "read", "*", 60)
        assert await get("/sessions", forged) == (200, [])  # a MAC for no session: none
        assert keys((await get("/sessions", read("*")))[1]) == ["k1", "k2"]
        assert keys((await get("/sessions", self.SECRET))[1]) == ["k1", "k2"]
        status, body = await get(f"/sessions?token={read('k2')}")
        assert status == 200 and keys(body) == ["k2"]
        assert body[0]["speakers"] == ["Person of k2"]  # type: ignore[index]
        control = tokens.mint(self.SECRET, "control", "*", 60)
        assert keys((await get("/sessions", control))[1]) == []
        assert (await get("/sessions/k1/timeline"))[0] == 401
        assert (await get("/sessions/k1/timeline", read("k2")))[0] == 403
        status, body = await get("/sessions/k1/timeline", read("k1"))
        assert status == 200 and body["speakers"][0]["name"] == "Person of k1"  # type: ignore[index]
        assert (await get("/sessions/nobody/timeline", read("*")))[0] == 404
        for open_path in ("/healthz", "/readyz", "/metrics", "/page/config.json"):
            assert (await asyncio.to_thread(_get, gw.http + open_path, None))[0] == 200
        assert refusals(gw, "auth") == 4  # missing, expired, missing, another key
        # The command line mints its own read token from the secret, as `watch` does.
        listing = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "gateway", "sessions", "--url", gw.http, "--json"),
            *("--secret", self.SECRET),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await asyncio.wait_for(listing.communicate(), 30)
        assert listing.returncode == 0 and keys(json.loads(out)) == ["k1", "k2"]
        for ws in bots:
            await ws.close()

    def test_tokens_verify_in_process(self) -> None:
        token = tokens.mint(self.SECRET, "read", tokens.ANY_KEY, 60)
        tokens.verify(self.SECRET, token, "read", "any-session")
        with pytest.raises(tokens.AuthError):
            tokens.verify(self.SECRET, token, "control", "any-session")


def _get(url: str, token: str | None) -> tuple[int, str]:
    """GET from a thread (the gateway runs on the test's loop), bearing ``token``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
