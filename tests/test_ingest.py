"""A bot streams a meeting into a real gateway over a real socket; every sample is kept."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from gateway import http
from gateway.simulator import SimulatedBot, read_wav

from .conftest import (
    GatewayFactory,
    Utterance,
    ended_metadata,
    read_recording,
    session_dir,
    wait_for,
)
from .timing import scaled


async def fetch(url: str) -> tuple[int, str]:
    """GET from a thread: the server under test runs on this event loop."""
    return await asyncio.to_thread(_get, url)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=scaled(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
@pytest.mark.parametrize(
    "chunk",
    [{"frame_ms": 10}, {"frame_ms": 40}, {"frame_ms": 100}, {"frame_bytes": 333}],
    ids=["10ms", "40ms", "100ms", "odd333B"],
)
async def test_recording_is_bit_identical(
    start_gateway: GatewayFactory,
    librivox: list[Utterance],
    rate: int,
    chunk: dict[str, Any],
) -> None:
    gw = await start_gateway()
    samples, _ = read_wav(librivox[1].path, rate)
    bot = SimulatedBot(gw.url(f"/bots/k{rate}"), samples, rate, speed=20.0, **chunk)
    await bot.run()
    directory = session_dir(gw.data_dir, f"k{rate}")
    meta = await wait_for(lambda: ended_metadata(directory))
    pcm, wav_rate = read_recording(directory)
    sent = samples.tobytes()
    assert wav_rate == rate
    # An odd total leaves one byte that never completed a sample.
    assert pcm == sent[: len(sent) & ~1]
    assert meta["sample_rate"] == rate
    assert meta["bytes_received"] == len(sent)
    assert meta["frames_received"] == bot.frames_sent
    assert meta["bot_id"] == bot.bot_id
    assert [c["close_code"] for c in meta["connections"]] == [1006]


async def test_reconnect_resumes_one_recording_with_the_gap_filled(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    gw = await start_gateway(linger=5.0)
    rate = 16000
    samples, _ = read_wav(librivox[3].path, rate)  # about 6 s
    bot = SimulatedBot(
        gw.url("/bots/meeting"), samples, rate, reconnect_after=2.0, reconnect_delay=1.0
    )
    await bot.run()
    session = gw.gateway.sessions.get("meeting")
    assert session is not None
    await gw.gateway.sessions.finalize(session)
    directory = session_dir(gw.data_dir, "meeting")
    meta = ended_metadata(directory)
    assert meta is not None
    pcm, _ = read_recording(directory)
    audio = np.frombuffer(pcm, dtype="<i2")
    data = samples.tobytes()
    (a0, a1), (b0, b1) = bot.sent
    (gap,) = meta["gaps"]
    assert meta["reconnects"] == 1
    assert [c["close_code"] for c in meta["connections"]] == [1006, 1006]
    # The bot was away about a second (its first backoff step) plus connecting.
    assert 0.8 <= gap["seconds"] <= 1.6
    assert gap["sample"] == (a1 - a0) // 2
    # Before the gap: exactly what was sent. In the gap: silence. After: the rest.
    first = audio[: gap["sample"]].tobytes()
    assert first == data[a0:a1]
    resumed_at = gap["sample"] + round(gap["seconds"] * rate)
    assert not audio[gap["sample"] : resumed_at].any()
    assert audio[resumed_at:].tobytes() == data[b0:b1]
    # Recording time stays meeting time: the file is as long as the meeting was.
    assert abs(len(audio) / rate - len(samples) / rate) < 0.35


async def test_speaker_timeline_follows_the_roster(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    gw = await start_gateway()
    samples, rate = read_wav(librivox[0].path, 24000)  # about 7 s
    script = [
        {"at": 0.5, "roster": [{"name": "Alice", "id": 1, "isSpeaking": True}]},
        {
            "at": 2.0,
            "roster": [
                {"name": "Alice", "id": 1, "isSpeaking": False},
                {"name": "Bob", "id": 2, "isSpeaking": True},
            ],
        },
        {"at": 3.0, "roster": [{"name": "Alice", "id": 1, "isSpeaking": False}]},
    ]
    bot = SimulatedBot(gw.url("/bots/roster"), samples[: rate * 4], rate, roster=script)
    await bot.run()
    directory = session_dir(gw.data_dir, "roster")
    meta = await wait_for(lambda: ended_metadata(directory))
    lines = [json.loads(x) for x in (directory / "speakers.jsonl").read_text().splitlines()]
    got = [(x["speaker"], x["speaking"]) for x in lines]
    assert got == [("Alice", True), ("Alice", False), ("Bob", True), ("Bob", False)]
    expected = [0.5, 2.0, 2.0, 3.0]
    for line, at in zip(lines, expected, strict=True):
        assert line["seconds"] == pytest.approx(at, abs=0.15)
    assert [s["name"] for s in meta["speakers"]] == ["Alice", "Bob"]


async def test_bare_url_keys_by_bot_id_and_resumes(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    gw = await start_gateway(linger=5.0)
    samples, rate = read_wav(librivox[1].path, 24000)
    first = SimulatedBot(gw.url("/"), samples[:rate], rate, speed=10.0, bot_id="bot/../1")
    await first.run()
    second = SimulatedBot(gw.url("/"), samples[rate:], rate, speed=10.0, bot_id="bot/../1")
    await second.run()
    (session,) = list(gw.gateway.sessions)
    assert session.key == "~mjxxilzofyxtc"  # encoded before it names a directory
    assert session.reconnects == 1
    assert session.directory.parent == gw.data_dir / "sessions"


async def test_handshake_twice_and_rate_from_url(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway()
    async with connect(gw.url("/bots/old?rate=16000")) as ws:
        hello = json.dumps({"protocol_version": 1, "bot_id": "b", "offset": 0.0})
        await ws.send(hello)
        await ws.send(hello)
        await ws.send(np.ones(1600, dtype="<i2").tobytes())
        session = await wait_for(lambda: gw.gateway.sessions.get("old"))
        await wait_for(lambda: session.audio_seconds >= 0.1)
        assert session.sample_rate == 16000
        assert session.bot_id == "b"
        assert session.rejected == {}


async def test_operator_endpoints(start_gateway: GatewayFactory, librivox: list[Utterance]) -> None:
    gw = await start_gateway()
    assert await fetch(gw.http + "/healthz") == (200, "ok\n")
    assert await fetch(gw.http + "/readyz") == (200, "ready\n")
    assert (await fetch(gw.http + "/nope"))[0] == 404
    samples, rate = read_wav(librivox[1].path, 24000)
    roster = [{"at": 0.0, "roster": [{"name": "Alice", "id": 1, "isSpeaking": True}]}]
    async with connect(gw.url("/bots/ops")) as ws:
        await ws.send(json.dumps({"bot_id": "b-ops", "sample_rate": rate}))
        await ws.send(json.dumps(roster[0]["roster"]))
        await ws.send(samples[:rate].tobytes())
        session = await wait_for(lambda: gw.gateway.sessions.get("ops"))
        await wait_for(lambda: session.audio_seconds >= 1.0)
        status, body = await fetch(gw.http + "/sessions")
        assert status == 200
        (listed,) = json.loads(body)
        assert listed["key"] == "ops"
        assert listed["bot_id"] == "b-ops"
        assert listed["sample_rate"] == rate
        assert listed["connected"] is True
        assert listed["state"] == "live"
        assert listed["audio_seconds"] == pytest.approx(1.0)
        assert listed["speakers"] == ["Alice"]
        assert listed["gaps"] == []
        status, text = await fetch(gw.http + "/metrics")
        assert status == 200
        assert 'gateway_connections{role="output"} 1.0' in text
        assert "gateway_audio_received_seconds_total 1.0" in text
        assert 'gateway_sessions{state="live"} 1.0' in text
        # Never a session key or a speaker name in a label.
        assert "ops" not in text.replace("gateway_", "")
        assert "Alice" not in text


async def test_one_listing_answers_every_page_for_a_moment(
    start_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Open pages each ask for the sessions every second; with a thousand meetings a
    listing costs the loop tens of milliseconds, so one serves them all for a moment."""
    gw = await start_gateway()

    async def listed() -> list[str]:
        status, body = await fetch(gw.http + "/sessions")
        assert status == 200
        return [row["key"] for row in json.loads(body)]

    monkeypatch.setattr(http, "LISTING_TTL", 3600.0)
    async with connect(gw.url("/bots/first")) as first:
        await first.send(json.dumps({"bot_id": "b1", "sample_rate": 16000}))
        await wait_for(lambda: gw.gateway.sessions.get("first"))
        assert await listed() == ["first"]
        async with connect(gw.url("/bots/second")) as second:
            await second.send(json.dumps({"bot_id": "b2", "sample_rate": 16000}))
            await wait_for(lambda: gw.gateway.sessions.get("second"))
            assert await listed() == ["first"]  # the listing of a moment ago
            monkeypatch.setattr(http, "LISTING_TTL", 0.0)
            assert await listed() == ["first", "second"]
