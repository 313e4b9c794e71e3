"""Live transcription: streaming, speaker-attributed, word-timed results per session.

:class:`TranscriptionFactory` loads the model once per process, runs recognition for
every session on a shared :class:`~.scheduler.Scheduler`, and hands results to
:class:`~.outputs.TranscriptOutputs` (subscriber sockets, transcript files, webhooks).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Mapping

from gateway.pipeline import Environment, Pipeline, PipelineFactory, RouteHandler, SessionContext

from .engine import Engine, shared_engine
from .metrics import TranscriptionMetrics
from .outputs import TranscriptOutputs
from .pipeline import TranscriptionPipeline
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

    async def startup(self) -> None:
        s = self.env.settings
        # Loading reads and checks ~75 MB or more: keep it off the event loop.
        self.engine = await asyncio.to_thread(shared_engine, s)
        self.scheduler = Scheduler(
            self.metrics,
            lanes=self.engine.lanes,
            stale_after=max(1.0, 2 * s.partial_interval),
        )
        await self.scheduler.start()
        await self.scheduler.run_in_lanes(
            functools.partial(self.engine.warm_up, seconds=s.max_utterance + 1.0)
        )
        await self.outputs.startup()

    async def shutdown(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        await self.outputs.shutdown()

    def routes(self) -> Mapping[str, tuple[str, RouteHandler]]:
        return self.outputs.routes()

    def create(self, ctx: SessionContext) -> Pipeline:
        if self.engine is None or self.scheduler is None:
            raise RuntimeError("TranscriptionFactory.startup() must run before create()")
        s = self.env.settings
        return TranscriptionPipeline(
            self.engine,
            self.scheduler,
            self.outputs,
            self.metrics,
            partial_interval=s.partial_interval,
            max_utterance=s.max_utterance,
            bot_speech=s.bot_speech,
            language=s.language,
        )
