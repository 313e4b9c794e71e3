"""Subscribers in cluster mode: every node's, fed from the cluster's transcript streams.

A :class:`RelayedHub` is the :class:`~.subscribers.SubscriberHub` of a cluster node. A
session publishing here does not reach subscribers directly: its messages go to the
relay (:class:`gateway.pipeline.Relay`, Redis Streams), and each node follows the
streams its own subscribers need, one task per session key (and one for ``/transcripts``,
every session). So a subscriber on any node hears a session owned by any other, and
keeps hearing it when the session moves between nodes: the stream does not move.

A subscriber that joins first gets the finals still in the stream (the follower
replays them before it attaches), then the live messages, with the same slow-reader
rules as on a single node. A meeting's ``end`` entry closes its subscribers; a
session suspended for another node writes none.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from gateway.pipeline import Relay

from .subscribers import Channel, SubscriberHub

logger = logging.getLogger("pipelines.transcription.relayed")


class RelayedHub(SubscriberHub):
    def __init__(self, relay: Relay, registry: CollectorRegistry, **kwargs: Any) -> None:
        super().__init__(registry, **kwargs)
        self.relay = relay
        self._followers: dict[str | None, asyncio.Task[None]] = {}
        self._ready: dict[str | None, asyncio.Event] = {}
        self._readers: dict[str | None, int] = {}

    # -- the owner's side: everything goes to the relay ----------------------------------

    def open(self, key: str, jsonl: Path, finals: int = 0) -> Channel:
        return Channel(key, deque(maxlen=1), finals=finals, jsonl=jsonl, live=True)

    def publish(self, channel: Channel, text: str, *, final: bool, partial: bool) -> None:
        self.relay.publish(
            channel.key, "final" if final else "partial" if partial else "event", text
        )

    def close(self, channel: Channel, ended: bool = True) -> None:
        if ended:  # suspended: the next owner goes on in the same stream
            self.relay.publish(channel.key, "end", "")

    # -- every node's side: followers feed the subscribers -----------------------------

    async def serve(self, ws: Any, key: str | None) -> None:
        self._readers[key] = self._readers.get(key, 0) + 1
        try:
            if key not in self._followers:
                self._ready[key] = asyncio.Event()
                self._followers[key] = asyncio.create_task(self._follow(key))
            # Attach only once the stream's finals so far are in the channel's history:
            # they are then sent as the backlog, not through the bounded live queue.
            await self._ready[key].wait()
            await super().serve(ws, key)
        finally:
            self._readers[key] -= 1
            if not self._readers[key]:
                del self._readers[key]
                self._ready.pop(key, None)
                # It ends by itself within a blocking read (see Relay.follow).
                self._followers.pop(key, None)

    async def shutdown(self) -> None:
        self._followers.clear()  # each ends within a blocking read
        await super().shutdown()

    def _attach(self, sub: Any) -> None:
        super()._attach(sub)
        if sub.key is None:
            sub.backlog = []  # ``/transcripts`` follows every session from now on
        else:
            # The replayed history only: the finals are not on this node's disk.
            sub.backlog = [(None, 0, list(c.history)) for c in self._live(sub.key)]

    def _live(self, key: str) -> list[Channel]:
        channel = self._channels.get(key)
        return [channel] if channel is not None and channel.live else []

    async def _follow(self, key: str | None) -> None:
        try:
            await self._feed(key)
        except Exception:  # a defect: its subscribers hear nothing more, say why
            logger.exception("following the transcript of %s failed", key or "every session")
            raise

    async def _feed(self, key: str | None) -> None:
        me = asyncio.current_task()

        def running() -> bool:
            return self._followers.get(key) is me

        async for _, kind, text, replayed in self.relay.follow(key, running):
            if not running():
                return
            if kind == "ready":
                ready = self._ready.get(key)
                if ready is not None:
                    ready.set()
                continue
            if key is None:
                if kind != "end":
                    self._fanout(self._everyone, text, kind == "partial")
                continue
            channel = self._channel(key)
            if kind == "end":
                if replayed:  # an earlier meeting with this key: not this one's
                    channel.history.clear()
                    channel.finals = 0
                    channel.live = False
                else:
                    super().close(channel)
            else:
                channel.live = True
                if kind == "final":
                    channel.history.append(text)
                    channel.finals += 1
                if not replayed:
                    self._fanout(channel.subscribers, text, kind == "partial")
