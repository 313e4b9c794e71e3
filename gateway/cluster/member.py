"""The gateway's side of cluster mode: what a :class:`~gateway.server.Gateway` calls.

It ties a :class:`~.node.ClusterNode` to the session manager: claims before a bot is
served, hands sessions over when asked, releases a session's lease when it ends,
sweeps for orphans, and answers ``GET /sessions`` for the whole cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from .. import reports
from ..storage.offload import blocking
from . import parts
from .node import ClusterNode
from .schema import default_node_id
from .sweep import Sweeper

if TYPE_CHECKING:
    from ..server import Gateway
    from ..session import Session

logger = logging.getLogger("gateway.cluster")

#: Seconds between orphan sweeps (and the first one right at start).
SWEEP_INTERVAL = 5.0


class Membership:
    def __init__(self, gateway: Gateway) -> None:
        s = gateway.settings
        self.gateway = gateway
        self.node = ClusterNode(
            s.redis_url,
            s.node_id or default_node_id(),
            s.lease,
            gateway.metrics.registry,
            address=f"{s.host}:{s.port}",
        )
        assert gateway.relay is not None, "cluster mode relays transcripts"
        self.relay = gateway.relay
        sessions = gateway.sessions
        sessions.adopt = True
        sessions.on_ended = self._ended
        sessions.on_opened = self._opened
        sessions.mirror = self.relay.journal
        self.node.hand_over = self._hand_over
        self.node.summaries = lambda: ((x.key, reports.summary(x)) for x in sessions)
        self.sweeper = Sweeper(self.node, sessions)
        self._sweeping: asyncio.Task[None] | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.node.start()
        await self.sweeper.sweep()
        self._sweeping = asyncio.create_task(self._sweep_forever(), name="orphan-sweep")

    async def stop(self) -> None:
        """After the sessions were suspended: relay their last messages, let their leases
        go."""
        await self.relay.close()
        if self._sweeping is not None:
            self._sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeping
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        await self.node.stop()

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            await self.sweeper.sweep()

    async def claim(self, key: str) -> None:
        """Own ``key`` before its bot is served here (see :meth:`ClusterNode.claim`)."""
        if self.gateway.sessions.get(key) is not None and key in self.node.owned:
            return
        await self.node.claim(key)
        if self.gateway.sessions.get(key) is None:
            await self._part(key)

    async def _part(self, key: str) -> None:
        """Start a new part here if the session's files are on another node's disk."""
        lines = await self.relay.journal_lines(key)
        root = self.gateway.sessions.root
        if not lines or not await blocking(parts.needs_part, lines, key, root):
            return
        finals = await self.relay.finals(key) or []
        directory = self.gateway.sessions.new_directory(key)
        await blocking(parts.write_part, directory, lines, finals)
        logger.info("session %s continues in a new part, %s", key, directory)

    def _opened(self, session: Session) -> None:
        """This node serves ``session`` from now on: say so in its journal."""
        sample = int(session.audio_seconds * session.sample_rate) if session.sample_rate else 0
        where = {"node": self.node.id, "directory": str(session.directory)}
        session.add_part({**where, "sample": sample, "wall": time.time()})

    async def _hand_over(self, key: str) -> None:
        await self.gateway.sessions.hand_over(key)
        # The next owner's messages (and journal lines) must follow this one's last.
        await self.relay.flush()

    def _ended(self, key: str) -> None:
        task = asyncio.get_running_loop().create_task(self.node.release(key))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def sessions(self) -> list[dict[str, Any]]:
        """``GET /sessions`` across the cluster; this node's own when Redis is away."""
        here = {x.key: {**reports.summary(x), "node": self.node.id} for x in self.gateway.sessions}
        rows = await self.node.all_sessions()
        if rows is None:
            return list(here.values())
        merged = {str(r.get("key")): r for r in rows if r.get("node") != self.node.id}
        merged.update(here)  # fresher than what this node published
        return [merged[k] for k in sorted(merged)]
