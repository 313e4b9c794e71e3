"""Stopping a transcription pipeline whose recognitions ended in odd orders.

The scheduler resolves some futures inside ``submit`` (a partial superseded, a final
refused for a full queue): they are done before their callbacks have run. A ``stop``
that awaited those futures in a loop never yielded, so the callbacks never ran and the
event loop spun forever, freezing every session of the process. These tests build
that ordering on purpose and run the loop in a thread, so a spin fails the test
instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.ingest.clock import AudioClock
from gateway.ingest.speakers import SpeakerTimeline
from gateway.pipeline import Environment
from pipelines.transcription.drafts import Request
from pipelines.transcription.engine import Hypothesis
from pipelines.transcription.metrics import TranscriptionMetrics
from pipelines.transcription.outputs import TranscriptOutputs
from pipelines.transcription.pipeline import TranscriptionPipeline
from pipelines.transcription.recognizer import LocalRecognizer
from pipelines.transcription.scheduler import Scheduler
from pipelines.transcription.words import HypWord

from .timing import scaled

RATE = 16000


class SilentEngine:
    """Recognizes nothing: these tests are about scheduling, not recognition."""

    lanes = 1
    multilingual = False

    def supported_languages(self) -> list[str]:
        return ["en"]

    def transcribe(self, audio: Any, offset: float, **_: Any) -> Hypothesis:
        return Hypothesis((), (), len(audio) / RATE, 0.0)

    def transcribe_many(
        self, requests: list[Any], lane: int = 0, ready: Any = None
    ) -> list[Hypothesis]:
        return [self.transcribe(r.audio, r.offset) for r in requests]


@dataclass
class Context:
    directory: Path
    key: str = "s"
    bot_id: str | None = None
    sample_rate: int = RATE
    params: dict[str, str] = field(default_factory=dict)
    suspending: bool = False
    annotations: dict[str, str] = field(default_factory=dict)
    clock: AudioClock = field(default_factory=lambda: AudioClock(RATE))
    log: logging.LoggerAdapter[logging.Logger] = field(
        default_factory=lambda: logging.LoggerAdapter(logging.getLogger("test"), {})
    )

    def __post_init__(self) -> None:
        self.speakers = SpeakerTimeline(self.clock)

    def annotate(self, name: str, value: str | None) -> None:
        if value is not None:
            self.annotations[name] = value

    def speak(self, samples: Any, rate: int) -> str:
        raise NotImplementedError

    def say(self, text: str) -> str:
        raise NotImplementedError


def request(n: int, kind: str, confirmed: tuple[HypWord, ...] = ()) -> Request:
    return Request(n, kind, 1, 1, 0.0, 1.0, confirmed, 0, kind == "final", 0.0, 1.0, False)


def run_within(seconds: float, scenario: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``scenario`` on a fresh loop in a thread; fail if it does not end in time."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(scenario())), daemon=True)
    thread.start()
    thread.join(scaled(seconds))
    assert not thread.is_alive(), "the event loop never got control back"
    return out[0]


async def pipeline(tmp_path: Path, scheduler: Scheduler) -> tuple[TranscriptionPipeline, Any]:
    registry = CollectorRegistry()
    env = Environment(Settings(data_dir=tmp_path), registry)
    outputs = TranscriptOutputs(env)
    published: list[Any] = []
    engine = SilentEngine()
    p = TranscriptionPipeline(
        engine,  # type: ignore[arg-type]
        LocalRecognizer(engine, scheduler),  # type: ignore[arg-type]
        outputs,
        TranscriptionMetrics(registry),
        partial_interval=1.0,
        max_utterance=15.0,
        bot_speech="label",
    )
    ctx = Context(tmp_path)
    ctx.clock.start(0.0, 0)
    await p.start(ctx)  # type: ignore[arg-type]
    real = p._out.publish
    p._out.publish = lambda event: (published.append(event), real(event))[1]  # type: ignore[method-assign]
    await p.audio(0, np.zeros(RATE, np.int16))
    return p, published


def test_stop_after_a_final_refused_inside_submit(tmp_path: Path) -> None:
    word = HypWord("hello", 0.1, 0.5, 0.9)

    async def scenario() -> list[Any]:
        # No room for a single final: the scheduler resolves the future inside submit.
        scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), max_finals=0)
        p, published = await pipeline(tmp_path, scheduler)
        p._submit(request(1, "final", (word,)))
        await p.stop()  # at once, before the loop ran the future's callback
        return published

    published = run_within(10, scenario)
    # The refused final still carries the words that were confirmed before it.
    finals = [e for e in published if getattr(e, "is_final", False)]
    assert [w.word for e in finals for w in e.words] == ["hello"]


def test_stop_after_partials_superseded_inside_submit(tmp_path: Path) -> None:
    async def scenario() -> int:
        scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()))
        p, _ = await pipeline(tmp_path, scheduler)
        for n in range(20):  # each partial supersedes the one before, synchronously
            p._submit(request(n, "partial"))
        stopping = asyncio.create_task(p.stop())
        await asyncio.sleep(0.05)
        assert not stopping.done()  # the last partial has not run: stop waits for it
        await scheduler.start()
        await asyncio.wait_for(stopping, scaled(5))
        await scheduler.stop()
        return p._inflight

    assert run_within(10, scenario) == 0
