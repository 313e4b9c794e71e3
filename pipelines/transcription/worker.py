"""``meeting-gateway worker``: recognition lanes for the whole cluster, fed by Redis.

A worker loads the model (``--device cpu`` or ``cuda``; ``--asr-threads`` lanes), joins
the consumer group ``workers`` on ``gateway:asr:final`` and ``gateway:asr:partial``
(:mod:`.jobs`), and takes one job per free lane, finals first. It answers on the
submitting node's ``gateway:asr:done:{node}`` and acknowledges and deletes the job in
the same transaction, so a job is acknowledged only once its answer is written.

A worker that dies mid-job leaves it pending under its name: every worker claims jobs
idle for :data:`CLAIM_IDLE` seconds (``XAUTOCLAIM``) and runs them first, so the job is
answered by another. Partials older than the node's stale limit are answered "skipped"
without decoding. SIGTERM stops taking jobs and finishes those under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import time
from collections import deque
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from gateway.cluster.node import every
from gateway.config import Settings

from . import jobs
from .engine import Request, shared_engine
from .metrics import TranscriptionMetrics
from .scheduler import FINAL, Batchable, Scheduler

logger = logging.getLogger("pipelines.transcription.worker")

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0
#: A job pending this long under a worker's name is taken over by another, seconds.
CLAIM_IDLE = 10.0
BLOCK_MS = 500
DONE_MAXLEN = 10_000


class Worker:
    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings
        self.name = name
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=1.0
        )
        self.stale_after = max(1.0, 2 * settings.partial_interval)
        self._claimed: deque[tuple[str, str, dict[Any, Any]]] = deque()
        self._stopping = asyncio.Event()
        self.done = 0
        self.lanes = 0
        self.scheduler: Scheduler | None = None

    async def run(self) -> None:
        from prometheus_client import CollectorRegistry

        engine = await asyncio.to_thread(shared_engine, self.settings)
        self.lanes = engine.lanes
        scheduler = self.scheduler = Scheduler(
            TranscriptionMetrics(CollectorRegistry()),
            lanes=engine.lanes,
            stale_after=self.stale_after,
        )
        await scheduler.start()
        await scheduler.run_in_lanes(lambda lane: engine.warm_up(lane, 16.0, scheduler.max_batch))
        await self._groups()
        free = asyncio.Semaphore(engine.lanes)
        tasks = [
            asyncio.create_task(every(HEARTBEAT_INTERVAL, self._beat)),
            asyncio.create_task(every(CLAIM_IDLE / 4, self._claim)),
        ]
        await self._beat()
        logger.info("worker %s takes jobs with %d lanes", self.name, engine.lanes)
        running: set[asyncio.Task[None]] = set()
        try:
            while not self._stopping.is_set():
                await free.acquire()
                # As on a node, every free lane takes the next job, finals first: in a
                # conversation partials are what makes words final.
                entry = await self._next()
                if entry is None:
                    free.release()
                    continue
                task = asyncio.create_task(self._run(engine, scheduler, *entry))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: free.release())
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self.redis.delete(jobs.worker_key(self.name))
                await self.redis.hdel(jobs.WORKERS, self.name)
            await scheduler.stop()
            await self.redis.aclose()
            logger.info("worker %s stopped after %d jobs", self.name, self.done)

    def stop(self) -> None:
        self._stopping.set()

    async def _beat(self) -> None:
        beat: dict[str, Any] = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "lanes": self.lanes,
            "at": time.time(),
        }
        if self.scheduler is not None:
            # The nodes give partials the long span while the pool has time to spare.
            beat["busy"] = round(self.scheduler.busy(), 3)
        info = json.dumps(beat)
        with contextlib.suppress(RedisError, OSError):
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(jobs.worker_key(self.name), info, px=int(HEARTBEAT_TTL * 1000))
                pipe.hset(jobs.WORKERS, self.name, info)
                await pipe.execute()

    async def _groups(self) -> None:
        while True:
            try:
                for stream in jobs.STREAMS.values():
                    with contextlib.suppress(ResponseError):  # BUSYGROUP: it exists
                        await self.redis.xgroup_create(stream, jobs.GROUP, id="0", mkstream=True)
                return
            except (RedisError, OSError) as exc:
                logger.warning("redis unreachable (%s); retrying", exc)
                await asyncio.sleep(1.0)

    async def _claim(self) -> None:
        """Take over the jobs of workers that died holding them."""
        for stream in jobs.STREAMS.values():
            try:
                _, entries, _ = await self.redis.xautoclaim(
                    stream, jobs.GROUP, self.name, int(CLAIM_IDLE * 1000), count=10
                )
            except (RedisError, OSError):
                return
            for entry_id, fields in entries:
                if fields:
                    logger.warning(
                        "worker %s took over job %s of a dead worker", self.name, entry_id
                    )
                    self._claimed.append((stream, _id(entry_id), fields))

    async def _next(self) -> tuple[str, str, dict[Any, Any]] | None:
        """The next job: one already this worker's (claimed from a dead worker, or read
        with another), then finals, then partials."""
        final, partial = jobs.STREAMS["final"], jobs.STREAMS["partial"]
        if self._claimed:
            return self._claimed.popleft()
        wanted = {final: ">", partial: ">"}
        try:
            for streams, block in (({final: ">"}, None), (wanted, BLOCK_MS)):
                found: Any = await self.redis.xreadgroup(
                    jobs.GROUP, self.name, cast(Any, streams), count=1, block=block
                )
                # One read may deliver a final and a partial: both are this worker's now
                # (pending under its name), so keep the second for the next free lane.
                got = [
                    (_id(stream), _id(entry_id), fields)
                    for stream, entries in found or []
                    for entry_id, fields in entries
                ]
                got.sort(key=lambda entry: entry[0] != final)
                if got:
                    self._claimed.extend(got[1:])
                    return got[0]
        except (RedisError, OSError) as exc:
            logger.warning("redis unreachable (%s)", exc)
            await asyncio.sleep(1.0)
        return None

    async def _run(
        self, engine: Any, scheduler: Scheduler, stream: str, entry_id: str, fields: dict[Any, Any]
    ) -> None:
        try:
            job = jobs.decode_job(fields)
        except (KeyError, ValueError):
            logger.error("dropping malformed job %s", entry_id)
            await self._ack(stream, entry_id, None)
            return
        if job.kind != FINAL and time.time() - job.submitted > self.stale_after:
            hypothesis = None
        else:
            request = Request(
                job.audio,
                job.offset,
                job.language,
                whole=job.kind == FINAL,
                prompt=job.prompt or None,
            )
            # The same lanes as a node's own: finals first, then first-text partials.
            # A worker takes only as many jobs as it has lanes, so its jobs never wait
            # for a lane and are never batched; the pool spreads them instead.
            run = Batchable(engine.transcribe_many, request)
            hypothesis = await scheduler.submit(job.session, job.kind, run, urgent=job.urgent)
        await self._ack(
            stream, entry_id, (job.node, jobs.encode_result(job.id, hypothesis, self.name))
        )
        self.done += 1

    async def _ack(
        self, stream: str, entry_id: str, answer: tuple[str, dict[str, str]] | None
    ) -> None:
        while True:
            try:
                async with self.redis.pipeline(transaction=True) as pipe:
                    if answer is not None:
                        pipe.xadd(
                            jobs.done_stream(answer[0]),
                            cast(Any, answer[1]),
                            maxlen=DONE_MAXLEN,
                            approximate=True,
                        )
                    pipe.xack(stream, jobs.GROUP, entry_id)
                    pipe.xdel(stream, entry_id)
                    await pipe.execute()
                return
            except (RedisError, OSError) as exc:
                logger.warning("cannot answer job %s (%s); retrying", entry_id, exc)
                await asyncio.sleep(1.0)


def _id(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def main(settings: Settings) -> int:
    """Run a worker until SIGTERM or SIGINT."""
    if not settings.redis_url:
        raise SystemExit("meeting-gateway worker: --redis-url is required")
    name = settings.node_id or f"{socket.gethostname()}-{os.getpid()}"
    if settings.device != "cpu" and not settings.asr_threads:
        settings = dataclasses.replace(settings, asr_threads=1)  # one model copy on a GPU

    async def run() -> None:
        worker = Worker(settings, name)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    asyncio.run(run())
    return 0
