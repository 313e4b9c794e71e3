"""Soak benchmark: one long meeting, then thousands of short sessions, against the gateway.

Each phase starts its own gateway process (``serve`` on 127.0.0.1, port 0, ``--linger 1``)
and drives it with ``websockets`` bots: handshake, 20 ms frames of real speech (LibriVox,
resampled to 24 kHz with soxr, looped with pauses; or, with ``--speech dialogue``, a
conversation of the test set) on a monotonic schedule at ``speed`` times real time, a
roster (a two-speaker one every few seconds of audio; a conversation's own, marking each
turn as it is said) stamped with the meeting time of the audio it comes with, and a
normal close.

* ``meeting``: one long meeting. Gateway RSS at warm-up, at the end and its growth per
  audio-hour after warm-up; CPU; whether the finalized ``audio.wav`` is bit-identical to
  the PCM sent; drop, overrun and reject counters. With ``transcription`` among the
  pipelines, its live transcript pass by pass (:mod:`benchmarks.soak_transcript`).
* ``churn``: many short sessions, a few at a time, each with its own key. RSS before,
  peak, after the last is finalized and after ``--settle`` s (target: within 10% of start).

Prints one JSON object on stdout (``--out FILE`` writes it there too). From the repository::

    .venv/bin/python benchmarks/soak.py --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

from benchmarks import common, conversations, soak_transcript
from benchmarks.common import MIB, ServerProcess
from gateway.simulator import stamped

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
PORT_LINE = r"listening on \S+:(\d+)"
HOST = "127.0.0.1"
RATE = 24000
FRAME_MS = 20
FRAME = RATE * FRAME_MS // 1000
PAUSE_S = 0.6
ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Loop:
    """The speech the bots loop, in 20 ms frames at 24 kHz, and its words."""

    frames: list[bytes]
    words: list[str]
    turns: tuple[Any, ...] = ()
    """A conversation's turns: who says what, when."""
    rosters: dict[int, list[dict[str, Any]]] | None = None
    """A conversation's roster, by the frame of the loop it is sent before."""


def speech_loop(name: str, cache: Path = conversations.DEFAULT_CACHE) -> Loop:
    """``librivox``: every LibriVox utterance with a pause after each (read speech; the
    VAD ends each one). A conversation of the test set (``dialogue``, ``meeting``,
    ``standup``): people answering each other, the VAD rarely ends, finals come while
    they talk; its roster marks each turn on time."""
    if name != "librivox":
        conv = conversations.build(name, cache, RATE)
        frames = frames_of(conv.samples)
        last = len(frames) - 1
        rosters = {
            min(last, round(e["at"] * 1000 / FRAME_MS)): e["roster"] for e in conv.roster_script()
        }
        return Loop(frames, conv.text(), tuple(conv.turns), rosters)
    wavs = sorted(LIBRIVOX.glob("*.wav"))
    if not wavs:
        raise SystemExit(f"no speech in {LIBRIVOX}: install Debian's pocketsphinx-testdata")
    parts = []
    for path in wavs:
        with wave.open(str(path), "rb") as w:
            native = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            rate = w.getframerate()
        parts += [soxr.resample(native, rate, RATE), np.zeros(int(PAUSE_S * RATE), np.int16)]
    return Loop(frames_of(np.concatenate(parts)), soak_transcript.loop_words())


def frames_of(samples: Any) -> list[bytes]:
    clip = samples.astype("<i2")
    clip = np.concatenate([clip, np.zeros(-len(clip) % FRAME, "<i2")])  # whole frames
    return [clip[i : i + FRAME].tobytes() for i in range(0, len(clip), FRAME)]


def two_speakers(speaker: int) -> list[dict[str, Any]]:
    """Alice and Bob, ``speaker`` of them speaking."""
    return [
        {"name": name, "id": i + 1, "isSpeaking": i == speaker}
        | {"deviceId": f"d-{i + 1}", "isSelf": False}
        for i, name in enumerate(("Alice", "Bob"))
    ]


@dataclass
class Stream:
    """One bot's audio: ``count`` frames of the loop from ``start``, and what was sent."""

    frames: list[bytes]
    start: int
    count: int
    speed: float
    roster_every: int
    """Frames of audio between rosters (without ``script``)."""
    script: dict[int, list[dict[str, Any]]] | None = None
    """Rosters by frame of ``frames``, sent each time the loop passes them."""
    sent: int = 0
    rosters: int = 0
    max_late: float = 0.0
    t0: float = 0.0
    """When the first frame was due (monotonic); frame ``k`` is due ``k`` frames later."""
    digest: Any = field(default_factory=hashlib.sha256)

    def frame(self, k: int) -> bytes:
        return self.frames[(self.start + k) % len(self.frames)]

    def roster(self) -> list[dict[str, Any]] | None:
        """The roster to send before the next frame, if any."""
        if self.script is not None:
            return self.script.get((self.start + self.sent) % len(self.frames))
        if self.sent % self.roster_every == 0:
            return two_speakers(self.rosters % 2)
        return None


async def run_bot(url: str, s: Stream) -> None:
    """Handshake, then frames on a monotonic schedule with rosters, close."""
    async with connect(url, compression=None, open_timeout=30, close_timeout=30) as ws:
        hello = {"protocol_version": 1, "bot_id": os.urandom(16).hex(), "offset": 0.0}
        await ws.send(json.dumps(hello | {"sample_rate": RATE}))
        step = FRAME_MS / 1000 / s.speed
        early = min(0.001, step / 2)  # a frame due this soon goes now
        t0 = s.t0 = time.monotonic()
        wall0 = time.time()  # the meeting's time at its first frame
        while s.sent < s.count:
            now = time.monotonic()
            due = t0 + s.sent * step
            if due > now + early:
                await asyncio.sleep(due - now)
                continue
            s.max_late = max(s.max_late, now - due)
            roster = s.roster()
            if roster is not None:
                # Stamped with the meeting time of this frame, not the send time: above
                # 1x the audio runs ahead of the wall clock and the roster goes with it.
                await ws.send(json.dumps(stamped(roster, wall0 + s.sent * FRAME_MS / 1000)))
                s.rosters += 1
            data = s.frame(s.sent)
            await ws.send(data)
            s.digest.update(data)
            s.sent += 1
    # Leaving the block closes with 1000 after the server has read everything.


def start_gateway(work: Path, pipelines: str, name: str) -> ServerProcess:
    argv = [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", "0"]
    argv += ["--data-dir", str(work / f"{name}-data"), "--pipelines", pipelines]
    argv += ["--linger", "1", "--log-level", "INFO"]
    return ServerProcess(argv, work / f"{name}-gateway.log", PORT_LINE)


async def drain(port: int, limit: float) -> float:
    """Wait until ``/sessions`` is empty (every session finalized); how long that took."""
    t0 = time.monotonic()

    async def empty() -> bool:
        status, body = await common.http_get(HOST, port, "/sessions")
        return status == 200 and json.loads(body) == []

    if not await common.poll(empty, limit, interval=0.25):
        raise RuntimeError(f"sessions still open after {limit} s")
    return round(time.monotonic() - t0, 2)


async def counters(port: int) -> dict[str, float]:
    s = await common.scrape(HOST, port)
    names = "pipeline_dropped_events ring_overruns messages_rejected pipeline_errors"
    names += " gap_seconds audio_frames_received"
    names += " asr_jobs asr_skipped asr_errors transcription_rejected_segments"
    return {f"gateway_{n}": s.total(f"gateway_{n}_total") for n in names.split()}


def log_problems(path: Path) -> dict[str, Any]:
    """Counts of warning and error lines in the server log, and the first few distinct."""
    lines = path.read_text(errors="replace").splitlines()
    errors = [x for x in lines if re.search(r"\b(ERROR|CRITICAL)\b|^Traceback", x)]
    warnings = [x for x in lines if re.search(r"\bWARNING\b", x)]
    # The one-line-per-start warning about an open gateway is expected here.
    warnings = [x for x in warnings if "no GATEWAY_SECRET" not in x]
    first = list(dict.fromkeys(x[:300] for x in errors + warnings))[:8]
    return {"errors": len(errors), "warnings": len(warnings), "first": first}


def wav_data(path: Path) -> tuple[int, int]:
    """(offset, length) of a WAV file's ``data`` chunk."""
    with open(path, "rb") as f:
        riff = f.read(12)
        if riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            raise ValueError(f"{path} is not a WAV file")
        while len(head := f.read(8)) == 8:
            size = int.from_bytes(head[4:], "little")
            if head[:4] == b"data":
                return f.tell(), size
            f.seek(size + size % 2, os.SEEK_CUR)
    raise ValueError(f"{path} has no data chunk")


def compare_wav(path: Path, s: Stream) -> dict[str, Any]:
    """Whether the WAV's data chunk is the PCM sent (sha256); else its first bad 20 ms frame."""
    offset, size = wav_data(path)
    digest, sent, bad = hashlib.sha256(), s.sent * 2 * FRAME, None
    with open(path, "rb") as f:
        f.seek(offset)
        for k in range(0, size, 1 << 20):
            digest.update(f.read(min(1 << 20, size - k)))
        same = size == sent and digest.digest() == s.digest.digest()
        f.seek(offset)
        if not same:
            bad = next((k for k in range(s.sent) if f.read(2 * FRAME) != s.frame(k)), s.sent)
    return {"bit_identical": same, "wav_bytes": size, "bytes_sent": sent, "first_bad_frame": bad}


async def sampler(
    pid: int, every: float, stop: asyncio.Event, audio: Any, out: list[tuple[float, float, int]]
) -> None:
    """(monotonic time, audio seconds sent, RSS) every ``every`` seconds until ``stop``."""
    while not stop.is_set():
        out.append((time.monotonic(), float(audio()), common.rss_bytes(pid)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)


def mib(x: float) -> float:
    return round(x / MIB, 2)


async def meeting(opts: argparse.Namespace, speech: Loop, work: Path) -> dict[str, Any]:
    server = start_gateway(work, opts.meeting_pipelines, "meeting")
    try:
        port = await server.wait_port()
        key = "soak-meeting"
        count = int(opts.meeting_minutes * 60 * 1000 / FRAME_MS)
        every = max(1, int(opts.roster_every * 1000 / FRAME_MS))
        frames = speech.frames
        s = Stream(frames, 0, count, opts.speed, every, speech.rosters)
        warm_s = min(opts.warmup_minutes * 60, opts.meeting_minutes * 30)
        samples: list[tuple[float, float, int]] = []
        stop = asyncio.Event()
        rss_start = common.rss_bytes(server.pid)
        log(f"meeting: {opts.meeting_minutes} min of audio at {opts.speed}x on port {port}")
        wall = count * FRAME_MS / 1000 / opts.speed
        every_s = max(0.2, min(opts.sample_every, wall / 100))  # short runs: 100 samples
        audio = lambda: s.sent * FRAME_MS / 1000  # noqa: E731
        task = asyncio.create_task(sampler(server.pid, every_s, stop, audio, samples))
        window = common.CpuWindow(server.pid)
        limit = 3 * wall + 120
        received: soak_transcript.Received = []
        reader = None
        if "transcription" in opts.meeting_pipelines:
            ready = asyncio.Event()
            url = f"ws://{HOST}:{port}/bots/{key}/transcripts"
            reader = asyncio.create_task(soak_transcript.subscribe(url, received, ready))
            await ready.wait()
        try:
            async with asyncio.timeout(limit):
                await run_bot(f"ws://{HOST}:{port}/bots/{key}?rate={RATE}", s)
        finally:
            stop.set()
            await task
        cpu = window.finish(1)
        gw_cpu = cpu["cpu_core_pct"] * cpu["seconds"] / 100
        audio_s = s.sent * FRAME_MS / 1000
        samples.append((time.monotonic(), audio_s, common.rss_bytes(server.pid)))
        directory = work / "meeting-data" / "sessions" / key
        finalize_s = await drain(port, opts.drain_limit)
        transcript = None
        if reader is not None:
            async with asyncio.timeout(60):
                await reader  # the stream ends with the session
            transcript = soak_transcript.report(
                received,
                speech.words,
                t0=s.t0,
                speed=opts.speed,
                loop_seconds=len(frames) * FRAME_MS / 1000,
                audio_seconds=audio_s,
                bucket_seconds=opts.bucket_minutes * 60,
                turns=speech.turns,
            )
        meta = json.loads((directory / "session.json").read_text())
        rss_final = common.rss_bytes(server.pid)
        warm = next((x for x in samples if x[1] >= warm_s), samples[-1])
        after = [x for x in samples if x[1] >= warm[1]]
        end = samples[-1]
        hours = (end[1] - warm[1]) / 3600
        growth = slope = None
        if len(after) >= 3 and hours > 0:
            growth = round((end[2] - warm[2]) / MIB / hours, 2)
            fit = np.polyfit([x[1] / 3600 for x in after], [x[2] / MIB for x in after], 1)
            slope = round(float(fit[0]), 2)
        lines = (directory / "speakers.jsonl").read_text().splitlines()
        speakers = [float(json.loads(x)["seconds"]) for x in lines]
        step = max(1, len(samples) // 200)
        return {
            "pipelines": opts.meeting_pipelines,
            "audio_seconds_sent": audio_s,
            "frames_sent": s.sent,
            "rosters_sent": s.rosters,
            "sender_max_late_s": round(s.max_late, 3),
            "gateway_cpu_seconds": round(gw_cpu, 2),
            "gateway_cpu_ms_per_audio_s": round(1000 * gw_cpu / audio_s, 3),
            "cpu": cpu,
            "rss_start_mib": mib(rss_start),
            "warmup_audio_seconds": warm[1],
            "rss_warmup_mib": mib(warm[2]),
            "rss_end_mib": mib(end[2]),
            "rss_peak_mib": mib(max(x[2] for x in samples)),
            "rss_after_finalize_mib": mib(rss_final),
            "finalize_wait_seconds": finalize_s,
            "rss_growth_mib_per_audio_hour": growth,
            "rss_slope_mib_per_audio_hour": slope,
            **compare_wav(directory / "audio.wav", s),
            "session": {k: meta.get(k) for k in ("audio_seconds", "frames_received", "gaps")},
            "speaker_changes": len(speakers),
            "last_speaker_change_seconds": max(speakers, default=None),
            "metrics": await counters(port),
            "transcript": transcript,
            "log": log_problems(server.log),
            "rss_series": [[round(x[1], 1), mib(x[2])] for x in samples[::step]],
        }
    finally:
        await server.stop()


async def churn(opts: argparse.Namespace, frames: list[bytes], work: Path) -> dict[str, Any]:
    server = start_gateway(work, opts.churn_pipelines, "churn")
    try:
        port = await server.wait_port()
        n = opts.churn_sessions
        count = max(1, int(opts.session_seconds * 1000 / FRAME_MS))
        every = max(1, int(opts.roster_every * 1000 / FRAME_MS))
        await asyncio.sleep(1.0)  # start-up allocations settle
        rss_before = common.rss_bytes(server.pid)
        log(f"churn: {n} sessions of {opts.session_seconds} s, {opts.concurrency} at a time")
        gate = asyncio.Semaphore(opts.concurrency)
        failures: list[str] = []
        streams: list[Stream] = []
        limit = 2 * opts.session_seconds / opts.churn_speed + 60

        async def one(i: int, prefix: str = "churn") -> None:
            async with gate:
                s = Stream(frames, (i * 997) % len(frames), count, opts.churn_speed, every)
                if prefix == "churn":
                    streams.append(s)
                try:
                    async with asyncio.timeout(limit):
                        await run_bot(f"ws://{HOST}:{port}/bots/{prefix}-{i}?rate={RATE}", s)
                except (OSError, TimeoutError, WebSocketException) as exc:
                    failures.append(f"{prefix}-{i}: {exc!r}")

        # One-time costs (recognition lanes' first jobs, thread pools, caches) come with
        # the first sessions: a warm-up batch separates them from what churn keeps.
        rss_warm = rss_before
        if opts.churn_warmup:
            await asyncio.gather(*(one(i, "warm") for i in range(opts.churn_warmup)))
            await drain(port, opts.drain_limit)
            await asyncio.sleep(opts.settle)
            rss_warm = common.rss_bytes(server.pid)

        samples: list[tuple[float, float, int]] = []
        stop = asyncio.Event()
        task = asyncio.create_task(sampler(server.pid, 0.25, stop, lambda: len(streams), samples))
        window = common.CpuWindow(server.pid)
        try:
            await asyncio.gather(*(one(i) for i in range(n)))
            cpu = window.finish(opts.concurrency)
            drained_in = await drain(port, opts.drain_limit)
        finally:
            stop.set()
            await task
        rss_after = common.rss_bytes(server.pid)
        log(f"churn: all sessions finalized; settling {opts.settle} s")
        await asyncio.sleep(opts.settle)
        rss_settled = common.rss_bytes(server.pid)
        ratio = rss_settled / rss_before
        recorded = sum(
            1
            for d in (work / "churn-data" / "sessions").iterdir()
            if d.name.startswith("churn-") and wav_data(d / "audio.wav")[1] == 2 * FRAME * count
        )
        return {
            "pipelines": opts.churn_pipelines,
            "sessions": n,
            "failed": len(failures),
            "failures_first": failures[:5],
            "recordings_complete": recorded,
            "sender_max_late_s": round(max((s.max_late for s in streams), default=0.0), 3),
            "finalize_wait_seconds": drained_in,
            "cpu": cpu,
            "rss_before_mib": mib(rss_before),
            "rss_peak_mib": mib(max(x[2] for x in samples)),
            "rss_after_mib": mib(rss_after),
            "rss_settled_mib": mib(rss_settled),
            "settled_vs_start": round(ratio, 3),
            "target_settled_within_10pct": ratio <= 1.10,
            "warmup_sessions": opts.churn_warmup,
            "rss_warm_mib": mib(rss_warm),
            "settled_vs_warm": round(rss_settled / rss_warm, 3),
            "metrics": await counters(port),
            "log": log_problems(server.log),
            # Sessions started so far against RSS: a plateau is one-time cost, a slope a leak.
            "rss_series": [[int(x[1]), mib(x[2])] for x in samples[:: max(1, len(samples) // 100)]],
        }
    finally:
        await server.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--phase", default="meeting,churn", help="phases to run: meeting,churn")
    p.add_argument("--meeting-minutes", type=float, default=120.0, help="audio in the meeting")
    p.add_argument("--speed", type=float, default=8.0, help="meeting speed (x real time)")
    p.add_argument(
        "--speech",
        default="librivox",
        choices=["librivox", *conversations.RECIPES],
        help="what the bots loop: read speech, or a conversation of the test set",
    )
    p.add_argument(
        "--cache",
        type=Path,
        default=conversations.DEFAULT_CACHE,
        help="where conversations are built and kept",
    )
    p.add_argument("--meeting-pipelines", default="recording", help="e.g. recording,transcription")
    p.add_argument("--bucket-minutes", type=float, default=10.0, help="audio per transcript bucket")
    p.add_argument("--warmup-minutes", type=float, default=5.0, help="audio before warm-up RSS")
    p.add_argument("--sample-every", type=float, default=3.0, help="RSS sampling, wall seconds")
    p.add_argument("--roster-every", type=float, default=3.0, help="audio seconds per roster")
    p.add_argument("--churn-sessions", type=int, default=2000)
    p.add_argument("--session-seconds", type=float, default=1.0, help="audio per churn session")
    p.add_argument("--churn-speed", type=float, default=1.0, help="churn speed (x real time)")
    p.add_argument("--concurrency", type=int, default=20, help="churn sessions at once")
    p.add_argument("--churn-pipelines", default="recording,transcription")
    p.add_argument("--churn-warmup", type=int, default=20, help="sessions before the warm baseline")
    p.add_argument("--settle", type=float, default=30.0, help="seconds before the settled RSS")
    p.add_argument("--drain-limit", type=float, default=600.0, help="wait for finalize, s")
    p.add_argument("--out", type=Path, help="write the JSON here too")
    p.add_argument("--workdir", type=Path, help="where temporary data goes (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep recordings and server logs")
    opts = p.parse_args(argv)
    opts.phases = [x.strip() for x in opts.phase.split(",") if x.strip()]
    if not opts.phases or set(opts.phases) - {"meeting", "churn"}:
        p.error("--phase takes meeting, churn or both")
    positive = ("meeting_minutes", "speed", "session_seconds", "churn_speed")
    positive += ("sample_every", "bucket_minutes")
    if (
        min(getattr(opts, k) for k in positive) <= 0
        or min(opts.churn_sessions, opts.concurrency) < 1
    ):
        p.error("durations, speeds, --churn-sessions and --concurrency must be positive")
    return opts


async def amain(opts: argparse.Namespace) -> dict[str, Any]:
    speech = speech_loop(opts.speech, opts.cache)
    work = Path(tempfile.mkdtemp(prefix="soak-", dir=opts.workdir))
    result: dict[str, Any] = {
        "benchmark": "soak",
        "machine": common.machine(),
        "revision": common.revision(ROOT),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
    }
    try:
        if "meeting" in opts.phases:
            result["meeting"] = await meeting(opts, speech, work)
            m = result["meeting"]
            log(f"meeting: RSS warm-up {m['rss_warmup_mib']} MiB, end {m['rss_end_mib']} MiB")
        if "churn" in opts.phases:
            result["churn"] = await churn(opts, speech.frames, work)
    finally:
        if opts.keep:
            log(f"files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    churned, met = result.get("churn", {}), result.get("meeting", {})
    result["targets"] = {
        "churn_settled_within_10pct": churned.get("target_settled_within_10pct"),
        "meeting_wav_bit_identical": met.get("bit_identical"),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        del os.environ[name]  # the gateway must run with the settings given here only
    import uvloop

    result = uvloop.run(amain(opts))
    print(json.dumps(result), flush=True)
    if opts.out is not None:
        opts.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
