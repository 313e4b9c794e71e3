"""Meetings that outlive the process: a real ``serve`` stopped by SIGTERM or killed with
SIGKILL, restarted on the same port and data directory, and a bot that reconnects with
the real client's backoff."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import os
import re
import signal
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from benchmarks import transcript_metrics as tm
from benchmarks.conversations import build
from gateway.config import Settings
from gateway.simulator import read_wav

from .backoff_bot import BackoffBot
from .conftest import (
    GatewayFactory,
    Utterance,
    ended_metadata,
    read_recording,
    session_dir,
    wait_for,
)
from .test_playback import tone
from .timing import scaled

RATE = 16000
#: How far the gateway's gap may sit from where the bot's own clock puts it: the bot's
#: frames are paced by its clock, the gap is measured by the gateway's (scheduling
#: jitter on both, and the frame in flight when the socket closed).
SLACK = 0.35


class Serve:
    """``python -m gateway serve`` in a subprocess."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.stderr = ""
        """What the process logged, once it has exited (shown when a test fails)."""

    @classmethod
    async def start(cls, data_dir: Path, port: int = 0, **env: str) -> Serve:
        environ = {
            **os.environ,
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(port),
            "GATEWAY_DATA_DIR": str(data_dir),
            "GATEWAY_PIPELINES": "recording",
            **env,
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "serve", env=environ, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stderr is not None
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), scaled(60))).decode()
            assert line, "gateway exited before listening"
            if m := re.search(r"listening on [\d.]+:(\d+)", line):
                serve = cls(proc, int(m.group(1)))
                # Keep reading stderr so the pipe never fills and blocks the gateway.
                serve._drain = asyncio.create_task(proc.stderr.read())
                return serve

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), scaled(30))
        self.stderr = (await self._drain).decode(errors="replace")
        return code


def meeting_audio(librivox: list[Utterance], seconds: float) -> np.ndarray:
    parts = [read_wav(u.path, RATE)[0] for u in librivox]
    audio = np.concatenate(parts)
    return audio[: int(seconds * RATE)]


def journal(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (directory / "journal.jsonl").read_text().splitlines()]


async def restart_mid_meeting(
    tmp_path: Path, librivox: list[Utterance], serves: list[Serve], sig: signal.Signals
) -> tuple[BackoffBot, np.ndarray, float]:
    """A 9 s meeting; the gateway is stopped by ``sig`` 3 s in and started again 1 s later
    on the same port. Returns the bot, its audio and the time the first process exited."""
    audio = meeting_audio(librivox, 12.0)
    first = await Serve.start(tmp_path)
    serves.append(first)
    bot = BackoffBot(first.url("/bots/term"), audio, RATE, stop_after=9.0)
    meeting = asyncio.create_task(bot.run())
    await asyncio.sleep(3.0)
    code = await first.stop(sig)
    assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    stopped = time.monotonic()
    await asyncio.sleep(1.0)
    second = await Serve.start(tmp_path, first.port)
    serves.append(second)
    await asyncio.wait_for(meeting, scaled(60))
    assert await second.stop() == 0
    return bot, audio, stopped


def check_one_meeting(
    tmp_path: Path, bot: BackoffBot, audio: np.ndarray, key: str = "term"
) -> dict[str, Any]:
    """One directory, one recording on one clock with the outage as silence."""
    sessions = tmp_path / "sessions"
    assert sorted(p.name for p in sessions.iterdir()) == [key]
    directory = sessions / key
    assert bot.opens == 2, bot.sent
    (a0, a1), (b0, b1) = bot.sent
    pcm, rate = read_recording(directory)
    assert rate == RATE
    recorded = np.frombuffer(pcm, dtype=np.int16)
    meta = json.loads((directory / "session.json").read_text())
    assert meta["reconnects"] == 1
    [gap] = meta["gaps"]
    # Everything the bot sent before the restart, then silence, then the rest. The file
    # starts at the first sample received (audio[a0]).
    at = gap["sample"]
    assert a1 - a0 - SLACK * RATE <= at <= a1 - a0
    assert np.array_equal(recorded[:at], audio[a0 : a0 + at])
    after = at + round(gap["seconds"] * RATE)
    assert abs(after - (b0 - a0)) <= SLACK * RATE, (after, b0 - a0)
    assert not recorded[at:after].any()
    assert np.array_equal(recorded[after:], audio[b0:b1])
    with wave.open(str(directory / "audio.wav")) as w:  # the header covers it all
        assert w.getnframes() == len(recorded)
    return meta


async def test_sigterm_then_restart_resumes_the_same_meeting(
    tmp_path: Path, librivox: list[Utterance], serves: list[Serve]
) -> None:
    bot, audio, _ = await restart_mid_meeting(tmp_path, librivox, serves, signal.SIGTERM)
    meta = check_one_meeting(tmp_path, bot, audio)
    (a0, a1), _ = bot.sent
    # The drain wrote every sample received: nothing lost at a clean stop.
    assert meta["gaps"][0]["sample"] >= a1 - a0 - 0.05 * RATE
    kinds = [r["t"] for r in journal(tmp_path / "sessions" / "term")]
    assert kinds.count("suspended") == 2  # both processes stopped with the meeting on
    assert meta["ended_at"] is None and meta["state"] == "lingering"
    # The bot was refused or failed while the gateway was down and backed off: it
    # retried after 1 s, then 2 s (never once a second for ever).
    retries = np.diff(bot.attempts)
    assert len(bot.attempts) <= 4, retries


async def test_kill_9_then_restart_resumes_the_same_meeting(
    tmp_path: Path, librivox: list[Utterance], serves: list[Serve]
) -> None:
    bot, audio, _ = await restart_mid_meeting(tmp_path, librivox, serves, signal.SIGKILL)
    meta = check_one_meeting(tmp_path, bot, audio)
    (a0, a1), _ = bot.sent
    # A kill loses at most what had not reached the recording (one 250 ms block).
    assert meta["gaps"][0]["sample"] >= a1 - a0 - 0.3 * RATE
    kinds = [r["t"] for r in journal(tmp_path / "sessions" / "term")]
    assert kinds.count("suspended") == 1  # only the second process stopped cleanly


async def test_a_bot_that_never_returns_is_finalized_after_the_linger_across_a_restart(
    tmp_path: Path, librivox: list[Utterance], serves: list[Serve]
) -> None:
    audio = meeting_audio(librivox, 2.0)
    first = await Serve.start(tmp_path, GATEWAY_LINGER="4")
    serves.append(first)
    bot = BackoffBot(first.url("/bots/gone"), audio, RATE, stop_after=1.5)
    await bot.run()
    left = time.time()
    assert await first.stop() == 0
    directory = tmp_path / "sessions" / "gone"
    assert ended_metadata(directory) is None
    second = await Serve.start(tmp_path, GATEWAY_LINGER="4")
    serves.append(second)
    deadline = time.monotonic() + scaled(15)
    while (meta := ended_metadata(directory)) is None and time.monotonic() < deadline:  # noqa: ASYNC110 - another process's file
        await asyncio.sleep(0.1)
    assert meta is not None, "never finalized"
    # Its linger ran from when the bot left, not from the restart.
    assert meta["ended_at"] - left < 4 + scaled(2)
    pcm, _ = read_recording(directory)
    ((s0, s1),) = bot.sent
    assert pcm == audio[s0:s1].tobytes()
    assert await second.stop() == 0
    assert sorted(p.name for p in (tmp_path / "sessions").iterdir()) == ["gone"]


Received = list[tuple[float, dict[str, Any]]]


async def follow(url: str, connections: list[Received], closes: list[int | None]) -> None:
    """A transcript reader that reconnects, as a captions page does, until the session
    ends: what each connection received, in ``connections``, and how it was closed."""
    while not closes or closes[-1] != 1000:
        try:
            async with connect(url, open_timeout=2) as ws:
                connections.append(received := [])
                with contextlib.suppress(ConnectionClosed):
                    async for text in ws:
                        received.append((time.time(), json.loads(text)))  # noqa: PERF401
            closes.append(ws.close_code)
        except (OSError, InvalidHandshake, TimeoutError):
            await asyncio.sleep(0.2)


async def watch(serve: Serve, key: str) -> asyncio.subprocess.Process:
    """``meeting-gateway watch KEY`` following ``serve``, its output piped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "gateway", "watch", key, "--url", f"http://127.0.0.1:{serve.port}"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


def final_words(received: Received) -> list[dict[str, Any]]:
    return [
        w
        for _, m in received
        if m.get("type") == "Results" and m["is_final"]
        for w in m["channel"]["alternatives"][0]["words"]
    ]


async def test_a_restart_mid_conversation_finalizes_what_was_heard_and_transcribes_on(
    tmp_path: Path, serves: list[Serve]
) -> None:
    # A dialogue with its roster a second late; the gateway is stopped by SIGTERM 26 s
    # in, in the middle of a turn, and started again on the same directory and port.
    conv = build("dialogue", tmp_path / "conversations", RATE)
    # The second process loads the model before it listens: the bot is away ~15 s.
    env = {"GATEWAY_PIPELINES": "recording,transcription", "GATEWAY_LINGER": "20"}
    first = await Serve.start(tmp_path, **env)
    serves.append(first)
    key = "talk"
    connections: list[Received] = []
    closes: list[int | None] = []
    url = first.url(f"/bots/{key}/transcripts")
    reader = asyncio.create_task(follow(url, connections, closes))
    # A reader of every session (a captions service): told to come back too.
    everyone: list[Received] = []
    everyone_closes: list[int | None] = []
    every = asyncio.create_task(follow(first.url("/transcripts"), everyone, everyone_closes))
    # And the terminal view, which must go on through the restart without repeating.
    watcher = await watch(first, key)
    roster = conv.roster_script(1.0)
    bot = BackoffBot(first.url(f"/bots/{key}"), conv.samples, RATE, roster=roster, stop_after=60.0)
    meeting = asyncio.create_task(bot.run())
    await asyncio.sleep(26.0)
    assert await first.stop() == 0
    second = await Serve.start(tmp_path, first.port, **env)
    serves.append(second)
    await asyncio.wait_for(meeting, scaled(60))
    directory = tmp_path / "sessions" / key
    meta = await wait_for(lambda: ended_metadata(directory), within=scaled(40))
    await asyncio.wait_for(reader, scaled(10))
    everything = final_words(connections[-1])
    await wait_for(lambda: len(final_words(everyone[-1])) >= len(everything), within=10)
    every.cancel()
    assert await second.stop() == 0
    assert everyone_closes[0] == 1012 and final_words(everyone[-1]) == everything
    assert bot.opens == 2 and meta["reconnects"] == 1
    # The session's clock starts at the first sample received, and counts the outage.
    (a0, a1), (b0, b1) = bot.sent
    away, back, left = (a1 - a0) / RATE, (b0 - a0) / RATE, (b1 - a0) / RATE
    shift = a0 / RATE
    turns = [dataclasses.replace(t, start=t.start - shift, end=t.end - shift) for t in conv.turns]
    # What was heard before the stop was final before the first process exited, and
    # the reader was told to reconnect, not that the meeting ended.
    before = final_words(connections[0])
    assert before and before[-1]["end"] > away - 1.5, (away, before[-3:])
    assert closes[0] == 1012 and closes[-1] == 1000, closes
    # The finals kept on disk: both processes', in order, none in the outage.
    lines = (directory / "transcript.jsonl").read_text().splitlines()
    finals: Received = [(0.0, json.loads(line)) for line in lines]
    words = final_words(finals)
    said = [(w["word"], w["start"]) for w in words]
    assert all(b["start"] >= a["end"] - 1e-6 for a, b in itertools.pairwise(words)), said
    assert not [w for w in words if away + 0.3 < w["start"] < back - 0.3], said
    # A reader that reconnected got them all again, those before the restart included,
    # as they were sent the first time.
    assert final_words(connections[-1]) == words

    def ids(received: Received) -> list[str]:
        return [m["metadata"]["request_id"] for _, m in received if m.get("is_final")]

    assert ids(connections[-1]) == ids(finals)
    assert ids(finals)[: len(ids(connections[0]))] == ids(connections[0])
    # The terminal printed each final once, through the restart.
    out, err = await asyncio.wait_for(watcher.communicate(), scaled(30))
    assert watcher.returncode == 0, err
    printed = [line.split("  ", 2)[2] for line in out.decode().splitlines()]
    shown = [m["channel"]["alternatives"][0]["transcript"] for _, m in finals]
    assert " ".join(printed) == " ".join(t for t in shown if t), err  # a line per turn
    heard = [t for t in turns if t.end < away - 0.3 or back + 0.3 < t.start < t.end < left - 0.3]
    s = tm.score(heard, finals, lambda t: t)
    assert s["words_matched"] >= 0.75 * s["words_expected"], said
    assert s["without_final"] == [] and s["duplicates"] == [] and s["repeats"] == [], said
    # Speakers on both sides of the restart: the second process learns the roster's lag
    # again, from rosters sent only on change.
    for side in ([t for t in heard if t.end < away], [t for t in heard if t.start > back]):
        part = tm.score(side, finals, lambda t: t)
        attribution = part["attributed"] / part["words_matched"]
        print(f"{side[0].start:.1f}-{side[-1].end:.1f} s: attribution {attribution:.3f}")
        assert attribution >= 0.9, (side[0].start, part["confusions"])
    # transcript.json holds them all, word for word.
    transcript = json.loads((directory / "transcript.json").read_text())
    written = [w for seg in transcript["transcript"] for w in seg["words"]]
    assert [round(w["start"], 2) for w in written] == [round(w["start"], 2) for w in words]


async def test_after_a_kill_9_the_terminal_view_reconnects_and_prints_each_final_once(
    tmp_path: Path, serves: list[Serve]
) -> None:
    # A conversation whose gateway is killed 14 s in and started again; `watch` sees
    # the connection lost (1006), not a close, and goes on with the next process.
    conv = build("dialogue", tmp_path / "conversations", RATE)
    env = {"GATEWAY_PIPELINES": "transcription", "GATEWAY_LINGER": "20"}
    first = await Serve.start(tmp_path, **env)
    serves.append(first)
    key = "killed"
    watcher = await watch(first, key)
    roster = conv.roster_script(0.0)
    bot = BackoffBot(first.url(f"/bots/{key}"), conv.samples, RATE, roster=roster, stop_after=36.0)
    meeting = asyncio.create_task(bot.run())
    await asyncio.sleep(14.0)
    assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    second = await Serve.start(tmp_path, first.port, **env)
    serves.append(second)
    await asyncio.wait_for(meeting, scaled(60))
    directory = tmp_path / "sessions" / key
    await wait_for(lambda: ended_metadata(directory), within=scaled(40))
    out, err = await asyncio.wait_for(watcher.communicate(), scaled(30))
    assert await second.stop() == 0
    assert watcher.returncode == 0 and b"connection was lost" in err, err
    lines = out.decode().splitlines()
    assert len(lines) == len(set(lines)), lines  # nothing printed twice
    printed = [line.split("  ", 2)[2] for line in lines]
    finals = [
        json.loads(line) for line in (directory / "transcript.jsonl").read_text().splitlines()
    ]
    shown = [m["channel"]["alternatives"][0]["transcript"] for m in finals]
    shown = [t for t in shown if t]
    # Every final kept on disk, both processes', in order (lines are turns, of several
    # finals); besides them at most the killed process's last ones, sent but never written.
    text, at = " ".join(printed), 0
    for t in shown:
        found = text.find(t, at)
        assert found >= 0, (t, printed, shown)
        at = found + len(t)
    extra = len(text.split()) - sum(len(t.split()) for t in shown)
    assert extra <= 2 * max(len(t.split()) for t in shown), (printed, shown)
    # And the second process's words are among them.
    assert bot.opens == 2
    assert [m for m in finals if m["start"] > (bot.sent[1][0] - bot.sent[0][0]) / RATE]


# -- in one process -------------------------------------------------------------------------


async def stream(url: str, audio: np.ndarray, rate: int) -> None:
    """Connect, say hello at ``rate``, send ``audio`` in real time (20 ms frames), leave."""
    frame = rate // 50
    async with connect(url) as ws:
        await ws.send(json.dumps({"protocol_version": 1, "bot_id": "b-1", "sample_rate": rate}))
        began = time.monotonic()
        for k in range(0, len(audio), frame):
            await asyncio.sleep(max(0.0, began + k / rate - time.monotonic()))
            await ws.send(audio[k : k + frame].tobytes())


def peak_hz(samples: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[int(np.argmax(spectrum))])


async def test_a_reconnect_at_another_rate_continues_the_recording_resampled(
    start_gateway: GatewayFactory,
) -> None:
    running = await start_gateway(pipelines="recording", linger=2.0)
    url = running.url("/bots/rates")
    await stream(url, tone(440, 1.0, 16000), 16000)
    await stream(url, tone(1000, 1.0, 24000), 24000)  # the bot came back at 24 kHz
    directory = session_dir(running.data_dir, "rates")
    meta = await wait_for(lambda: ended_metadata(directory), within=20)
    assert meta["sample_rate"] == 16000 and meta["reconnects"] == 1
    pcm, rate = read_recording(directory)
    recorded = np.frombuffer(pcm, dtype=np.int16)
    assert rate == 16000
    [gap] = meta["gaps"]
    second = recorded[gap["sample"] + round(gap["seconds"] * rate) :]
    # One second of 24 kHz audio became one second at 16 kHz, at its own pitch.
    assert abs(len(second) - rate) <= 0.02 * rate, len(second)
    assert abs(peak_hz(second[800:-800], rate) - 1000) < 5
    assert abs(peak_hz(recorded[800 : gap["sample"] - 800], rate) - 440) < 5
    changes = running.gateway.metrics.registry.get_sample_value(
        "gateway_session_rate_changes_total"
    )
    assert changes == 1


async def test_a_70_s_outage_resumes_with_the_default_linger(
    start_gateway: GatewayFactory,
) -> None:
    running = await start_gateway(pipelines="recording", linger=Settings().linger)
    url = running.url("/bots/outage")
    await stream(url, tone(440, 1.0, 16000), 16000)
    left = time.monotonic()
    await asyncio.sleep(70.0)
    session = running.gateway.sessions.get("outage")
    assert session is not None and session.state == "lingering"
    away = time.monotonic() - left
    await stream(url, tone(440, 1.0, 16000), 16000)
    assert session.reconnects == 1
    [gap] = session.gaps
    assert abs(gap.seconds - away) < SLACK
    assert sorted(p.name for p in (running.data_dir / "sessions").iterdir()) == ["outage"]
