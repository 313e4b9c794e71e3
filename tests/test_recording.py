"""Crash safety of the WAV recording, and how often the session files are rewritten."""

from __future__ import annotations

import json
import wave
from collections import Counter
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.metrics import Metrics
from gateway.session import Session
from pipelines.wav import WavWriter, repair, wav_header

from .conftest import GatewayFactory

T0 = 1_800_000_000.0


def test_header_is_valid_while_recording(tmp_path: Path) -> None:
    path = tmp_path / "audio.wav"
    writer = WavWriter(path, 16000, refresh_samples=1600)
    writer.write(np.arange(4000, dtype=np.int16))
    # Not closed: the file plays up to the last refresh (every 1,600 samples here).
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000
        assert w.getnframes() == 4000
    writer.write(np.arange(100, dtype=np.int16))
    writer.close()
    with wave.open(str(path)) as w:
        assert w.getnframes() == 4100


def crashed_recording(directory: Path, samples: np.ndarray, odd_tail: bool) -> None:
    directory.mkdir(parents=True)
    data = samples.astype("<i2").tobytes() + (b"\x01" if odd_tail else b"")
    # The header says 0 samples: the process died before its first refresh.
    (directory / "audio.wav").write_bytes(wav_header(24000, 0) + data)
    (directory / "session.json").write_text(json.dumps({"key": directory.name, "ended_at": None}))


def test_repair_covers_every_complete_sample(tmp_path: Path) -> None:
    samples = np.random.default_rng(2).integers(-5000, 5000, 24000, dtype=np.int16)
    crashed_recording(tmp_path / "a", samples, odd_tail=True)
    (fixed,) = repair(tmp_path)
    assert fixed == (tmp_path / "a" / "audio.wav", 24000)
    with wave.open(str(tmp_path / "a" / "audio.wav")) as w:
        assert w.getnframes() == 24000
        assert w.readframes(24000) == samples.tobytes()
    assert json.loads((tmp_path / "a" / "session.json").read_text())["recovered"] is True
    assert repair(tmp_path) == []  # a healthy file is left alone


async def test_gateway_repairs_at_start_up(start_gateway: GatewayFactory, tmp_path: Path) -> None:
    samples = np.arange(-3000, 3000, dtype=np.int16)
    directory = tmp_path / "data" / "sessions" / "crashed"
    crashed_recording(directory, samples, odd_tail=False)
    gw = await start_gateway()
    with wave.open(str(directory / "audio.wav")) as w:
        assert w.readframes(w.getnframes()) == samples.tobytes()
    # A bot coming back with the same key gets a new directory; the old one is kept.
    assert gw.gateway.sessions.open("crashed", {}).directory.name == "crashed.2"


async def test_meetings_that_start_together_rewrite_session_json_apart(tmp_path: Path) -> None:
    """Each live session rewrites its ``session.json`` every few seconds; sessions that
    started in the same instant spread those writes over the interval instead of
    encoding them all in one burst on the event loop."""
    settings = Settings(data_dir=tmp_path)
    metrics = Metrics(CollectorRegistry())
    writes: dict[str, list[float]] = {}
    sessions = []
    for i in range(40):
        session = Session(f"meeting-{i}", tmp_path / f"meeting-{i}", settings, metrics, {})
        times = writes[session.key] = []
        clock = [0.0]
        # The shell's file writer is the I/O edge: record when the session asks for it.
        session.metadata_file.update = lambda times=times, clock=clock: times.append(clock[0])  # type: ignore[method-assign]
        sessions.append((session, clock))
    # The core ticks every session once per second of audio, all at the same moments.
    for second in range(1, 61):
        for session, clock in sessions:
            clock[0] = T0 + second
            session.tick(T0 + second)

    for times in writes.values():
        assert times[0] == T0 + 1  # the first right away
        gaps = np.diff(times)
        assert 5 <= gaps[0] <= 10 and all(g == 5 for g in gaps[1:]), gaps
    per_second = Counter(t for times in writes.values() for t in times[1:])
    # 40 sessions over a 5 s interval: 8 a second if evenly spread, 40 if in step.
    assert max(per_second.values()) <= 16, per_second
