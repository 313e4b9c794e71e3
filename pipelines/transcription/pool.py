"""The node's side of the recognition pool (``--recognition pool``).

Jobs wait in this node's :class:`~.scheduler.JobQueue` (the same policy as local lanes:
finals before partials, one job of a session at a time, finals in order, a newer partial
superseding a waiting one, stale partials dropped, finals bounded; every job not run
is counted in ``gateway_asr_skipped_total``). At most :data:`WINDOW` are out at the
workers at once. Each goes to ``gateway:asr:final`` or ``:partial``
(:mod:`.jobs`); workers of the whole cluster take finals first and answer on this node's
``gateway:asr:done:{node}``.

No final is lost to the pool: while no worker is alive, or Redis refuses a job, or a
final's answer does not come within :data:`FINAL_TIMEOUT` (a worker that died mid-job
is replaced by another claiming its job well before that), the job runs on this node's
own lanes instead. A partial that times out is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from . import jobs
from .engine import Hypothesis
from .metrics import TranscriptionMetrics
from .recognizer import Audio, LocalRecognizer
from .scheduler import FINAL, Job, JobQueue

logger = logging.getLogger("pipelines.transcription.pool")

#: Jobs of this node out at the workers at once.
WINDOW = 32
FINAL_TIMEOUT = 30.0
PARTIAL_TIMEOUT = 10.0
#: How often the node counts live workers and looks for answers that never came, s.
WATCH = 1.0
BLOCK_MS = 500


@dataclass(eq=False)
class _Remote:
    spec: jobs.JobSpec
    future: asyncio.Future[Hypothesis | None]
    urgent: bool
    sent: float = 0.0


class PoolRecognizer:
    def __init__(
        self,
        url: str,
        node: str,
        local: LocalRecognizer,
        metrics: TranscriptionMetrics,
        *,
        stale_after: float,
        max_finals: int = 1024,
    ) -> None:
        self.node = node
        self.local = local
        self.metrics = metrics
        self.redis: aioredis.Redis = aioredis.Redis.from_url(url, socket_connect_timeout=1.0)
        self._queue: JobQueue[_Remote] = JobQueue(max_finals, stale_after)
        self._out: dict[str, Job[_Remote]] = {}
        self._busy: set[str] = set()
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.workers = 0
        self.partial_lanes = 0
        """Lanes of the live workers that take partials, all nodes' to share."""
        self.pool_busy = 1.0
        """How busy the live workers' lanes were, as their heartbeats last said."""

    async def start(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.redis.delete(jobs.done_stream(self.node))  # an earlier process's
        await self._count_workers()
        self._tasks = [
            asyncio.create_task(self._dispatch(), name="pool-dispatch"),
            asyncio.create_task(self._answers(), name="pool-answers"),
            asyncio.create_task(self._watch(), name="pool-watch"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for job in self._out.values():
            _resolve(job.payload.future, None)
        self._out.clear()
        await self.redis.aclose()

    # -- the Recognizer interface ---------------------------------------------------------

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
        if not self.workers:
            return self.local.recognize(
                session, kind, audio, offset, language, urgent=urgent, prompt=prompt
            )
        future: asyncio.Future[Hypothesis | None] = asyncio.get_running_loop().create_future()
        spec = jobs.JobSpec(
            uuid.uuid4().hex,
            self.node,
            session,
            kind,
            audio,
            offset,
            language,
            time.time(),
            urgent,
            prompt or "",
        )
        job = Job(session, kind, time.monotonic(), _Remote(spec, future, urgent), urgent)
        self._dropped(self._queue.push(job))
        self._wake.set()
        return future

    def forget(self, session: str) -> None:
        self._queue.forget(session)
        self.local.forget(session)

    def busy(self) -> float:
        """The live workers' share of busy lane time (each reports its own with its
        heartbeat, every second), or the local lanes' when no worker is live."""
        return self.pool_busy if self.workers else self.local.busy()

    # -- tasks ------------------------------------------------------------------------------

    def _dropped(self, dropped: list[tuple[Job[_Remote], str]]) -> None:
        for job, reason in dropped:
            self.metrics.skipped.labels(job.kind, reason).inc()
            _resolve(job.payload.future, None)

    async def _dispatch(self) -> None:
        while True:
            job = None
            if len(self._out) < WINDOW:
                # Partials wait here, where a newer one supersedes them, until a lane of
                # the pool is free: sent at once they would run however stale.
                out = sum(j.kind != FINAL and not j.urgent for j in self._out.values())
                partials = out < self.partial_lanes
                job, dropped = self._queue.pop(time.monotonic(), self._busy, partials=partials)
                self._dropped(dropped)
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            remote = job.payload
            if remote.future.done():
                continue
            self.metrics.wait.labels(job.kind).observe(time.monotonic() - job.submitted)
            if not self.workers:  # the pool emptied while the job waited
                self._here(job)
                continue
            self._busy.add(job.session)
            try:
                stream = jobs.stream_for(job.kind, job.urgent)
                await self.redis.xadd(stream, jobs.encode_job(remote.spec))  # type: ignore[arg-type]
            except (RedisError, OSError) as exc:
                logger.warning("recognition pool unreachable (%s): running the job here", exc)
                self._here(job)
                continue
            remote.sent = time.monotonic()
            self._out[remote.spec.id] = job

    def _here(self, job: Job[_Remote]) -> None:
        """Run ``job`` on this node's lanes; its session stays busy until it is done."""
        r = job.payload
        s = r.spec
        inner = self.local.recognize(
            s.session,
            s.kind,
            s.audio,
            s.offset,
            s.language,
            urgent=r.urgent,
            prompt=s.prompt or None,
        )

        def done(f: asyncio.Future[Hypothesis | None]) -> None:
            self._busy.discard(s.session)
            self._wake.set()
            if f.cancelled():
                _resolve(r.future, None)
            elif f.exception() is not None:
                if not r.future.done():
                    r.future.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                _resolve(r.future, f.result())

        self._busy.add(s.session)
        inner.add_done_callback(done)

    async def _answers(self) -> None:
        stream, last = jobs.done_stream(self.node), "0-0"
        while True:
            try:
                found = await self.redis.xread({stream: last}, count=100, block=BLOCK_MS)
            except (RedisError, OSError):
                await asyncio.sleep(WATCH)
                continue
            seen = []
            for _, entries in cast(list[Any], found or []):
                for entry_id, fields in entries:
                    last = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    seen.append(last)
                    with contextlib.suppress(KeyError, ValueError):
                        self._answered(*jobs.decode_result(fields))
            if seen:
                with contextlib.suppress(RedisError, OSError):
                    await self.redis.xdel(stream, *seen)

    def _answered(self, job_id: str, hypothesis: Hypothesis | None) -> None:
        job = self._out.pop(job_id, None)
        if job is None:
            return  # answered after it timed out
        self._busy.discard(job.session)
        self._wake.set()
        if hypothesis is None:
            self.metrics.skipped.labels(job.kind, "stale").inc()
        else:
            self.metrics.jobs.labels(job.kind).inc()
        _resolve(job.payload.future, hypothesis)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH)
            await self._count_workers()
            now = time.monotonic()
            for job_id, job in list(self._out.items()):
                limit = FINAL_TIMEOUT if job.kind == FINAL else PARTIAL_TIMEOUT
                if now - job.payload.sent < limit:
                    continue
                del self._out[job_id]
                self._busy.discard(job.session)
                if job.kind == FINAL:
                    logger.warning("no worker answered a final in %.0f s: running it here", limit)
                    self._here(job)
                else:
                    self.metrics.skipped.labels(job.kind, "timeout").inc()
                    _resolve(job.payload.future, None)
            self._wake.set()

    async def _count_workers(self) -> None:
        try:
            names = sorted(_text(n) for n in await self.redis.hkeys(jobs.WORKERS))
            beats = await self.redis.mget([jobs.worker_key(n) for n in names]) if names else []
        except (RedisError, OSError):
            self.workers = 0
            return
        dead = [n for n, b in zip(names, beats, strict=True) if b is None]
        if dead:
            with contextlib.suppress(RedisError, OSError):
                await self.redis.hdel(jobs.WORKERS, *dead)  # a live worker re-adds itself
        alive = [json.loads(b) for b in beats if b is not None]
        if len(alive) != self.workers:
            logger.info("recognition pool: %d workers alive", len(alive))
        self.workers = len(alive)
        # Every lane of a worker takes partials (see .worker), finals first.
        self.partial_lanes = sum(jobs.worker_lanes(info) for info in alive)
        if alive:
            self.pool_busy = jobs.pool_busy(alive)
            self.metrics.lanes_busy.set(self.pool_busy)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _resolve(future: asyncio.Future[Hypothesis | None], value: Hypothesis | None) -> None:
    if not future.done():
        future.set_result(value)
