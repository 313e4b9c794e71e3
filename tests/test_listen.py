"""``/v1/listen``: Deepgram's live API, driven by the real deepgram-sdk.

The current SDK (7.x) runs in the test process; the 3.x line, which cannot share a
virtualenv with it, runs in a virtualenv of its own built once and cached
(``~/.cache/meeting-gateway/deepgram-sdk-3``), from the package registry."""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import os
import subprocess
import textwrap
import venv
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway import tokens
from gateway.simulator import SimulatedBot, read_wav

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Utterance,
    ended_metadata,
    refused_with,
    wait_for,
)
from .timing import scaled

SECRET = "dg-secret"
RATE = 16000
SDK3 = Path.home() / ".cache" / "meeting-gateway" / "deepgram-sdk-3"
PIPECAT = Path.home() / ".cache" / "meeting-gateway" / "pipecat-1.14"


def speech(librivox: list[Utterance], n: int = 2) -> tuple[np.ndarray, str]:
    """``n`` utterances with a second of silence after each, and their text."""
    parts, text = [], []
    for u in librivox[:n]:
        audio, _ = read_wav(u.path, RATE)
        parts += [audio, np.zeros(RATE, dtype=np.int16)]
        text.append(u.text)
    return np.concatenate(parts), " ".join(text)


def write_wav(path: Path, audio: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(audio.tobytes())


def similarity(reference: str, words: list[str]) -> float:
    ref = [w.strip(".,?!").lower() for w in reference.split()]
    got = [w.strip(".,?!").lower() for w in words]
    return difflib.SequenceMatcher(a=ref, b=got, autojunk=False).ratio()


def client(running: RunningGateway, key: str = SECRET) -> Any:
    from deepgram import AsyncDeepgramClient
    from deepgram.environment import DeepgramClientEnvironment

    host = running.http.removeprefix("http://")
    env = DeepgramClientEnvironment(
        base=f"http://{host}",
        production=f"ws://{host}",
        agent=f"ws://{host}",
        agent_rest=f"http://{host}",
    )
    return AsyncDeepgramClient(api_key=key, environment=env)


async def stream_with_sdk(
    running: RunningGateway, audio: np.ndarray, **options: Any
) -> list[dict[str, Any]]:
    """Stream ``audio`` through the SDK's live client in real time, then CloseStream;
    returns every message received, as dicts, until the gateway closed."""
    received: list[dict[str, Any]] = []
    async with client(running).listen.v1.connect(
        model="nova-3", encoding="linear16", sample_rate=RATE, **options
    ) as socket:

        async def read() -> None:
            with contextlib.suppress(Exception):
                async for message in socket:
                    received.append(message.model_dump())  # noqa: PERF401 - live

        reader = asyncio.create_task(read())
        frame = RATE // 50
        began = asyncio.get_running_loop().time()
        for k in range(0, len(audio), frame):
            await asyncio.sleep(max(0.0, began + k / RATE - asyncio.get_running_loop().time()))
            await socket.send_media(audio[k : k + frame].tobytes())
        await socket.send_close_stream()
        await asyncio.wait_for(reader, scaled(60))
    return received


@pytest.mark.model
async def test_the_deepgram_sdk_streams_speech_and_gets_results_metadata_and_a_close(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    running = await start_gateway(pipelines="transcription", secret=SECRET)
    audio, text = speech(librivox)
    messages = await stream_with_sdk(
        running, audio, interim_results="true", vad_events="true", utterance_end_ms="1000"
    )
    kinds = [m["type"] for m in messages]
    assert kinds[-1] == "Metadata", kinds
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    partials = [m for m in messages if m["type"] == "Results" and not m["is_final"]]
    assert finals and partials and "SpeechStarted" in kinds and "UtteranceEnd" in kinds
    words = [w["word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
    assert similarity(text, words) > 0.8, words
    request_ids = {m["metadata"]["request_id"] for m in finals}
    assert request_ids == {messages[-1]["request_id"]}
    assert messages[-1]["duration"] == pytest.approx(len(audio) / RATE, abs=0.2)
    # The session it ran as is finalized, like any other.
    assert not [s for s in running.gateway.sessions if s.key.startswith("listen-")]


@pytest.mark.model
async def test_defaults_send_finals_only_and_finalize_answers_from_finalize(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    running = await start_gateway(pipelines="transcription", secret=SECRET)
    audio, _ = speech(librivox, 1)
    voiced = audio[: len(audio) - RATE]  # no trailing silence: only Finalize ends it
    received: list[dict[str, Any]] = []
    url = running.url(f"/v1/listen?encoding=linear16&sample_rate={RATE}")
    async with connect(url, additional_headers={"Authorization": f"Token {SECRET}"}) as ws:
        for k in range(0, len(voiced), RATE // 10):
            await ws.send(voiced[k : k + RATE // 10].tobytes())
            await asyncio.sleep(0.1)
        await ws.send(json.dumps({"type": "KeepAlive"}))
        await ws.send(json.dumps({"type": "Finalize"}))
        while not any(m.get("from_finalize") for m in received):
            received.append(json.loads(await asyncio.wait_for(ws.recv(), scaled(30))))
        await ws.send(json.dumps({"type": "CloseStream"}))
        with contextlib.suppress(Exception):
            while True:
                received.append(json.loads(await asyncio.wait_for(ws.recv(), scaled(30))))
        assert ws.close_code == 1000
    assert {m["type"] for m in received} <= {"Results", "Metadata"}
    assert all(m["is_final"] for m in received if m["type"] == "Results")
    assert received[-1]["type"] == "Metadata"


@pytest.mark.model
async def test_credentials_are_checked_before_the_upgrade(start_gateway: GatewayFactory) -> None:
    without = await start_gateway(pipelines="recording", secret=SECRET)
    headers = {"Authorization": f"Token {SECRET}"}
    assert (await refused_with(without.url("/v1/listen"), additional_headers=headers))[0] == 404
    running = await start_gateway(pipelines="transcription", secret=SECRET)
    url = running.url("/v1/listen?encoding=linear16&sample_rate=16000")
    assert (await refused_with(url))[0] == 401
    bad = {"Authorization": "Token nope"}
    assert (await refused_with(url, additional_headers=bad))[0] == 401
    other = tokens.mint(SECRET, "read", "another-meeting", 60)
    follow = running.url(f"/v1/listen?session=this-meeting&token={other}")
    assert (await refused_with(follow))[0] == 403
    assert (await refused_with(running.url("/v1/listen?encoding=opus")))[0] == 400
    assert (await refused_with(running.url("/v1/listen?channels=2")))[0] == 400
    ok = [
        connect(url, additional_headers={"Authorization": f"Token {SECRET}"}),
        connect(url, additional_headers={"Authorization": f"Bearer {SECRET}"}),
        connect(url, subprotocols=["token", SECRET]),  # type: ignore[list-item]
        connect(url + f"&token={SECRET}"),
        connect(url + "&token=" + tokens.mint(SECRET, "output", tokens.ANY_KEY, 60)),
    ]
    for opening in ok:
        async with opening as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            metadata = json.loads(await asyncio.wait_for(ws.recv(), scaled(10)))
            assert metadata["type"] == "Metadata"


@pytest.mark.model
async def test_follow_a_bots_meeting_with_speaker_names(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    running = await start_gateway(pipelines="transcription")
    audio, text = speech(librivox, 1)
    alice = [{"name": "Alice", "id": 7, "isSpeaking": True, "deviceId": "d", "isSelf": False}]
    bot = SimulatedBot(
        url=running.url("/bots/meet"),
        samples=audio,
        rate=RATE,
        speed=1.0,
        roster=[{"at": 0.0, "roster": alice}],
    )
    finals: list[dict[str, Any]] = []
    async with connect(running.url("/v1/listen?session=meet")) as ws:
        await bot.run()
        await wait_for(lambda: running.gateway.sessions.get("meet") is None, within=60)
        with contextlib.suppress(Exception):
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), scaled(30)))
                if message["type"] == "Results":
                    finals.append(message)
        assert ws.close_code == 1000
    words = [w["word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
    assert similarity(text, words) > 0.8
    assert {m["metadata"]["extra"]["speaker_name"] for m in finals} == {"Alice"}
    assert {m["metadata"]["extra"]["speaker_names"] for m in finals} == {"7=Alice"}


async def read_until_closed(ws: Any, into: list[dict[str, Any]]) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for text in ws:
            into.append(json.loads(text))  # noqa: PERF401 - live


async def send_live(ws: Any, audio: np.ndarray, frame: int = RATE // 50) -> None:
    began = asyncio.get_running_loop().time()
    for k in range(0, len(audio), frame):
        await asyncio.sleep(max(0.0, began + k / RATE - asyncio.get_running_loop().time()))
        await ws.send(audio[k : k + frame].tobytes())


@pytest.mark.model
@pytest.mark.parametrize("resume", [True, False])
async def test_a_drain_mid_sentence_sends_every_client_its_last_finals_then_closes(
    start_gateway: GatewayFactory, librivox: list[Utterance], resume: bool
) -> None:
    # A Deepgram client streaming its own audio and one following a bot's meeting, both
    # mid-sentence (no pause, no Finalize, no CloseStream) when the gateway is stopped:
    # to restart with the meetings on (``resume``), or to go away, finalizing them.
    running = await start_gateway(
        pipelines="transcription", secret=SECRET, linger=30, resume=resume
    )
    audio, text = speech(librivox, 1)
    voiced = audio[: len(audio) - RATE]
    auth = {"Authorization": f"Token {SECRET}"}
    own: list[dict[str, Any]] = []
    followed: list[dict[str, Any]] = []
    url = running.url(f"/v1/listen?encoding=linear16&sample_rate={RATE}")
    async with (
        connect(url, additional_headers=auth) as streaming,
        connect(running.url("/v1/listen?session=meet"), additional_headers=auth) as following,
        connect(
            running.url(f"/bots/meet?token={tokens.mint(SECRET, 'output', 'meet', 60)}")
        ) as bot,
    ):
        readers = [
            asyncio.create_task(read_until_closed(streaming, own)),
            asyncio.create_task(read_until_closed(following, followed)),
        ]
        await bot.send(json.dumps({"protocol_version": 1, "bot_id": "b", "sample_rate": RATE}))
        await asyncio.gather(send_live(streaming, voiced), send_live(bot, voiced))
        await running.gateway.stop()
        await asyncio.wait_for(asyncio.gather(*readers), scaled(30))
        # Told to come back (service restart), or that the gateway goes away and the
        # followed meeting ended; never a close before the last finals.
        codes = (streaming.close_code, following.close_code)
        assert codes == ((1012, 1012) if resume else (1001, 1000))
    assert own[-1]["type"] == "Metadata"
    assert resume or followed[-1]["type"] == "Metadata"
    for received in (own, followed):
        finals = [m for m in received if m["type"] == "Results" and m["is_final"]]
        words = [w["word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
        # Every word, the last ones (still open at the stop) included.
        assert similarity(text, words) > 0.8, words
        assert similarity(" ".join(text.split()[-3:]), words[-3:]) > 0.6, words
    # The client's own session ended; the bot's is kept for the next process, or ended.
    sessions = running.data_dir / "sessions"
    (own_dir,) = [d for d in sessions.iterdir() if d.name.startswith("listen-")]
    assert ended_metadata(own_dir) is not None
    assert (ended_metadata(sessions / "meet") is None) == resume


def _venv_python(where: Path, requirement: str) -> Path:
    """A virtualenv with ``requirement`` (built once, from the package registry)."""
    python = where / "bin" / "python"
    ready = where / ".ready"
    if not ready.exists():
        venv.create(where, with_pip=True, clear=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", requirement],
            check=True,
            timeout=900,
        )
        ready.touch()
    return python


def _sdk3_python() -> Path:
    return _venv_python(SDK3, "deepgram-sdk==3.11.0")


SDK3_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys, wave
    from deepgram import DeepgramClient, DeepgramClientOptions, LiveOptions, LiveTranscriptionEvents

    async def main(url, key, path):
        config = DeepgramClientOptions(url=url, options={"keepalive": "false"})
        dg = DeepgramClient(key, config)
        conn = dg.listen.asyncwebsocket.v("1")
        out = []
        async def on_results(_, result, **kwargs):
            alt = result.channel.alternatives[0]
            out.append({"type": "Results", "is_final": result.is_final,
                        "words": [w.word for w in alt.words],
                        "extra": result.metadata.extra})
        async def on_metadata(_, metadata, **kwargs):
            out.append({"type": "Metadata", "request_id": metadata.request_id})
        conn.on(LiveTranscriptionEvents.Transcript, on_results)
        conn.on(LiveTranscriptionEvents.Metadata, on_metadata)
        ok = await conn.start(LiveOptions(model="nova-2", encoding="linear16",
                                          sample_rate=16000, channels=1))
        assert ok, "the SDK could not connect"
        with wave.open(path) as w:
            pcm = w.readframes(w.getnframes())
        for k in range(0, len(pcm), 3200):
            await conn.send(pcm[k:k + 3200])
            await asyncio.sleep(0.1)
        await asyncio.sleep(2)
        await conn.finish()
        print(json.dumps(out))

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.model
async def test_the_deepgram_sdk_3_line_reads_results_and_speaker_names(
    start_gateway: GatewayFactory, librivox: list[Utterance], tmp_path: Path
) -> None:
    python = await asyncio.to_thread(_sdk3_python)
    running = await start_gateway(pipelines="transcription", secret=SECRET)
    audio, text = speech(librivox, 1)
    path = tmp_path / "speech.wav"
    write_wav(path, audio)
    host = running.http.removeprefix("http://")
    script = tmp_path / "sdk3.py"
    script.write_text(SDK3_CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(script),
        f"http://{host}",
        SECRET,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), scaled(120))
    assert proc.returncode == 0, err.decode()[-2000:]
    messages = json.loads(out.decode().strip().splitlines()[-1])
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    words = [w for m in finals for w in m["words"]]
    assert similarity(text, words) > 0.8, words
    assert messages[-1]["type"] == "Metadata"
    assert all("speaker_name" in m["extra"] for m in finals)


PIPECAT_CLIENT = textwrap.dedent(
    """
    import asyncio, json, sys, wave
    from pipecat.frames.frames import InputAudioRawFrame, TranscriptionFrame
    from pipecat.pipeline.task import PipelineParams
    from pipecat.services.deepgram.stt import DeepgramSTTService
    from pipecat.tests.utils import SleepFrame, run_test

    async def main(base_url, key, path):
        with wave.open(path) as w:
            pcm, rate = w.readframes(w.getnframes()), w.getframerate()
        stt = DeepgramSTTService(api_key=key, base_url=base_url, sample_rate=rate)
        chunk, frames = rate // 50 * 2, []
        for k in range(0, len(pcm), chunk):
            frames.append(InputAudioRawFrame(audio=pcm[k:k + chunk], sample_rate=rate,
                                             num_channels=1))
            frames.append(SleepFrame(sleep=0.02))
        frames.append(SleepFrame(sleep=4.0))
        down, _ = await run_test(stt, frames_to_send=frames,
                                 pipeline_params=PipelineParams(audio_in_sample_rate=rate))
        print(json.dumps([f.text for f in down if isinstance(f, TranscriptionFrame)]))

    asyncio.run(main(*sys.argv[1:]))
    """
)


@pytest.mark.model
async def test_pipecats_deepgram_service_transcribes_through_the_gateway(
    start_gateway: GatewayFactory, librivox: list[Utterance], tmp_path: Path
) -> None:
    """pipecat's own DeepgramSTTService (pipecat-ai 1.14 in a virtualenv of its own),
    pointed at the gateway with ``base_url``, gets TranscriptionFrames of real speech."""
    python = await asyncio.to_thread(_venv_python, PIPECAT, "pipecat-ai[deepgram]==1.14.0")
    running = await start_gateway(pipelines="transcription", secret=SECRET)
    audio, text = speech(librivox, 1)
    path = tmp_path / "speech.wav"
    write_wav(path, audio)
    script = tmp_path / "pipecat_client.py"
    script.write_text(PIPECAT_CLIENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = await asyncio.create_subprocess_exec(
        *(str(python), str(script), running.http, SECRET, str(path)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(), scaled(180))
    assert proc.returncode == 0, err.decode()[-2000:]
    texts = json.loads(out.decode().strip().splitlines()[-1])
    assert similarity(text, " ".join(texts).split()) > 0.6, texts
