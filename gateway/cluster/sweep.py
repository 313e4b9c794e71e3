"""Orphans: unfinished sessions in the shared data directory that no live node owns.

A node that dies leaves its sessions' journals unfinished and its leases running out.
Every node sweeps the data directory now and then (at start-up too, which replaces a
single process's :meth:`~gateway.sessions.SessionManager.recover`): an unfinished session
whose owner is gone is taken (one node wins the lease) and lingers there, so that a bot
that comes back finds it and one that does not has it finalized, once.

Reading journals is file work: it runs in a thread. Directories whose journal says the
session ended are remembered and not read again.
"""

from __future__ import annotations

import logging
from pathlib import Path

from redis.exceptions import RedisError

from ..sessions import SessionManager
from ..storage import journal
from ..storage.offload import blocking
from .node import ClusterNode

logger = logging.getLogger("gateway.cluster")


class Sweeper:
    def __init__(self, node: ClusterNode, sessions: SessionManager) -> None:
        self.node = node
        self.sessions = sessions
        self._ended: set[Path] = set()
        self._keys: dict[Path, str] = {}

    def _scan(self) -> list[tuple[str, Path]]:
        found = []
        for path in sorted(self.sessions.root.glob(f"*/{journal.NAME}")):
            directory = path.parent
            if directory in self._ended:
                continue
            key = self._keys.get(directory)
            if key is None:
                key = journal.key_of(directory)
                if key is None:
                    continue
                self._keys[directory] = key
            found.append((key, directory))
        return found

    async def sweep(self) -> int:
        """Adopt every orphan this node wins; returns how many."""
        try:
            return await self._sweep()
        except (RedisError, OSError) as exc:
            logger.warning("orphan sweep skipped: %s", exc)
            return 0

    async def _sweep(self) -> int:
        found = await blocking(self._scan)
        candidates = [(k, d) for k, d in found if self.sessions.get(k) is None]
        if not candidates:
            return 0
        owners = await self.node.owners([k for k, _ in candidates])
        alive: dict[str, bool] = {}
        adopted: list[journal.Resume] = []
        for (key, directory), owner in zip(candidates, owners, strict=True):
            if owner is not None:
                if owner not in alive:
                    alive[owner] = owner == self.node.id or await self.node.alive(owner)
                if alive[owner]:
                    continue
            state = await blocking(journal.unfinished_in, directory)
            if state is None:
                self._ended.add(directory)
                continue
            if self.sessions.get(key) is not None or not await self.node.take(key, owner):
                continue
            adopted.append(state)
        if adopted:
            # Two unfinished directories of one key: recover ends the older one.
            self.sessions.recover(adopted)
            for state in adopted:
                logger.info("node %s adopted orphan session %s", self.node.id, state.key)
        return len(adopted)
