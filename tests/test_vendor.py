"""The vendor's formats: a bot in the v2 transcription mode posts its provider's
transcript events instead of audio, and the session gets every output a transcribed one
does; subscribers may read the vendor's live shape; transcript.v2.json is the vendor's
stored shape; the handshake's start_time puts wall-clock times in the transcript."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from .conftest import GatewayFactory, ended_metadata, session_dir, wait_for
from .timing import scaled

START_MS = 1_796_000_000_000


def segment(final: bool, text: str, start: float, words: list[tuple[str, float, float]]) -> str:
    return json.dumps(
        {
            "event": "transcript.segment",
            "bot_id": "v2-bot",
            "data": {
                "text": text,
                "isFinal": final,
                "utteranceStart": start,
                "utteranceEnd": words[-1][2],
                "confidence": 0.93,
                "words": [
                    {"text": t, "start": a, "end": b, "confidence": 0.9} for t, a, b in words
                ],
                "speaker": {"name": "Alice", "id": 4},
            },
        }
    )


async def drain(ws: ClientConnection) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(Exception):
        while True:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), scaled(20))))
    return out


@pytest.mark.model
async def test_a_v2_transcription_mode_bot_gets_every_output(start_gateway: GatewayFactory) -> None:
    running = await start_gateway(pipelines="transcription")
    key = "v2-meeting"
    async with (
        connect(running.url(f"/bots/{key}/transcripts")) as deepgram,
        connect(running.url(f"/bots/{key}/transcripts?format=meetingbaas")) as vendor,
        connect(running.url(f"/bots/{key}")) as bot,
    ):
        hello = {"protocol_version": 1, "bot_id": "v2-bot", "start_time": START_MS}
        await bot.send(json.dumps(hello))
        started = {"event": "session.started", "bot_id": "v2-bot", "data": {"provider": "gladia"}}
        await bot.send(json.dumps(started))
        await bot.send(segment(False, "Hello", 1.0, [("Hello", 1.0, 1.4)]))
        await bot.send(
            segment(True, "Hello team.", 1.0, [("Hello", 1.0, 1.4), ("team.", 1.5, 1.9)])
        )
        error = {"event": "error", "bot_id": "v2-bot", "data": {"code": "quota", "message": "x"}}
        await bot.send(json.dumps(error))
        await wait_for(lambda: running.gateway.sessions.get(key) is not None)
        await bot.close()
        live = await drain(deepgram)
        shaped = await drain(vendor)
    results = [m for m in live if m["type"] == "Results"]
    assert [m["is_final"] for m in results] == [False, True]
    final = results[-1]
    assert final["speaker_name"] == "Alice" and final["speaker"] == 4
    assert final["channel"]["alternatives"][0]["transcript"] == "Hello team."
    assert [e["event"] for e in shaped] == ["transcript.segment", "transcript.segment"]
    assert [e["data"]["isFinal"] for e in shaped] == [False, True]
    assert shaped[-1]["bot_id"] == "v2-bot"
    assert shaped[-1]["data"]["speaker"] == {"name": "Alice", "id": 4}
    assert [w["text"] for w in shaped[-1]["data"]["words"]] == ["Hello", "team."]
    assert shaped[-1]["data"]["utteranceStart"] == 1.0 and shaped[-1]["data"]["utteranceEnd"] == 1.9

    directory = session_dir(running.data_dir, key)
    meta = await wait_for(lambda: ended_metadata(directory), within=20)
    assert meta["provider"] == "gladia"
    assert meta["start_time"] == START_MS / 1000
    assert meta["rejected"] == {"provider_error": 1}
    transcript = json.loads((directory / "transcript.json").read_text())
    [seg] = transcript["transcript"]
    assert (seg["speaker"], seg["start_time"]) == ("Alice", 1.0)
    assert transcript["started_at"] == START_MS / 1000
    assert seg["wall_start"] == round(START_MS / 1000 + 1.0, 3)
    captions = (directory / "transcript.vtt").read_text()
    assert captions == "WEBVTT\n\n00:00:01.000 --> 00:00:01.900\n<v Alice>Hello team.\n\n"
    v2 = json.loads((directory / "transcript.v2.json").read_text())
    assert v2 == {
        "result": {
            "utterances": [
                {
                    "start": 1.0,
                    "end": 1.9,
                    "text": "Hello team.",
                    "speaker": "Alice",
                    "language": "en",
                }
            ]
        }
    }
