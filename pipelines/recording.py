"""The recording pipeline: ``audio.wav`` and ``speakers.jsonl`` per session.

``audio.wav`` holds the PCM exactly as the bot sent it, at its native rate, with silence
where the bot was away, so a position in the file is a position on the session clock.
The header is rewritten every ``wav_refresh`` seconds of audio, so after a crash the
file plays up to its last refresh; :func:`repair` (run at start-up) fixes the header to
cover every complete sample on disk.

A disk that refuses a write (full, over quota, an I/O error) never stops the recording.
What it refused waits in memory, in order, and is written at its place in the file when
the disk takes it again (retried on each audio block and by a timer, with a back-off of
0.5 s doubling to 5 s). At most ``disk_backlog_seconds`` of audio wait per session;
beyond that the oldest waiting audio is dropped and becomes silence in the file (counted
in ``gateway_disk_dropped_audio_seconds_total``), so the file stays on the session clock.
Silence (gaps, dropped audio) is written as a hole (``ftruncate``), so it needs no disk
space. ``speakers.jsonl`` lines wait likewise, at most :data:`SPEAKER_LINES`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from gateway.ingest.speakers import SpeakerChange
from gateway.pipeline import (
    Disconnected,
    Environment,
    Gap,
    Pipeline,
    PipelineEvent,
    PipelineFactory,
    SessionContext,
)
from gateway.storage.files import DiskWatch, FileStatus, disk_watch, standalone
from gateway.storage.held import HeldAppender
from gateway.storage.offload import blocking

from .wav import WavWriter, data_samples, repair

Samples = npt.NDArray[np.int16]

logger = logging.getLogger("pipelines.recording")

#: ``speakers.jsonl`` lines held per session while the disk refuses them.
SPEAKER_LINES = 10_000


class RecordingPipeline(Pipeline):
    audio_block_ms = 250

    def __init__(
        self, refresh_seconds: float, backlog_seconds: float = 60.0, watch: DiskWatch | None = None
    ) -> None:
        self._refresh_seconds = refresh_seconds
        self._backlog_seconds = backlog_seconds
        self._watch = watch
        self._wav: WavWriter | None = None
        self._speakers: HeldAppender | None = None
        self._rate = 0

    async def start(self, ctx: SessionContext) -> None:
        self._rate = ctx.sample_rate
        refresh = max(1, int(self._refresh_seconds * ctx.sample_rate))
        wav = ctx.directory / "audio.wav"
        watch = self._watch or standalone(wav, "recording").watch
        self._wav = WavWriter(
            wav,
            ctx.sample_rate,
            refresh,
            hold_samples=int(self._backlog_seconds * ctx.sample_rate),
            status=FileStatus(watch, ctx.directory, wav.name, "recording", ctx.log),
            resume=True,  # a session directory is new unless a resumed session owns it
        )
        dropped = watch.metrics.dropped_lines.labels("recording")
        self._speakers = HeldAppender(
            FileStatus(watch, ctx.directory, "speakers.jsonl", "recording", ctx.log),
            max_lines=SPEAKER_LINES,
            on_drop=dropped.inc,
        )

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
        elif isinstance(event, Disconnected):
            # The bot may not come back: the file plays to here from now on.
            self._wav.refresh()
        elif isinstance(event, SpeakerChange):
            line: dict[str, Any] = {"seconds": round(event.sample / self._rate, 3)}
            line.update(event.to_json())
            self._speakers.append((json.dumps(line) + "\n").encode())

    async def stop(self) -> None:
        if self._wav is not None:
            self._wav.close()
            if self._wav.dropped:
                self._wav.status.log.warning(
                    "%.1f s of audio were dropped for lack of disk space (silence in %s)",
                    self._wav.dropped / 2 / self._rate,
                    self._wav.path.name,
                )
        if self._speakers is not None:
            self._speakers.close()


class RecordingFactory(PipelineFactory):
    name = "recording"

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self.watch = disk_watch(env.registry)

    async def startup(self) -> None:
        root = self.env.settings.data_dir / "sessions"
        for path, samples in await blocking(repair, root, self.watch):
            logger.warning("repaired %s after an unclean stop: %d samples kept", path, samples)

    def resume_position(self, directory: Path, rate: int) -> int:
        return data_samples(directory / "audio.wav")

    def create(self, ctx: SessionContext) -> Pipeline:
        s = self.env.settings
        return RecordingPipeline(s.wav_refresh, s.disk_backlog_seconds, self.watch)
