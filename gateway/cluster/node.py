"""One gateway process as a member of a cluster: heartbeat, session leases, hand-overs.

Redis holds, under the ``gateway:`` prefix:

===============================  =====================================================
``node:{id}``                    the node's heartbeat (expires ``HEARTBEAT_TTL`` s after
                                 the node stops renewing it: dead or cut off)
``nodes``                        hash: node id to its description (pid, host, start)
``owner:{key}``                  the node that owns session ``key``, with a lease of
                                 ``lease`` seconds renewed every ``lease / 5``
``sessions:{id}``                hash: what ``GET /sessions`` shows of the node's
                                 sessions, rewritten every ``SUMMARY_INTERVAL`` s
channel ``handoff:{id}``         requests to node ``id`` to give a session up
===============================  =====================================================

A bot may reach any node: at first, after a load balancer moved it, or after its node
died. :meth:`ClusterNode.claim` makes the node the session's owner before the bot's
socket is upgraded: a free session is taken at once; a live owner is asked to hand the
session over (it suspends it, as a stopping process does, and passes the lease on); a
dead owner's lease is taken. The session's journal and files are in the shared data
directory, so the new owner resumes it exactly as a restarted process would.

Sessions whose owner died and whose bot does not come back are adopted by a surviving
node's sweep, linger there, and are finalized once (by their one owner).

Losing Redis never stops a meeting: claims go ahead locally (counted), the node keeps
its sessions, and when Redis answers again every lease is renewed or taken back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError

from .schema import (
    NODES,
    RELEASE,
    RENEW,
    TAKE,
    ClusterMetrics,
    handoff_channel,
    node_key,
    owner_key,
    sessions_key,
)

logger = logging.getLogger("gateway.cluster")

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0
SUMMARY_INTERVAL = 2.0
#: How long a claim waits for a live owner to hand a session over before taking it.
HANDOFF_WAIT = 5.0
POLL = 0.05

#: Gives a session up: suspend it, close its bot's sockets, forget it (``key``).
HandOver = Callable[[str], Awaitable[None]]
#: What ``GET /sessions`` shows of every local session: (key, summary) pairs.
Summaries = Callable[[], Iterable[tuple[str, dict[str, Any]]]]


async def every(seconds: float, job: Callable[[], Awaitable[None]]) -> None:
    """Run ``job`` every ``seconds`` until cancelled. A defect in one run is logged once
    and the next runs go on: a cluster member stays in the cluster."""
    failed = False
    while True:
        await asyncio.sleep(seconds)
        try:
            await job()
        except Exception:
            if not failed:
                logger.exception("cluster task %s failed; it goes on", job.__name__)
            failed = True


class ClusterNode:
    """This process's membership of the cluster."""

    def __init__(
        self,
        url: str,
        node_id: str,
        lease: float,
        registry: CollectorRegistry,
        *,
        address: str = "",
    ) -> None:
        self.id = node_id
        self.lease_ms = int(lease * 1000)
        self.renew_every = lease / 5
        self.address = address
        self.metrics = ClusterMetrics(registry)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=1.0, decode_responses=True
        )
        self._renew = self.redis.register_script(RENEW)
        self._release = self.redis.register_script(RELEASE)
        self._take = self.redis.register_script(TAKE)
        self.owned: set[str] = set()
        self.hand_over: HandOver | None = None
        self.summaries: Summaries = lambda: ()
        self.up: bool | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._handing: dict[str, asyncio.Task[None]] = {}
        self.started_at = time.time()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Join: heartbeat, listen for hand-over requests. Redis may be down: the node
        starts anyway and joins when it answers."""
        await self._beat()
        self._tasks = [
            asyncio.create_task(every(HEARTBEAT_INTERVAL, self._beat), name="heartbeat"),
            asyncio.create_task(every(self.renew_every, self._renew_all), name="leases"),
            asyncio.create_task(every(SUMMARY_INTERVAL, self.publish), name="summaries"),
            asyncio.create_task(self._listen(), name="handoffs"),
        ]
        logger.info("node %s joined the cluster", self.id)

    async def stop(self) -> None:
        """Leave: release every lease (the sessions were suspended, so another node can
        adopt them at once) and the heartbeat."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        with contextlib.suppress(RedisError, OSError):
            for key in list(self.owned):
                await self._release(keys=[owner_key(key)], args=[self.id])
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.delete(node_key(self.id), sessions_key(self.id))
                pipe.hdel(NODES, self.id)
                await pipe.execute()
        self.owned.clear()
        await self.redis.aclose()

    def _failed(self, op: str, exc: BaseException) -> None:
        if self.up is not False:  # logged once per outage, counted always
            logger.warning("redis unreachable (%s): %s; going on locally", op, exc)
        self.up = False
        self.metrics.redis_up.set(0)
        self.metrics.redis_errors.labels(op).inc()

    def _ok(self) -> None:
        if self.up is False:
            logger.info("redis reachable again")
        self.up = True
        self.metrics.redis_up.set(1)

    async def _beat(self) -> None:
        info = json.dumps(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "address": self.address,
                "started_at": self.started_at,
            }
        )
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.set(node_key(self.id), info, px=int(HEARTBEAT_TTL * 1000))
                pipe.hset(NODES, self.id, info)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("heartbeat", exc)
            return
        self._ok()

    # -- leases ---------------------------------------------------------------------------

    async def claim(self, key: str) -> str:
        """Become the owner of ``key`` before its bot is served; returns how (see
        :class:`ClusterMetrics.claims`). Waits at most about :data:`HANDOFF_WAIT` s."""
        how = await self._claim(key)
        self.owned.add(key)
        self.metrics.owned.set(len(self.owned))
        if how != "mine":
            self.metrics.claims.labels(how).inc()
            if how != "free":
                logger.info("node %s owns session %s (%s)", self.id, key, how)
        return how

    async def _claim(self, key: str) -> str:
        deadline = time.monotonic() + HANDOFF_WAIT
        asked: str | None = None
        try:
            while True:
                if await self.redis.set(owner_key(key), self.id, nx=True, px=self.lease_ms):
                    return "handed" if asked else "free"
                found = await self.redis.get(owner_key(key))
                owner = None if found is None else str(found)
                if owner == self.id:
                    return "handed" if asked else "mine"
                if owner is None:
                    continue  # released between the two calls
                if not await self.redis.exists(node_key(owner)):
                    if await self._take(
                        keys=[owner_key(key)], args=[self.id, owner, self.lease_ms]
                    ):
                        return "taken"
                    continue
                if asked != owner:
                    request = json.dumps({"key": key, "to": self.id})
                    await self.redis.publish(handoff_channel(owner), request)
                    asked = owner
                if time.monotonic() > deadline:
                    logger.warning(
                        "node %s did not hand session %s over within %.0f s; taking it",
                        owner,
                        key,
                        HANDOFF_WAIT,
                    )
                    if await self._take(
                        keys=[owner_key(key)], args=[self.id, owner, self.lease_ms]
                    ):
                        return "taken"
                await asyncio.sleep(POLL)
        except (RedisError, OSError) as exc:
            self._failed("claim", exc)
            return "local"

    async def release(self, key: str) -> None:
        """The session ended here: let the key go."""
        self.owned.discard(key)
        self.metrics.owned.set(len(self.owned))
        try:
            await self._release(keys=[owner_key(key)], args=[self.id])
        except (RedisError, OSError) as exc:
            self._failed("release", exc)  # the lease runs out by itself

    async def _renew_all(self) -> None:
        keys = sorted(self.owned)
        if not keys:
            return
        try:
            results = await self._renew(
                keys=[owner_key(k) for k in keys], args=[self.id, self.lease_ms]
            )
        except (RedisError, OSError) as exc:
            self._failed("renew", exc)
            return
        self._ok()
        for key, result in zip(keys, results, strict=True):
            if int(result) == 0 and key in self.owned:
                # Another node took the session while this one could not renew (Redis
                # was away longer than the lease): it is theirs now.
                logger.warning("node %s lost session %s to another node", self.id, key)
                self.metrics.handoffs.labels("lost").inc()
                self._give_up(key)

    # -- hand-overs -----------------------------------------------------------------------

    async def _listen(self) -> None:
        """Hand-over requests addressed to this node, re-subscribing after an outage."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(handoff_channel(self.id))
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            request = json.loads(message["data"])
                            self._requested(str(request["key"]), str(request["to"]))
            except (RedisError, OSError) as exc:
                self._failed("subscribe", exc)
                await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _requested(self, key: str, to: str) -> None:
        if to == self.id:
            return
        logger.info("node %s hands session %s over to %s", self.id, key, to)
        self.metrics.handoffs.labels("asked").inc()
        self._give_up(key, to=to)

    def _give_up(self, key: str, *, to: str | None = None) -> None:
        if key in self._handing:
            return
        self.owned.discard(key)
        self.metrics.owned.set(len(self.owned))
        task = asyncio.create_task(self._hand(key, to))
        self._handing[key] = task
        task.add_done_callback(lambda _: self._handing.pop(key, None))

    async def _hand(self, key: str, to: str | None) -> None:
        try:
            if self.hand_over is not None:
                await self.hand_over(key)
        except Exception:
            logger.exception("handing session %s over failed", key)
        if to is not None:
            # The lease passes to the asking node in one step: released, the session
            # would look like an orphan (suspended, no owner) to a sweep, this node's
            # included, before the asking node polled for it.
            try:
                await self._take(keys=[owner_key(key)], args=[to, self.id, self.lease_ms])
            except (RedisError, OSError) as exc:
                self._failed("release", exc)

    # -- the cluster's view ---------------------------------------------------------------

    async def publish(self) -> None:
        """Rewrite this node's part of ``GET /sessions``."""
        rows = {key: json.dumps({**summary, "node": self.id}) for key, summary in self.summaries()}
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(sessions_key(self.id))
                if rows:
                    # redis-py types the mapping invariantly: str keys are fine at run time
                    pipe.hset(sessions_key(self.id), mapping=rows)  # type: ignore[arg-type]
                    pipe.pexpire(sessions_key(self.id), int(SUMMARY_INTERVAL * 3000))
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("publish", exc)

    async def alive_nodes(self) -> list[str]:
        nodes = sorted(str(n) for n in await self.redis.hkeys(NODES))
        if not nodes:
            return []
        beats = await self.redis.mget([node_key(n) for n in nodes])
        alive = [n for n, beat in zip(nodes, beats, strict=True) if beat is not None]
        if len(alive) < len(nodes):  # a node that comes back beats itself in
            await self.redis.hdel(NODES, *(set(nodes) - set(alive)))
        return alive

    async def all_sessions(self) -> list[dict[str, Any]] | None:
        """Every live node's sessions, or None when Redis cannot be asked."""
        try:
            nodes = await self.alive_nodes()
            async with self.redis.pipeline(transaction=False) as pipe:
                for node in nodes:
                    pipe.hvals(sessions_key(node))
                parts = await pipe.execute()
        except (RedisError, OSError) as exc:
            self._failed("sessions", exc)
            return None
        rows = [json.loads(v) for part in parts for v in part]
        return sorted(rows, key=lambda r: str(r.get("key")))

    async def owners(self, keys: list[str]) -> list[str | None]:
        """The owner of each key (None: nobody), dead owners included."""
        if not keys:
            return []
        values = await self.redis.mget([owner_key(k) for k in keys])
        return [None if v is None else str(v) for v in values]

    async def alive(self, node: str) -> bool:
        return bool(await self.redis.exists(node_key(node)))

    async def take(self, key: str, dead_owner: str | None) -> bool:
        """Take ``key`` if nobody or ``dead_owner`` holds it (an orphan's sweep)."""
        ok = bool(
            await self._take(keys=[owner_key(key)], args=[self.id, dead_owner or "", self.lease_ms])
        )
        if ok:
            self.owned.add(key)
            self.metrics.owned.set(len(self.owned))
            self.metrics.claims.labels("adopted").inc()
        return ok
