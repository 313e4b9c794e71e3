"""The recording pipeline: ``audio.wav`` and ``speakers.jsonl`` per session.

``audio.wav`` holds the PCM exactly as the bot sent it, at its native rate, with silence
where the bot was away, so a position in the file is a position on the session clock.
The header is rewritten every ``wav_refresh`` seconds of audio, so after a crash the
file plays up to its last refresh; :func:`repair` (run at start-up) fixes the header to
cover every complete sample on disk.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from gateway.speakers import SpeakerChange

from .base import Gap, Pipeline, PipelineEvent, PipelineFactory, SessionContext

Samples = npt.NDArray[np.int16]

logger = logging.getLogger("pipelines.recording")

HEADER_BYTES = 44
_SILENCE = np.zeros(48000, dtype=np.int16)


def wav_header(rate: int, data_bytes: int) -> bytes:
    """A canonical 44-byte PCM WAV header for mono s16le."""
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + data_bytes,
        b"WAVE",
        b"fmt ",
        16,
        1,  # PCM
        1,  # mono
        rate,
        rate * 2,
        2,
        16,
        b"data",
        data_bytes,
    )


class WavWriter:
    """Appends mono s16le samples to a WAV file whose header is kept valid."""

    def __init__(self, path: Path, rate: int, refresh_samples: int) -> None:
        self.path = path
        self.rate = rate
        self.samples = 0
        self._refresh = refresh_samples
        self._since_refresh = 0
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._file.write(wav_header(rate, 0))

    def write(self, samples: Samples) -> None:
        self._file.write(samples.data)
        self.samples += len(samples)
        self._since_refresh += len(samples)
        if self._since_refresh >= self._refresh:
            self.refresh()

    def silence(self, n: int) -> None:
        while n > 0:
            chunk = _SILENCE[: min(n, len(_SILENCE))]
            self.write(chunk)
            n -= len(chunk)

    def refresh(self) -> None:
        """Rewrite the header for everything written so far and push it to the OS."""
        f = self._file
        f.flush()
        os.pwrite(f.fileno(), wav_header(self.rate, 2 * self.samples), 0)
        self._since_refresh = 0

    def close(self) -> None:
        if self._file.closed:
            return
        self.refresh()
        os.fsync(self._file.fileno())
        self._file.close()


class RecordingPipeline(Pipeline):
    audio_block_ms = 250

    def __init__(self, refresh_seconds: float) -> None:
        self._refresh_seconds = refresh_seconds
        self._wav: WavWriter | None = None
        self._speakers: IO[str] | None = None
        self._rate = 0

    async def start(self, ctx: SessionContext) -> None:
        self._rate = ctx.sample_rate
        refresh = max(1, int(self._refresh_seconds * ctx.sample_rate))
        self._wav = WavWriter(ctx.directory / "audio.wav", ctx.sample_rate, refresh)
        self._speakers = open(ctx.directory / "speakers.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    async def audio(self, start: int, samples: Samples) -> None:
        assert self._wav is not None
        if start > self._wav.samples:
            # Nothing reaches here out of order; keep the file on the clock regardless.
            self._wav.silence(start - self._wav.samples)
        self._wav.write(samples)

    async def event(self, event: PipelineEvent) -> None:
        assert self._wav is not None and self._speakers is not None
        if isinstance(event, Gap):
            self._wav.silence(event.sample + event.length - self._wav.samples)
        elif isinstance(event, SpeakerChange):
            line: dict[str, Any] = {"seconds": round(event.sample / self._rate, 3)}
            line.update(event.to_json())
            self._speakers.write(json.dumps(line) + "\n")
            self._speakers.flush()

    async def stop(self) -> None:
        if self._wav is not None:
            self._wav.close()
        if self._speakers is not None:
            self._speakers.close()


class RecordingFactory(PipelineFactory):
    name = "recording"

    async def startup(self) -> None:
        for path, samples in repair(self.env.settings.data_dir / "sessions"):
            logger.warning("repaired %s after an unclean stop: %d samples kept", path, samples)

    def create(self, ctx: SessionContext) -> Pipeline:
        return RecordingPipeline(self.env.settings.wav_refresh)


def repair(root: Path) -> list[tuple[Path, int]]:
    """Fix the header of every WAV under ``root/*/`` that a crash left stale.

    Returns the files repaired with the number of samples each now covers. A file
    whose header already matches its length is left alone.
    """
    repaired = []
    for path in sorted(root.glob("*/audio.wav")):
        with open(path, "r+b") as f:
            header = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
            if len(header) < HEADER_BYTES or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
                continue
            rate = struct.unpack_from("<I", header, 24)[0]
            recorded = struct.unpack_from("<I", header, 40)[0]
            data = (size - HEADER_BYTES) & ~1
            if data == recorded:
                continue
            f.truncate(HEADER_BYTES + data)
            os.pwrite(f.fileno(), wav_header(rate, data), 0)
            os.fsync(f.fileno())
        _mark_recovered(path.parent / "session.json")
        repaired.append((path, data // 2))
    return repaired


def _mark_recovered(meta: Path) -> None:
    try:
        info = json.loads(meta.read_text())
    except (OSError, ValueError):
        return
    info["recovered"] = True
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    os.replace(tmp, meta)
