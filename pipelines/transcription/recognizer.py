"""Where a session's recognition jobs run: this process's lanes, or the cluster's pool.

A :class:`TranscriptionPipeline` asks a :class:`Recognizer` for each job and gets a
future of the :class:`~.engine.Hypothesis` (``None`` when the job was skipped: a
superseded or stale partial, a final over the bound, all counted). Either way a
session's jobs run one at a time, finals in order and before partials.

- :class:`LocalRecognizer`: the process's own lanes (:class:`~.scheduler.Scheduler`).
- :class:`~.pool.PoolRecognizer`: workers shared by the cluster, on Redis Streams
  (``--recognition pool``), with the local lanes as the fallback.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .engine import Engine, Hypothesis, Request
from .scheduler import FINAL, Batchable, Scheduler

Audio = npt.NDArray[np.float32]


class Recognizer(Protocol):
    def recognize(
        self,
        session: str,
        kind: str,
        audio: Audio,
        offset: float,
        language: str | None,
        *,
        urgent: bool = False,
        prompt: str | None = None,
    ) -> asyncio.Future[Hypothesis | None]:
        """Recognize 16 kHz ``audio`` that starts ``offset`` s into the session,
        expecting the terms of ``prompt`` (:func:`gateway.keywords.prompt`)."""
        ...

    def forget(self, session: str) -> None:
        """The session ended."""
        ...

    def busy(self) -> float:
        """The share of recognition capacity in use lately: 0 idle, 1 saturated (or not
        known)."""
        ...


class LocalRecognizer:
    def __init__(self, engine: Engine, scheduler: Scheduler) -> None:
        self.engine = engine
        self.scheduler = scheduler

    def recognize(
        self,
        session: str,
        kind: str,
        audio: Audio,
        offset: float,
        language: str | None,
        *,
        urgent: bool = False,
        prompt: str | None = None,
    ) -> asyncio.Future[Hypothesis | None]:
        request = Request(audio, offset, language, whole=kind == FINAL, prompt=prompt)
        job = Batchable(self.engine.transcribe_many, request)
        return self.scheduler.submit(session, kind, job, urgent=urgent)

    def forget(self, session: str) -> None:
        self.scheduler.forget(session)

    def busy(self) -> float:
        return self.scheduler.busy()
