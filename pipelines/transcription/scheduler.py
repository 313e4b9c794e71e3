"""Recognition scheduling across sessions: one model, few threads, many meetings.

:class:`JobQueue` is the policy, sans-I/O: finals before partials; among sessions,
round robin (each session's finals in order, and never two jobs of one session at
once, so one busy meeting cannot hold every worker); partials that would bring an
utterance's first text go first, then the session served least recently; a session
has at most one partial waiting, and a newer one, or a final, supersedes it; a
partial that waited longer than ``stale_after`` is dropped instead of run. Under load
this thins partials first, and every partial not run is counted. The queue of finals
is bounded (``max_finals``); a final over the bound is refused and counted, never
silently lost.

:class:`Scheduler` runs the queue on the event loop with one worker task per
recognition lane, each handing one job at a time to its own thread. With several
lanes, every lane takes the next job, finals first; lane 0 runs at a CPU priority above
the others (see :func:`~pipelines.transcription.lanes.lane_priority`), so what it runs
never shares a core with a partial of another lane. Lane 0 used to keep to finals and
first-text partials, but in a conversation words become final through partials
(progressive finals), and one lane of partials left the other idle: at 4 meetings,
letting every lane run partials took per-word final p50/p95 from 3.37/5.62 s to
2.47/3.84 s. A final waits at most for the partial a lane is running, a few seconds of
audio.

When every lane is busy and partials of several sessions wait, a lane takes up to
``max_batch`` of them (:class:`Batchable` jobs) into one model call, in the order it
would have run them; a final always runs alone. The decoder costs about as much for
three sequences as for one, so on 4 s excerpts of the conversations a lane spends
116-133 ms per job in batches of three against 193-198 ms one at a time
(``benchmarks/batching.py``, two runs; two: 133-151 ms, four: 127-132 ms). Every job of
a batch waits for the whole call, so batches are made only where jobs would queue:
while a lane is idle, it runs the next job alone, sooner. (Batching was first measured
with 30 s windows and not adopted: encoding two as one batch took 1.01 s against 0.39 s
for one.)
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from .lanes import lane_priority
from .metrics import TranscriptionMetrics

logger = logging.getLogger("pipelines.transcription.scheduler")

T = TypeVar("T")
ItemT = TypeVar("ItemT")

PARTIAL, FINAL = "partial", "final"
#: Jobs of different sessions run in one call at most (:class:`Batchable` jobs).
MAX_BATCH = 3


@dataclass(eq=False)
class Job(Generic[T]):
    session: str
    kind: str
    submitted: float
    payload: T
    urgent: bool = False
    """A partial that would be the first text of an utterance: it goes before others."""


class JobQueue(Generic[T]):
    """Which job runs next. Every method returns the jobs it dropped, with a reason."""

    def __init__(self, max_finals: int = 1024, stale_after: float = 3.0) -> None:
        self.max_finals = max_finals
        self.stale_after = stale_after
        self._finals: OrderedDict[str, deque[Job[T]]] = OrderedDict()
        self._partials: OrderedDict[str, Job[T]] = OrderedDict()
        self._served: dict[str, int] = {}  # session -> when it last had a partial run
        self._turn = 0
        self.finals = 0

    def __len__(self) -> int:
        return self.finals + len(self._partials)

    @property
    def partials(self) -> int:
        return len(self._partials)

    def push(self, job: Job[T]) -> list[tuple[Job[T], str]]:
        dropped: list[tuple[Job[T], str]] = []
        if job.kind == FINAL:
            if self.finals >= self.max_finals:
                return [(job, "overflow")]
            self._finals.setdefault(job.session, deque()).append(job)
            self.finals += 1
            old = self._partials.pop(job.session, None)
            if old is not None:
                dropped.append((old, "superseded"))
            return dropped
        if self._finals.get(job.session):
            return [(job, "superseded")]  # the session's final covers this audio
        old = self._partials.pop(job.session, None)
        if old is not None:
            dropped.append((old, "superseded"))
        self._partials[job.session] = job
        return dropped

    def pop(
        self,
        now: float,
        busy: set[str],
        partials: bool = True,
        accept: Callable[[T], bool] | None = None,
    ) -> tuple[Job[T] | None, list[tuple[Job[T], str]]]:
        """The next job for a worker, skipping sessions in ``busy`` and jobs whose
        payload ``accept`` refuses; finals only unless ``partials``."""
        for session, jobs in self._finals.items():
            if session in busy or (accept is not None and not accept(jobs[0].payload)):
                continue
            job = jobs.popleft()
            self.finals -= 1
            del self._finals[session]
            if jobs:  # round robin: the session goes to the back of the line
                self._finals[session] = jobs
            return job, []
        dropped: list[tuple[Job[T], str]] = []
        if not partials:
            return None, dropped

        def order(session: str) -> tuple[bool, int]:
            return (not self._partials[session].urgent, self._served.get(session, -1))

        for session in sorted(self._partials, key=order):
            if session in busy or (
                accept is not None and not accept(self._partials[session].payload)
            ):
                continue
            job = self._partials.pop(session)
            if now - job.submitted > self.stale_after:
                dropped.append((job, "stale"))
                continue
            self._turn += 1
            self._served[session] = self._turn
            return job, dropped
        return None, dropped

    def forget(self, session: str) -> None:
        """The session ended; its fairness record goes (its jobs were already run)."""
        self._served.pop(session, None)


class LaneUse:
    """How busy the recognition lanes were over the last ``window`` seconds (sans-I/O).

    Report each job's start and end; :meth:`share` is the part of the lanes' time
    spent recognizing in the window before ``now``, running jobs included: 0 idle, 1
    every lane busy throughout. The policy lets partials hear more audio while there
    is recognition to spare (:meth:`~.policy.StreamingPolicy.lanes_busy`).
    """

    def __init__(self, lanes: int, window: float = 5.0) -> None:
        self.lanes = max(1, lanes)
        self.window = window
        self._done: deque[tuple[float, float]] = deque()
        self._running: dict[int, float] = {}

    def began(self, job: int, now: float) -> None:
        self._running[job] = now

    def ended(self, job: int, now: float) -> None:
        began = self._running.pop(job, None)
        if began is not None:
            self._done.append((began, now))

    def share(self, now: float) -> float:
        since = now - self.window
        while self._done and self._done[0][1] <= since:
            self._done.popleft()
        busy = sum(end - max(began, since) for began, end in self._done)
        busy += sum(now - max(began, since) for began in self._running.values())
        return min(1.0, busy / (self.window * self.lanes))


@dataclass(frozen=True, slots=True)
class Batchable(Generic[ItemT, T]):
    """A job that can share one call with others of the same ``run``: ``run(items,
    lane, ready)`` returns one result per item, in order, and may hand each over
    sooner with ``ready(index, result)``, from its thread (one model call for several
    sessions, :meth:`~.engine.Engine.transcribe_many`)."""

    run: Callable[[list[ItemT], int, Callable[[int, T], None] | None], list[T]]
    item: ItemT

    def __call__(self, lane: int) -> T:
        return self.run([self.item], lane, None)[0]


@dataclass(eq=False)
class _Work:
    fn: Callable[[int], Any]
    future: asyncio.Future[Any]


class Scheduler:
    """Runs blocking recognition calls for every session on one thread per lane.

    Call :meth:`start` before :meth:`submit` and :meth:`stop` at shutdown. ``submit``
    never blocks; the function is called with the lane number, in that lane's thread,
    and the future resolves to its result, or to ``None`` when the job was skipped
    (counted in the metrics).
    """

    def __init__(
        self,
        metrics: TranscriptionMetrics,
        lanes: int = 1,
        stale_after: float = 3.0,
        max_finals: int = 1024,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self.metrics = metrics
        self.lanes = lanes
        self.max_batch = max_batch
        self._calling = 0  # lanes in a model call
        self._queue: JobQueue[_Work] = JobQueue(max_finals, stale_after)
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._executors: list[ThreadPoolExecutor] = []
        self.use = LaneUse(lanes)
        self._share = (0.0, float("-inf"))  # (share, when): every session asks, every block

    def busy(self) -> float:
        """The share of the lanes' time spent recognizing over the last few seconds
        (worked out at most every 0.1 s)."""
        share, when = self._share
        now = time.monotonic()
        if now - when >= 0.1:
            share = self.use.share(now)
            self._share = (share, now)
            self.metrics.lanes_busy.set(share)
        return share

    async def start(self) -> None:
        self._executors = [
            ThreadPoolExecutor(
                1,
                thread_name_prefix=f"asr-{lane}",
                initializer=lane_priority,
                initargs=(lane, self.lanes),
            )
            for lane in range(self.lanes)
        ]
        self._tasks = [
            asyncio.create_task(self._worker(lane), name=f"asr-worker-{lane}")
            for lane in range(self.lanes)
        ]

    async def run_in_lanes(self, fn: Callable[[int], Any]) -> None:
        """Call ``fn(lane)`` once in every lane's thread, all at once (start-up work)."""
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(ex, fn, lane) for lane, ex in enumerate(self._executors))
        )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for executor in self._executors:
            executor.shutdown(wait=True)
        self._executors = []

    def submit(
        self, session: str, kind: str, fn: Callable[[int], T], *, urgent: bool = False
    ) -> asyncio.Future[T | None]:
        future: asyncio.Future[T | None] = asyncio.get_running_loop().create_future()
        job = Job(session, kind, time.monotonic(), _Work(fn, future), urgent)
        self._drop(self._queue.push(job))
        self._gauge()
        self._wake.set()
        return future

    def forget(self, session: str) -> None:
        self._queue.forget(session)

    def _drop(self, dropped: list[tuple[Job[_Work], str]]) -> None:
        for job, reason in dropped:
            self.metrics.skipped.labels(job.kind, reason).inc()
            if not job.payload.future.done():
                job.payload.future.set_result(None)

    def _gauge(self) -> None:
        self.metrics.queue_depth.labels(FINAL).set(self._queue.finals)
        self.metrics.queue_depth.labels(PARTIAL).set(self._queue.partials)

    async def _worker(self, lane: int) -> None:
        while True:
            job, dropped = self._queue.pop(time.monotonic(), self._busy)
            self._drop(dropped)
            if job is None:
                self._gauge()
                self._wake.clear()
                await self._wake.wait()
                continue
            if job.payload.future.cancelled():
                continue
            batch = self._fill([job])
            self._gauge()
            await self._run(lane, batch)

    async def _run(self, lane: int, batch: list[Job[_Work]]) -> None:
        """Run ``batch`` in ``lane``'s thread, in one call; each job's future resolves
        as soon as its result is ready."""
        loop = asyncio.get_running_loop()
        executor = self._executors[lane]
        job = batch[0]
        began = time.monotonic()
        for j in batch:
            self._busy.add(j.session)
            self.metrics.wait.labels(j.kind).observe(began - j.submitted)
        self.metrics.batch.observe(len(batch))
        self.use.began(lane, began)
        self._calling += 1
        pending = dict(enumerate(batch))

        def finish(i: int, result: Any) -> None:
            j = pending.pop(i, None)
            if j is None:
                return
            self.metrics.jobs.labels(j.kind).inc()
            if not j.payload.future.done():
                j.payload.future.set_result(result)
            self._busy.discard(j.session)
            self._wake.set()

        def ready(i: int, result: Any) -> None:  # in the lane's thread
            loop.call_soon_threadsafe(finish, i, result)

        try:
            if len(batch) == 1:
                results = [await loop.run_in_executor(executor, job.payload.fn, lane)]
            else:
                together = cast(Batchable[Any, Any], job.payload.fn)
                items = [cast(Batchable[Any, Any], j.payload.fn).item for j in batch]
                results = await loop.run_in_executor(executor, together.run, items, lane, ready)
        except Exception as exc:
            self.metrics.errors.inc()
            logger.exception("recognition failed")
            for j in pending.values():
                if not j.payload.future.done():
                    j.payload.future.set_exception(exc)
        else:
            for i, result in enumerate(results):
                finish(i, result)
        finally:
            self._calling -= 1
            self.use.ended(lane, time.monotonic())
            for j in pending.values():
                self._busy.discard(j.session)
            # Another worker may have gone to sleep while these sessions were busy.
            self._wake.set()

    def _fill(self, batch: list[Job[_Work]]) -> list[Job[_Work]]:
        """``batch`` (one partial) and the waiting partials of other sessions that can run
        in the same call, in the order :meth:`JobQueue.pop` gives them, up to
        ``max_batch``. A final runs alone: its words wait for nothing else.

        Only while every other lane is busy: a free lane runs the next job alone, sooner.
        """
        first = batch[0].payload.fn
        if (
            batch[0].kind == FINAL
            or not isinstance(first, Batchable)
            or self._calling < self.lanes - 1
        ):
            return batch

        def same(work: _Work) -> bool:
            return isinstance(work.fn, Batchable) and work.fn.run == first.run

        # No final waits outside ``taken``: :meth:`JobQueue.pop` would have given it first.
        taken = {*self._busy, batch[0].session}
        while len(batch) < self.max_batch:
            job, dropped = self._queue.pop(time.monotonic(), taken, accept=same)
            self._drop(dropped)
            if job is None:
                break
            if not job.payload.future.cancelled():
                batch.append(job)
                taken.add(job.session)
        return batch
