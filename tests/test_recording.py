"""Crash safety of the WAV recording."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np

from pipelines.wav import WavWriter, repair, wav_header

from .conftest import GatewayFactory


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
