"""The control endpoint and the CLI over real sockets: say, play, stop, events, tokens."""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway import tokens
from gateway.speech.playback import MAX_QUEUED

from .conftest import GatewayFactory, RunningGateway, refused_with, wait_for
from .playout import PlayoutBot
from .test_playback import live_session, tone
from .test_speech import wav_bytes

SECRET = "s3cret-for-tests"


class Control:
    """A control client that keeps every event it receives."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                assert isinstance(raw, str)
                self.events.append(json.loads(raw))
        except ConnectionClosed:
            pass

    async def send(self, message: dict[str, Any] | bytes) -> dict[str, Any]:
        """Send a request; return the reply to it (accepted, stopped or error)."""
        seen = len([e for e in self.events if e["type"] in ("accepted", "stopped", "error")])
        await self.ws.send(message if isinstance(message, bytes) else json.dumps(message))

        def reply() -> dict[str, Any] | None:
            replies = [e for e in self.events if e["type"] in ("accepted", "stopped", "error")]
            return replies[seen] if len(replies) > seen else None

        result: dict[str, Any] = await wait_for(reply)
        return result

    def of(self, uid: str) -> list[str]:
        return [e["type"] for e in self.events if e.get("id") == uid and "kind" in e]

    async def close(self) -> None:
        await self.ws.close()
        await self._reader


async def open_control(running: RunningGateway, key: str, token: str | None = None) -> Control:
    query = f"?token={token}" if token else ""
    return Control(await connect(running.url(f"/bots/{key}/control{query}")))


async def speaking_session(
    start_gateway: GatewayFactory, key: str, rate: int = 16000, **settings: Any
) -> tuple[RunningGateway, PlayoutBot]:
    running = await start_gateway(**settings)
    token = tokens.mint(SECRET, "output", key, 60) if settings.get("secret") else None
    bot = PlayoutBot(running.url(f"/bots/{key}" + (f"?token={token}" if token else "")), rate)
    await bot.start()
    await live_session(running, key)
    return running, bot


async def test_play_wav_over_the_socket_reaches_the_bot_exactly(
    start_gateway: GatewayFactory,
) -> None:
    running, bot = await speaking_session(start_gateway, "play")
    control = await open_control(running, "play")
    samples = np.random.default_rng(1).integers(-8000, 8000, 8000, dtype=np.int16)
    try:
        binary = await control.send(wav_bytes(samples, 16000))
        b64 = await control.send(
            {"type": "play", "wav": base64.b64encode(wav_bytes(samples, 16000)).decode()}
        )
        await wait_for(lambda: control.of(b64["id"])[-1:] == ["finished"])
        await wait_for(lambda: len(bot.received) >= 2 * len(samples))
    finally:
        await control.close()
        await bot.close()
    assert binary["type"] == b64["type"] == "accepted"
    assert control.of(binary["id"]) == ["queued", "started", "finished"]
    assert bot.received.tobytes() == np.concatenate([samples, samples]).tobytes()
    started = next(e for e in control.events if e["type"] == "started")
    finished = next(e for e in control.events if e["type"] == "finished")
    assert started["latency"] >= 0
    assert finished["samples"] == len(samples)
    assert finished["time"] >= started["time"]


async def test_stop_interrupts_and_cancels_the_queue(start_gateway: GatewayFactory) -> None:
    running, bot = await speaking_session(start_gateway, "stop")
    control = await open_control(running, "stop")
    listener = await open_control(running, "stop")
    try:
        first = await control.send(wav_bytes(tone(300, 5.0, 16000), 16000))
        second = await control.send(wav_bytes(tone(400, 1.0, 16000), 16000))
        await wait_for(lambda: "started" in control.of(first["id"]))
        await wait_for(lambda: len(bot.received) >= 8000)
        stopped = await control.send({"type": "stop"})
        await wait_for(lambda: "interrupted" in control.of(first["id"]))
        await wait_for(lambda: "interrupted" in listener.of(first["id"]))
    finally:
        await control.close()
        await listener.close()
        await bot.close()
    assert stopped["ids"] == [first["id"], second["id"]]
    assert control.of(second["id"]) == ["queued", "cancelled"]
    end = next(e for e in control.events if e["type"] == "interrupted")
    assert end["reason"] == "stopped"
    assert end["played_until"] - end["stop_requested"] <= 0.15
    assert len(bot.received) < 3 * 16000


@pytest.mark.parametrize(
    ("message", "error"),
    [
        ("not json", "not JSON"),
        (json.dumps([1, 2]), "JSON object"),
        (json.dumps({"type": "dance"}), "unknown request"),
        (json.dumps({"type": "say", "text": "  "}), "non-empty"),
        (json.dumps({"type": "say", "text": "x" * 5001}), "longer than"),
        (json.dumps({"type": "play", "wav": "@@@"}), "base64"),
        (json.dumps({"type": "play"}), "base64 WAV"),
        (b"RIFF not really", "WAV"),
    ],
)
async def test_bad_requests_get_an_error_and_the_socket_stays(
    start_gateway: GatewayFactory, message: str | bytes, error: str
) -> None:
    running, bot = await speaking_session(start_gateway, "bad")
    control = await open_control(running, "bad")
    try:
        await control.ws.send(message)
        await wait_for(lambda: control.events)
        stop = await control.send({"type": "stop"})
    finally:
        await control.close()
        await bot.close()
    assert control.events[0]["type"] == "error"
    assert error in control.events[0]["error"]
    assert stop == {"type": "stopped", "ids": []}
    assert bot.texts == 0 and len(bot.received) == 0


async def test_no_session_yet_is_an_error(start_gateway: GatewayFactory) -> None:
    running = await start_gateway()
    control = await open_control(running, "nobody")
    try:
        reply = await control.send({"type": "say", "text": "Hello."})
    finally:
        await control.close()
    assert reply["type"] == "error"
    assert "no live session" in reply["error"]


async def test_control_token_is_required_when_a_secret_is_set(
    start_gateway: GatewayFactory,
) -> None:
    running, bot = await speaking_session(start_gateway, "auth", secret=SECRET)
    try:
        for token, status in ((None, 401), (tokens.mint(SECRET, "read", "auth", 60), 403)):
            query = f"?token={token}" if token else ""
            assert (await refused_with(running.url(f"/bots/auth/control{query}")))[0] == status
        good = await open_control(running, "auth", tokens.mint(SECRET, "control", "auth", 60))
        reply = await good.send({"type": "stop"})
        await good.close()
    finally:
        await bot.close()
    assert reply["type"] == "stopped"


async def run_cli(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    events = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return proc.returncode, events, err.decode()


async def test_cli_play_and_stop(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    running, bot = await speaking_session(start_gateway, "cli")
    wav = tmp_path / "beep.wav"
    wav.write_bytes(wav_bytes(tone(500, 0.5, 16000), 16000))
    base = f"ws://127.0.0.1:{running.port}"
    try:
        code, events, err = await run_cli("play", "--url", base, "--key", "cli", str(wav))
        stop_code, stop_events, _ = await run_cli("stop", "--url", base, "--key", "cli")
        bad_code, _, bad_err = await run_cli("play", "--url", base, "--key", "cli", "/nonexist")
    finally:
        await bot.close()
    assert code == 0, err
    assert [e["type"] for e in events] == ["queued", "accepted", "started", "finished"]
    assert events[-1]["samples"] == 8000
    assert len(bot.received) == 8000
    assert stop_code == 0
    assert stop_events == [{"type": "stopped", "ids": []}]
    assert bad_code == 2
    assert "cannot read" in bad_err


@pytest.mark.tts
async def test_cli_say(start_gateway: GatewayFactory) -> None:
    running, bot = await speaking_session(start_gateway, "clisay", rate=24000)
    try:
        code, events, err = await run_cli(
            "say", "--url", f"ws://127.0.0.1:{running.port}", "--key", "clisay", "Hello there."
        )
    finally:
        await bot.close()
    assert code == 0, err
    assert [e["type"] for e in events][-2:] == ["started", "finished"]
    assert len(bot.received) == events[-1]["samples"] > 24000 // 2


async def test_a_full_queue_refuses_more(start_gateway: GatewayFactory) -> None:
    running, bot = await speaking_session(start_gateway, "full")
    control = await open_control(running, "full")
    clip = wav_bytes(tone(300, 2.0, 16000), 16000)
    try:
        replies = [await control.send(clip) for _ in range(MAX_QUEUED + 2)]
        stopped = await control.send({"type": "stop"})
    finally:
        await control.close()
        await bot.close()
    kinds = [r["type"] for r in replies]
    # One is playing, MAX_QUEUED wait; the next is refused and counted.
    assert kinds == ["accepted"] * (MAX_QUEUED + 1) + ["error"]
    assert "already waiting" in replies[-1]["error"]
    assert len(stopped["ids"]) == MAX_QUEUED + 1
    registry = running.gateway.metrics.registry
    assert registry.get_sample_value("gateway_speech_utterances_total", {"outcome": "refused"}) == 1
