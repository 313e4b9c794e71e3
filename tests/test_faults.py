"""The gateway driven as an attacker, an unlucky operator and a huge meeting would.

Every case runs over real sockets against a real gateway. What must hold whatever the
input: no connection is closed with 1011, every byte of audio the bot sent is in the
recording, and every rejection is counted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Utterance,
    ended_metadata,
    read_recording,
    session_dir,
    wait_for,
)
from .test_protocol import hostile_text
from .timing import scaled

RATE = 16000
PCM = np.arange(-8000, 8000, dtype="<i2").tobytes()  # one second
HUGE = 10**400


def count(gw: RunningGateway, name: str, **labels: str) -> float:
    value = gw.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def closed(gw: RunningGateway, code: str) -> float:
    return sum(
        count(gw, "gateway_connections_closed_total", role=role, code=code)
        for role in ("output", "input", "subscriber", "unknown")
    )


async def recording_of(gw: RunningGateway, key: str) -> tuple[bytes, dict[str, Any]]:
    directory = session_dir(gw.data_dir, key)
    meta = await wait_for(lambda: ended_metadata(directory))
    return read_recording(directory)[0], meta


def hello(bot_id: str = "b") -> str:
    return json.dumps({"protocol_version": 1, "bot_id": bot_id, "sample_rate": RATE})


# -- input that used to crash the handler -------------------------------------------------


async def test_nested_json_and_huge_numbers_keep_the_connection_and_the_audio(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway()
    hostile = [
        "[" * 100_000 + "]" * 100_000,
        json.dumps({"bot_id": "b", "sample_rate": RATE, "start_time": HUGE}),
        json.dumps({"bot_id": "b", "sample_rate": RATE, "offset": HUGE}),
        json.dumps([{"name": "A", "id": 1, "isSpeaking": True, "timestamp": HUGE}]),
        json.dumps([{"name": "A", "id": HUGE, "isSpeaking": True}]),
    ]
    async with connect(gw.url("/bots/hostile"), max_size=None) as ws:
        await ws.send(hello())
        for i, text in enumerate(hostile):
            await ws.send(PCM[i * 3200 : (i + 1) * 3200])
            await ws.send(text)
        await ws.send(PCM[len(hostile) * 3200 :])
        await wait_for(lambda: gw.gateway.sessions.get("hostile"))
    audio, meta = await recording_of(gw, "hostile")
    assert audio == PCM
    assert meta["rejected"] == {"too_deep": 1, "bad_roster": 1}
    assert closed(gw, "1011") == 0
    assert count(gw, "gateway_handler_errors_total", stage="text") == 0


keys = (f"fuzz{n}" for n in itertools.count())
frames = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=700),
        # A rate only in a handshake of our own: any other closes with 1003, by design.
        hostile_text.filter(lambda t: "sample_rate" not in t),
    ),
    max_size=25,
)


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(before=frames, after=frames)
async def test_random_frames_never_close_1011_nor_lose_audio(
    start_gateway: GatewayFactory, before: list[bytes | str], after: list[bytes | str]
) -> None:
    gw = await start_gateway()
    key = next(keys)
    sent = bytearray()
    async with connect(gw.url(f"/bots/{key}"), max_size=None) as ws:
        for frame in [*before, hello(), *after]:
            await ws.send(frame)
            if isinstance(frame, bytes):
                sent += frame
        await wait_for(lambda: gw.gateway.sessions.get(key) or not sent)
    if sent:
        audio, _ = await recording_of(gw, key)
        assert audio == bytes(sent[: len(sent) & ~1])
    assert closed(gw, "1011") == 0
    assert count(gw, "gateway_handler_errors_total", stage="text") == 0
    assert count(gw, "gateway_handler_errors_total", stage="audio") == 0


# -- a webinar's roster ------------------------------------------------------------------


def webinar_roster(people: int, turn: int, speakers: int) -> str:
    """Everyone listed; the ``turn``-th group of ``speakers`` people speaking."""
    first = turn * speakers
    return json.dumps(
        [
            {"name": f"p{i}", "id": i, "isSpeaking": first <= i - 1 < first + speakers}
            for i in range(1, people + 1)
        ],
        separators=(",", ":"),
    )


async def test_huge_rosters_are_recorded_completely(start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(max_speakers=1500, pipeline_queue=4)
    people, speakers, turns = 10_000, 1000, 8

    async def bot(key: str) -> None:
        async with connect(gw.url(f"/bots/{key}"), max_size=None) as ws:
            await ws.send(hello(key))
            for turn in range(turns):
                await ws.send(PCM[turn * 2000 : (turn + 1) * 2000])
                await ws.send(webinar_roster(people, turn, speakers))
            await ws.send(webinar_roster(people, turns, 0))  # everyone quiet
            await ws.send(PCM[turns * 2000 :])

    bots = ["web1", "web2", "web3"]
    await asyncio.gather(*(bot(key) for key in bots))
    # Each turn stops the last group and starts the next; the last message stops all.
    expected = speakers * turns * 2
    for key in bots:
        audio, meta = await recording_of(gw, key)
        assert audio == PCM
        lines = (session_dir(gw.data_dir, key) / "speakers.jsonl").read_text().splitlines()
        assert len(lines) == expected
        assert meta["roster_size"] == people
        assert len(meta["speakers"]) == 1500  # bounded; the longest silent were forgotten
        assert meta["speakers_forgotten"] == speakers * turns - 1500
        assert meta["pipelines"]["recording"]["dropped_events"] == 0
    assert count(gw, "gateway_speakers_forgotten_total") == 3 * (speakers * turns - 1500)


# -- session keys ------------------------------------------------------------------------


async def test_bot_ids_that_sanitize_alike_get_sessions_of_their_own(
    start_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    gw = await start_gateway()
    ids = ["..", ".", "/", "\x00", "a/b", "a_b", "bot", "x" * 1_000_000]

    async def bot(n: int, bot_id: str) -> None:
        async with connect(gw.url("/"), max_size=None) as ws:
            await ws.send(hello(bot_id))
            await ws.send(PCM[n * 2000 : (n + 1) * 2000])

    caplog.set_level(logging.INFO)
    await asyncio.gather(*(bot(n, bot_id) for n, bot_id in enumerate(ids)))
    await wait_for(lambda: len(list((gw.data_dir / "sessions").iterdir())) == len(ids))
    directories = sorted((gw.data_dir / "sessions").iterdir())
    assert len({d.name for d in directories}) == len(ids)
    recorded = set()
    for directory in directories:
        meta = await wait_for(lambda d=directory: ended_metadata(d))
        recorded.add(read_recording(directory)[0])
        assert len(meta["bot_id"]) < 300  # cut, and marked as cut
    assert recorded == {PCM[n * 2000 : (n + 1) * 2000] for n in range(len(ids))}
    assert closed(gw, "1001") == 0  # nobody replaced anybody
    assert max(len(r.getMessage()) for r in caplog.records) < 1000


# -- the livelock: transcription with many short, odd sessions ending ---------------------


@pytest.mark.model
async def test_short_sessions_ending_mid_speech_never_freeze_the_gateway(
    start_gateway: GatewayFactory, librivox: list[Utterance], whisper_model: Any
) -> None:
    from gateway.simulator import read_wav

    gw = await start_gateway(pipelines="recording,transcription", partial_interval=0.3)
    speech, rate = read_wav(librivox[0].path, RATE)

    async def healthy() -> None:
        # The loop must answer within a second, every time, while sessions come and go.
        for _ in range(40):
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", gw.port), scaled(5))
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await asyncio.wait_for(r.read(), scaled(5))).startswith(b"HTTP/1.1 200")
            w.close()
            await asyncio.sleep(0.25)

    async def short(n: int) -> None:
        cut = int(rate * (0.3 + (n % 7) * 0.25))
        async with connect(gw.url(f"/bots/short{n}")) as ws:
            await ws.send(hello(f"short{n}"))
            for i in range(0, cut, 1600):  # faster than real time, then gone mid-word
                await ws.send(speech[i : min(cut, i + 1600)].tobytes())
                await asyncio.sleep(0.01)

    async def churn() -> None:
        for wave in range(6):
            await asyncio.gather(*(short(wave * 8 + n) for n in range(8)))

    await asyncio.gather(healthy(), churn())
    await wait_for(lambda: not list(gw.gateway.sessions), within=60)
    assert closed(gw, "1011") == 0
