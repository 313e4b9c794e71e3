"""Transcript outputs through a real gateway: subscribers, files, webhooks.

A test-local pipeline opens the outputs for each session and lets the test publish
results into them, so these tests exercise the subscriber endpoints, the files and the
webhook without the speech model. Bots and subscribers are real WebSocket clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway import tokens
from gateway.ingest.speakers import Speaker
from gateway.pipeline import Environment, Pipeline, PipelineFactory, SessionContext
from gateway.simulator import SimulatedBot, read_wav
from pipelines.transcription.formats import deepgram
from pipelines.transcription.outputs import (
    JSONL,
    MEMORY,
    TRANSCRIPT,
    SessionOutputs,
    TranscriptOutputs,
)
from pipelines.transcription.results import Result, SpeechStarted, UtteranceEnd, Word
from pipelines.transcription.webhook import SIGNATURE_HEADER, verify

from .conftest import (
    GatewayFactory,
    RunningGateway,
    Utterance,
    refused_with,
    session_dir,
    wait_for,
)
from .test_webhook import Receiver
from .timing import scaled

ALICE = Speaker("id:1", 1, "Alice", is_bot=False)
BOB = Speaker("id:2", 2, "Bob", is_bot=False)
SECRET = "gateway-secret"


class Publisher(PipelineFactory):
    """Opens the transcript outputs per session; tests publish through :attr:`sessions`."""

    name = "publisher"

    def __init__(self, env: Environment, memory: int = MEMORY) -> None:
        super().__init__(env)
        self.outputs = TranscriptOutputs(env, memory=memory)
        self.sessions: dict[str, SessionOutputs] = {}

    async def startup(self) -> None:
        await self.outputs.startup()

    async def shutdown(self) -> None:
        await self.outputs.shutdown()

    def routes(self) -> Any:
        return self.outputs.routes()

    def create(self, ctx: SessionContext) -> Pipeline:
        return _Publishing(self)


class _Publishing(Pipeline):
    def __init__(self, factory: Publisher) -> None:
        self.factory = factory
        self.key = ""

    async def start(self, ctx: SessionContext) -> None:
        self.key = ctx.key
        self.factory.sessions[ctx.key] = self.factory.outputs.open(ctx)

    async def audio(self, start: int, samples: Any) -> None:
        pass

    async def stop(self) -> None:
        await self.factory.sessions[self.key].close()


async def start(
    start_gateway: GatewayFactory, memory: int = MEMORY, **settings: Any
) -> tuple[RunningGateway, Publisher]:
    running = await start_gateway(
        factories={"publisher": lambda env: Publisher(env, memory)}, **settings
    )
    publisher = running.gateway.factories["publisher"]
    assert isinstance(publisher, Publisher)
    # The fixture registers factories after the gateway collected its routes.
    running.gateway.routes.update(publisher.routes())
    return running, publisher


def final(n: int, speaker: Speaker = ALICE, words: int = 2) -> Result:
    t = float(n)
    ws = tuple(
        Word(f"w{n}x{i}", f"W{n}x{i}.", t + i * 0.1, t + i * 0.1 + 0.1, 0.9, speaker)
        for i in range(words)
    )
    return Result(t, t + words * 0.1, ws, is_final=True, speech_final=True)


def partial(n: int) -> Result:
    w = Word(f"p{n}", f"p{n}", float(n), n + 0.1, 0.5, ALICE)
    return Result(float(n), n + 0.1, (w,), is_final=False, speech_final=False)


async def recv(ws: ClientConnection, within: float = 10.0) -> dict[str, Any]:
    async with asyncio.timeout(scaled(within)):
        message = await ws.recv()
    assert isinstance(message, str)  # subscribers get text frames
    data: dict[str, Any] = json.loads(message)
    return data


async def recv_until_closed(ws: ClientConnection, within: float = 15.0) -> list[dict[str, Any]]:
    out = []
    async with asyncio.timeout(scaled(within)):
        try:
            while True:
                out.append(json.loads(await ws.recv()))
        except ConnectionClosed:
            pass
    return out


def words_of(message: dict[str, Any]) -> list[str]:
    return [w["word"] for w in message["channel"]["alternatives"][0]["words"]]


class Bot:
    """A bot's output socket: handshake on connect, nothing else needed here."""

    def __init__(self, running: RunningGateway, key: str, query: str = "") -> None:
        self.url = running.url(f"/bots/{key}{query}")
        self.ws: ClientConnection | None = None

    async def __aenter__(self) -> Bot:
        self.ws = await connect(self.url)
        hs = {"protocol_version": 1, "bot_id": "b-1", "sample_rate": 16000}
        await self.ws.send(json.dumps(hs))
        await self.ws.send(np.zeros(1600, dtype=np.int16).tobytes())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.ws is not None
        await self.ws.close()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


def metric(running: RunningGateway, name: str, **labels: str) -> float:
    value = running.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_subscriber_waits_for_its_session_then_streams(
    start_gateway: GatewayFactory,
) -> None:
    running, pub = await start(start_gateway)
    async with connect(running.url("/bots/m1/transcripts")) as sub:
        await wait_for(lambda: metric(running, "gateway_transcript_subscribers", scope="session"))
        async with Bot(running, "m1"):
            await wait_for(lambda: "m1" in pub.sessions)
            out = pub.sessions["m1"]
            out.publish(SpeechStarted(0.5))
            out.publish(partial(1))
            out.publish(final(1))
            out.publish(UtteranceEnd(1.2))
            got = [await recv(sub) for _ in range(4)]
        rest = await recv_until_closed(sub)
        assert (sub.close_code, sub.close_reason) == (1000, "session ended")
    assert [m["type"] for m in got] == ["SpeechStarted", "Results", "Results", "UtteranceEnd"]
    assert [m["is_final"] for m in got[1:3]] == [False, True]
    assert all(m["session"] == "m1" for m in got)
    assert rest == []
    directory = session_dir(running.data_dir, "m1")
    lines = (directory / JSONL).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [got[2]]
    transcript = json.loads((directory / TRANSCRIPT).read_text())
    assert transcript["transcript"][0]["speaker"] == "Alice"
    assert [w["word"] for w in transcript["transcript"][0]["words"]] == ["W1x0.", "W1x1."]


async def test_late_subscribers_replay_finals_from_memory_and_disk(
    start_gateway: GatewayFactory,
) -> None:
    running, pub = await start(start_gateway, memory=3)
    async with Bot(running, "m2"):
        await wait_for(lambda: "m2" in pub.sessions)
        out = pub.sessions["m2"]
        for n in range(6):
            out.publish(partial(n))
            out.publish(final(n, BOB if n % 2 else ALICE))
        # Several late subscribers, each first given every final so far, in order.
        async with (
            connect(running.url("/bots/m2/transcripts")) as a,
            connect(running.url("/bots/m2/transcripts")) as b,
        ):
            for sub in (a, b):
                replay = [await recv(sub) for _ in range(6)]
                assert [m["start"] for m in replay] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
                assert all(m["is_final"] for m in replay)
                assert [m["speaker_name"] for m in replay[:2]] == ["Alice", "Bob"]
            out.publish(final(6))
            for sub in (a, b):
                live = await recv(sub)
                assert live["start"] == 6.0
                assert words_of(live) == ["w6x0", "w6x1"]


async def test_all_sessions_endpoint_tags_each_message(start_gateway: GatewayFactory) -> None:
    running, pub = await start(start_gateway)
    async with connect(running.url("/transcripts")) as sub:
        async with Bot(running, "one"), Bot(running, "two"):
            await wait_for(lambda: {"one", "two"} <= pub.sessions.keys())
            pub.sessions["one"].publish(final(1))
            async with connect(running.url("/transcripts")) as late:
                replayed = await recv(late)
                assert (replayed["session"], replayed["start"]) == ("one", 1.0)
            pub.sessions["two"].publish(final(2, BOB))
            pub.sessions["one"].publish(SpeechStarted(3.0))
            live = [await recv(sub) for _ in range(3)]
            assert [(m["session"], m["type"]) for m in live] == [
                ("one", "Results"),
                ("two", "Results"),
                ("one", "SpeechStarted"),
            ]
        # Sessions ending do not end a subscriber to every session.
        await wait_for(lambda: (session_dir(running.data_dir, "two") / TRANSCRIPT).exists())
        async with Bot(running, "three"):
            await wait_for(lambda: "three" in pub.sessions)
            pub.sessions["three"].publish(final(4))
            assert (await recv(sub))["session"] == "three"


async def test_slow_subscriber_is_dropped_without_holding_up_others(
    start_gateway: GatewayFactory,
) -> None:
    running, pub = await start(start_gateway, subscriber_queue=4)
    async with Bot(running, "m3"):
        await wait_for(lambda: "m3" in pub.sessions)
        out = pub.sessions["m3"]
        # The slow client stops reading from its socket after one message.
        async with (
            connect(running.url("/bots/m3/transcripts"), max_queue=1) as slow,
            connect(running.url("/bots/m3/transcripts"), max_size=None) as fast,
        ):
            sent = 0
            while not metric(
                running, "gateway_transcript_subscriber_drops_total", reason="queue_full"
            ):
                assert sent < 3000, "the slow subscriber was never dropped"
                out.publish(partial(sent))
                out.publish(final(sent, words=150))
                sent += 1
                # The fast subscriber keeps up: every final arrives, in order.
                message = await recv(fast)
                while not message["is_final"]:
                    message = await recv(fast)
                assert message["start"] == float(sent - 1)
            messages = await recv_until_closed(slow)
        assert (slow.close_code, slow.close_reason) == (1008, "too slow")
        assert len(messages) < 2 * sent
    assert metric(running, "gateway_transcript_subscriber_drops_total", reason="queue_full") == 1
    assert metric(running, "gateway_transcript_subscriber_skips_total") > 0
    lines = (session_dir(running.data_dir, "m3") / JSONL).read_text().splitlines()
    assert len(lines) == sent


async def test_read_token_guards_subscribers(start_gateway: GatewayFactory) -> None:
    running, pub = await start(start_gateway, secret=SECRET)
    output = tokens.mint(SECRET, "output", "m4", 60)
    assert (await refused_with(running.url("/bots/m4/transcripts")))[0] == 401
    other = tokens.mint(SECRET, "read", "other", 60)
    assert (await refused_with(running.url(f"/bots/m4/transcripts?token={other}")))[0] == 403
    read = tokens.mint(SECRET, "read", "m4", 60)
    async with (
        Bot(running, "m4", f"?token={output}"),
        connect(running.url(f"/bots/m4/transcripts?token={read}")) as sub,
    ):
        await wait_for(lambda: "m4" in pub.sessions)
        pub.sessions["m4"].publish(final(1))
        assert (await recv(sub))["session"] == "m4"


async def test_webhooks_receive_finals_and_the_transcript(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    deployment = receiver
    per_session = Receiver()
    await per_session.start()
    try:
        running, pub = await start(
            start_gateway,
            webhook_url=deployment.url,
            webhook_secret="hook-key",
            allow_session_webhooks=True,
            resume=False,  # the stop ends the meeting
        )
        async with Bot(running, "m5", f"?webhook={quote(per_session.url, safe='')}"):
            await wait_for(lambda: "m5" in pub.sessions)
            pub.sessions["m5"].publish(final(1))
            pub.sessions["m5"].publish(partial(2))  # partials are not posted
        await running.gateway.stop()  # finalizes, then waits for pending deliveries
    finally:
        await per_session.stop()
    for r in (deployment, per_session):
        bodies = [req.json() for req in r.delivered]
        assert [b["event"] for b in bodies] == ["transcript.final", "transcript.complete"]
        assert all(b["session"] == "m5" and b["bot_id"] == "b-1" for b in bodies)
        assert bodies[0]["data"]["start"] == 1.0
        assert bodies[1]["data"]["speakers"] == ["Alice"]
        assert bodies[1]["data"]["transcript"][0]["speaker"] == "Alice"
        for req in r.delivered:
            assert verify("hook-key", req.body, req.headers[SIGNATURE_HEADER.lower()])


async def test_session_webhook_ignored_unless_allowed(
    start_gateway: GatewayFactory, receiver: Receiver
) -> None:
    running, pub = await start(start_gateway)
    async with Bot(running, "m6", f"?webhook={receiver.url}"):
        await wait_for(lambda: "m6" in pub.sessions)
        pub.sessions["m6"].publish(final(1))
    await running.gateway.stop()
    assert receiver.requests == []


async def test_finals_are_on_disk_as_published_and_survive_a_restart(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    running, pub = await start(start_gateway)
    async with Bot(running, "m7"):
        await wait_for(lambda: "m7" in pub.sessions)
        for n in range(3):
            pub.sessions["m7"].publish(final(n))
        # Flushed as published: a crash from here on cannot lose them.
        directory = session_dir(running.data_dir, "m7")
        on_disk = (directory / JSONL).read_text().splitlines()
        assert [json.loads(line)["start"] for line in on_disk] == [0.0, 1.0, 2.0]
        await running.gateway.stop()  # with the meeting on: suspended, not ended
    assert not (directory / TRANSCRIPT).exists()
    # The next process resumes the meeting: its finals go on in the same file.
    again, pub2 = await start(start_gateway)
    async with Bot(again, "m7"):
        await wait_for(lambda: "m7" in pub2.sessions)
        pub2.sessions["m7"].publish(final(9))
        # A subscriber joining now replays the finals of both processes, in order.
        async with connect(again.url("/bots/m7/transcripts")) as late:
            assert [(await recv(late))["start"] for _ in range(4)] == [0.0, 1.0, 2.0, 9.0]
    await wait_for(lambda: (directory / TRANSCRIPT).exists())  # ended after the linger
    lines = [json.loads(line) for line in (directory / JSONL).read_text().splitlines()]
    assert [line["start"] for line in lines] == [0.0, 1.0, 2.0, 9.0]
    transcript = json.loads((directory / TRANSCRIPT).read_text())
    assert transcript["transcript"][-1]["end_time"] > 9.0  # built from all four
    assert not Path(f"{directory}.2").exists()  # noqa: ASYNC240 - a test's check


# -- with the real model on real speech --------------------------------------------------


def _words(message: dict[str, Any]) -> list[dict[str, Any]]:
    words: list[dict[str, Any]] = message["channel"]["alternatives"][0]["words"]
    return words


def _finals(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [m for m in messages if m["type"] == "Results" and m["is_final"]]


@pytest.mark.model
async def test_late_subscriber_and_files_with_the_real_model(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    first, second = librivox[0], librivox[3]
    a, rate = read_wav(first.path)
    b, _ = read_wav(second.path)
    pause = np.zeros(int(1.5 * rate), dtype=np.int16)
    audio = np.concatenate([pause[: rate // 2], a, pause, b, pause])
    running = await start_gateway(pipelines="transcription", linger=0.5)
    alice = [{"name": "Alice", "id": 1, "isSpeaking": True, "deviceId": "d1", "isSelf": False}]
    bot = SimulatedBot(
        url=running.url("/bots/live"),
        samples=audio,
        rate=rate,
        frame_ms=20,
        speed=1.0,  # in real time, so a late subscriber joins while it plays
        roster=[{"at": 0.0, "roster": alice}],
    )
    directory = session_dir(running.data_dir, "live")
    async with connect(running.url("/bots/live/transcripts")) as early:
        playing = asyncio.create_task(bot.run())
        seen: list[dict[str, Any]] = []
        while not _finals(seen):
            seen.append(await recv(early, within=60))
        # Already on disk when a subscriber sees it: a crash now would not lose it.
        on_disk = [json.loads(line) for line in (directory / JSONL).read_text().splitlines()]
        assert _finals(seen)[0] in on_disk
        async with connect(running.url("/bots/live/transcripts")) as late:
            await playing
            seen += await recv_until_closed(early, within=120)
            late_seen = await recv_until_closed(late, within=30)
    # The late subscriber got the finals it missed, then the rest: the same finals,
    # none twice, none lost where replay met the live stream.
    finals = _finals(seen)
    assert _finals(late_seen) == finals
    assert [json.loads(line) for line in (directory / JSONL).read_text().splitlines()] == finals
    words = [w["punctuated_word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
    transcript = json.loads((directory / TRANSCRIPT).read_text())
    assert [w["word"] for s in transcript["transcript"] for w in s["words"]] == words
    assert {s["speaker"] for s in transcript["transcript"]} == {"Alice"}
    assert transcript["speakers"] == ["Alice"]
    heard = [w["word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
    reference = f"{first.text} {second.text}".split()
    matcher = difflib.SequenceMatcher(a=reference, b=heard, autojunk=False)
    assert matcher.ratio() > 0.8, (reference, heard)
    # A restarted gateway leaves the finished session's files as they were.
    before = (directory / JSONL).read_bytes(), (directory / TRANSCRIPT).read_bytes()
    await running.gateway.stop()
    await start_gateway(pipelines="recording")
    assert ((directory / JSONL).read_bytes(), (directory / TRANSCRIPT).read_bytes()) == before


async def test_start_up_rebuilds_transcripts_a_crash_left_unwritten(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    sessions = tmp_path / "data" / "sessions"
    crashed, finished = sessions / "crashed", sessions / "finished"
    for directory in (crashed, finished):
        directory.mkdir(parents=True)
        lines = [json.dumps(deepgram(final(n, BOB if n else ALICE))) for n in range(2)]
        # The crash cut the last line short.
        (directory / JSONL).write_text("\n".join(lines) + '\n{"type": "Resu')
    (crashed / "speakers.jsonl").write_text(
        json.dumps({"seconds": 0.0, "speaker": "Carol", "speaking": True}) + "\n"
    )
    (finished / TRANSCRIPT).write_text("kept as it was\n")
    await start(start_gateway)
    transcript = json.loads((crashed / TRANSCRIPT).read_text())
    assert [s["speaker"] for s in transcript["transcript"]] == ["Alice", "Bob"]
    assert transcript["speakers"] == ["Carol", "Alice", "Bob"]
    assert (finished / TRANSCRIPT).read_text() == "kept as it was\n"


_background: set[asyncio.Task[bytes]] = set()


async def _spawn_gateway(
    data_dir: Path, linger: float = 60
) -> tuple[asyncio.subprocess.Process, int]:
    """A gateway in its own process (so it can be killed), and the port it bound."""
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "gateway", "serve", "--host", "127.0.0.1", "--port", "0"),
        *("--data-dir", str(data_dir), "--pipelines", "recording,transcription"),
        *("--linger", str(linger), "--log-format", "text"),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(scaled(120)):
        while True:
            line = (await proc.stderr.readline()).decode()
            assert line, "the gateway exited before listening"
            m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if m:
                break
    # Keep reading its log so the pipe never fills and blocks it.
    drain = asyncio.create_task(proc.stderr.read())
    _background.add(drain)
    drain.add_done_callback(_background.discard)
    return proc, int(m.group(1))


@pytest.mark.model
async def test_finals_written_survive_a_killed_gateway(
    tmp_path: Path, librivox: list[Utterance]
) -> None:
    data_dir = tmp_path / "data"
    speech, rate = read_wav(librivox[0].path)
    samples = np.concatenate([speech, np.zeros(2 * rate, dtype=np.int16)])
    proc, port = await _spawn_gateway(data_dir)
    try:
        bot = SimulatedBot(url=f"ws://127.0.0.1:{port}/bots/crash", samples=samples, rate=rate)
        async with connect(f"ws://127.0.0.1:{port}/bots/crash/transcripts") as sub:
            playing = asyncio.create_task(bot.run())
            seen: list[dict[str, Any]] = []
            while not _finals(seen):
                seen.append(await recv(sub, within=60))
            proc.kill()  # no shutdown, no finalization: as in a crash
            await proc.wait()
            seen += await recv_until_closed(sub)
            with contextlib.suppress(OSError, ConnectionClosed):
                await playing
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    directory = session_dir(data_dir, "crash")
    assert not (directory / TRANSCRIPT).exists()
    written = [json.loads(line) for line in (directory / JSONL).read_text().splitlines()]
    # Every final a subscriber saw was on disk before the process died.
    assert _finals(seen)
    assert all(m in written for m in _finals(seen))
    # The next start resumes the meeting; its bot never comes back, so it ends when its
    # linger runs out, and the transcript is built from everything written.
    proc, _ = await _spawn_gateway(data_dir, linger=1)
    try:
        await wait_for(lambda: (directory / TRANSCRIPT).exists(), within=30)
    finally:
        proc.terminate()
        await proc.wait()
    transcript = json.loads((directory / TRANSCRIPT).read_text())
    words = [w["word"] for s in transcript["transcript"] for w in s["words"]]
    assert words == [
        w["punctuated_word"] for m in written for w in m["channel"]["alternatives"][0]["words"]
    ]
