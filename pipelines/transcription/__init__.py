"""Live transcription: streaming, speaker-attributed, word-timed results per session.

:class:`TranscriptionFactory` loads the model once per process, runs recognition for
every session on a shared :class:`~.scheduler.Scheduler` (or, with ``--recognition
pool``, on the cluster's workers: :mod:`.pool`, :mod:`.worker`), and hands results to
:class:`~.outputs.TranscriptOutputs` (subscriber sockets, transcript files, webhooks).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import socket
from collections.abc import Mapping

from gateway import keywords
from gateway.keywords import Vocabulary
from gateway.pipeline import Environment, Pipeline, PipelineFactory, RouteHandler, SessionContext

from .engine import Engine, shared_engine
from .metrics import TranscriptionMetrics
from .outputs import TranscriptOutputs
from .pipeline import TranscriptionPipeline
from .pool import PoolRecognizer
from .recognizer import LocalRecognizer, Recognizer
from .scheduler import Scheduler

__all__ = ["TranscriptionFactory"]


class TranscriptionFactory(PipelineFactory):
    name = "transcription"

    def __init__(self, env: Environment) -> None:
        super().__init__(env)
        self.outputs = TranscriptOutputs(env)
        self.metrics = TranscriptionMetrics(env.registry)
        self.engine: Engine | None = None
        self.scheduler: Scheduler | None = None
        self.recognizer: Recognizer | None = None
        self.pool: PoolRecognizer | None = None

    async def startup(self) -> None:
        s = self.env.settings
        if s.recognition == "pool" and not s.asr_threads:
            # The pool's workers do the work; one local lane is the fallback.
            s = dataclasses.replace(s, asr_threads=1)
        # Loading reads and checks ~75 MB or more: keep it off the event loop.
        self.engine = await asyncio.to_thread(shared_engine, s)
        self.scheduler = Scheduler(
            self.metrics,
            lanes=self.engine.lanes,
            stale_after=max(1.0, 2 * s.partial_interval),
        )
        await self.scheduler.start()
        await self.scheduler.run_in_lanes(
            functools.partial(
                self.engine.warm_up, seconds=s.max_utterance + 1.0, batch=self.scheduler.max_batch
            )
        )
        self.recognizer = LocalRecognizer(self.engine, self.scheduler)
        if s.recognition == "pool":
            node = s.node_id or f"{socket.gethostname()}-{os.getpid()}"
            self.pool = PoolRecognizer(
                s.redis_url,
                node,
                self.recognizer,
                self.metrics,
                stale_after=max(1.0, 2 * s.partial_interval),
            )
            await self.pool.start()
            self.recognizer = self.pool
        await self.outputs.startup()

    async def shutdown(self) -> None:
        if self.pool is not None:
            await self.pool.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        await self.outputs.shutdown()

    def routes(self) -> Mapping[str, tuple[str, RouteHandler]]:
        return self.outputs.routes()

    def create(self, ctx: SessionContext) -> Pipeline:
        if self.engine is None or self.recognizer is None:
            raise RuntimeError("TranscriptionFactory.startup() must run before create()")
        s = self.env.settings
        return TranscriptionPipeline(
            self.engine,
            self.recognizer,
            self.outputs,
            self.metrics,
            partial_interval=s.partial_interval,
            max_utterance=s.max_utterance,
            bot_speech=s.bot_speech,
            language=s.language,
            vocabulary=Vocabulary(keywords.parse(s.keywords, "keywords"), s.roster_keywords),
        )
