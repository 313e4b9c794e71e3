"""Runs one pipeline of one session on its own task.

Audio is not queued: the runner keeps a cursor into the session's ring buffer and reads
whatever has been written since, so its backlog is bounded by the ring. Events go into
bounded queues with their clock position; audio is delivered up to each event's
position before the event, which keeps the two in clock order. Ingest only compares an
integer and sets a flag (:meth:`PipelineRunner.poke`); it never waits on a pipeline.

Events come in two kinds with a queue each, delivered in the order they were posted:

* control events (speech starts and ends, gaps) come at most a few a second, whatever
  the bot sends, and a pipeline that missed one would misread the meeting; their queue
  holds :data:`CONTROL_FACTOR` times the configured size, so only a pipeline stalled for
  minutes can overflow it;
* roster changes arrive at the bot's will: all the changes of one roster message take
  one place in the queue (:meth:`PipelineRunner.post_batch`), so a 10,000-person
  roster is one entry, and only these are dropped when the queue is full.

Every drop is counted by pipeline and kind.

A pipeline that raises is stopped alone: logged with its traceback, counted, and its
queue discarded; the session and its other pipelines go on.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from ..audio.ring import Overrun, RingBuffer
from ..metrics import Metrics
from ..pipeline import Gap, Pipeline, PipelineEvent, SessionContext

#: The control queue holds this many times ``pipeline_queue`` events.
CONTROL_FACTOR = 16


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
        # (sequence, clock position, events): one entry per post, in posting order.
        self._control: deque[tuple[int, int, tuple[PipelineEvent, ...]]] = deque()
        self._bulk: deque[tuple[int, int, tuple[PipelineEvent, ...]]] = deque()
        self._posted = 0
        self._queue_size = queue_size
        self._block = max(1, ctx.sample_rate * pipeline.audio_block_ms // 1000)
        self._wake = asyncio.Event()
        self._closing = False
        self.cursor = ring.written  # a resumed session's ring starts where it stood
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
        """Queue a control event for delivery after the audio before ``at``."""
        self.post_batch(at, (event,), roster=False)

    def post_batch(self, at: int, events: tuple[PipelineEvent, ...], *, roster: bool) -> None:
        """Queue events that happened together as one entry; drop and count if full.

        ``roster`` marks the changes of one roster message (the droppable kind).
        """
        if self.failed or not events:
            return
        queue = self._bulk if roster else self._control
        if len(queue) >= (self._queue_size if roster else self._queue_size * CONTROL_FACTOR):
            kind = "roster" if roster else "control"
            self.dropped += len(events)
            self._metrics.pipeline_drops.labels(self.name, kind).inc(len(events))
            if self.dropped == len(events):
                self._log.warning("pipeline %s queue full; dropping %s events", self.name, kind)
            return
        self._posted += 1
        queue.append((self._posted, at, events))
        self._metrics.pipeline_queue.labels(self.name).inc(len(events))
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
            waiting = sum(len(e) for q in (self._control, self._bulk) for _, _, e in q)
            self._metrics.pipeline_queue.labels(self.name).dec(waiting)
            self._control.clear()
            self._bulk.clear()
        try:
            await self.pipeline.stop()
        except Exception:
            if not self.failed:
                self._metrics.pipeline_errors.labels(self.name).inc()
            self._log.exception("pipeline %s failed while stopping", self.name)

    async def _drain(self, final: bool) -> None:
        control, bulk = self._control, self._bulk
        while control or bulk:
            queue = control if not bulk or (control and control[0][0] < bulk[0][0]) else bulk
            _, at, events = queue.popleft()
            self._metrics.pipeline_queue.labels(self.name).dec(len(events))
            await self._deliver(min(at, self._ring.written))
            for event in events:
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
