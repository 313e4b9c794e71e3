"""Runs one pipeline of one session on its own task.

Audio is not queued: the runner keeps a cursor into the session's ring buffer and reads
whatever has been written since, so its backlog is bounded by the ring. Events go into
a bounded queue with their clock position; audio is delivered up to each event's
position before the event, which keeps the two in clock order. Ingest only compares an
integer and sets a flag (:meth:`PipelineRunner.poke`); it never waits on a pipeline.

A pipeline that raises is stopped alone: logged with its traceback, counted, and its
queue discarded; the session and its other pipelines go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from pipelines.base import Gap, Pipeline, PipelineEvent, SessionContext

from .audio.ring import Overrun, RingBuffer
from .metrics import Metrics


class PipelineRunner:
    def __init__(
        self,
        name: str,
        pipeline: Pipeline,
        ctx: SessionContext,
        ring: RingBuffer,
        metrics: Metrics,
        queue_size: int,
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.name = name
        self.pipeline = pipeline
        self._ctx = ctx
        self._ring = ring
        self._metrics = metrics
        self._log = log
        self._events: deque[tuple[int, PipelineEvent]] = deque()
        self._queue_size = queue_size
        self._block = max(1, ctx.sample_rate * pipeline.audio_block_ms // 1000)
        self._wake = asyncio.Event()
        self._closing = False
        self.cursor = 0
        self.failed = False
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"pipeline-{self.name}")

    def poke(self) -> None:
        """New audio was written; wake the task once a block is ready."""
        if self._ring.written - self.cursor >= self._block:
            self._wake.set()

    def post(self, at: int, event: PipelineEvent) -> None:
        """Queue an event for delivery after the audio before ``at``; drop if full."""
        if self.failed:
            return
        if len(self._events) >= self._queue_size:
            self.dropped += 1
            self._metrics.pipeline_drops.labels(self.name).inc()
            if self.dropped == 1:
                self._log.warning("pipeline %s queue full; dropping events", self.name)
            return
        self._events.append((at, event))
        self._metrics.pipeline_queue.labels(self.name).inc()
        self._wake.set()

    async def close(self) -> None:
        """Deliver everything written so far, then stop the pipeline."""
        self._closing = True
        self._wake.set()
        if self.task is not None:
            await self.task

    async def _run(self) -> None:
        try:
            await self.pipeline.start(self._ctx)
            while True:
                await self._wake.wait()
                self._wake.clear()
                # Read the flag before draining: close() may come while we drain.
                final = self._closing
                await self._drain(final)
                if final:
                    break
        except Exception:
            self.failed = True
            self._metrics.pipeline_errors.labels(self.name).inc()
            self._log.exception("pipeline %s failed and was stopped", self.name)
            self._metrics.pipeline_queue.labels(self.name).dec(len(self._events))
            self._events.clear()
        try:
            await self.pipeline.stop()
        except Exception:
            if not self.failed:
                self._metrics.pipeline_errors.labels(self.name).inc()
            self._log.exception("pipeline %s failed while stopping", self.name)

    async def _drain(self, final: bool) -> None:
        while self._events:
            at, event = self._events.popleft()
            self._metrics.pipeline_queue.labels(self.name).dec()
            await self._deliver(min(at, self._ring.written))
            await self.pipeline.event(event)
            if isinstance(event, Gap):
                self.cursor = max(self.cursor, event.sample + event.length)
        # Deliver whole blocks while live; everything at the end.
        end = self._ring.written
        if not final:
            end -= (end - self.cursor) % self._block
        await self._deliver(end)

    async def _deliver(self, stop: int) -> None:
        while self.cursor < stop:
            end = min(stop, self.cursor + self._block)
            try:
                views = self._ring.read(self.cursor, end)
            except Overrun as exc:
                self._metrics.ring_overruns.labels(self.name).inc()
                self._metrics.ring_overrun_seconds.labels(self.name).inc(
                    exc.lost / self._ctx.sample_rate
                )
                self._log.warning("pipeline %s fell behind; %d samples lost", self.name, exc.lost)
                # The pipeline hears about the hole, so time stays meeting time.
                await self.pipeline.event(Gap(self.cursor, exc.lost, "overrun"))
                self.cursor = exc.oldest
                continue
            start = self.cursor
            for view in views:
                await self.pipeline.audio(start, view)
                start += len(view)
            self.cursor = end
