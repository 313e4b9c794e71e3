"""Load generators in processes of their own, one beside each gateway process.

:mod:`benchmarks.cluster` drives every gateway process from one
:class:`~benchmarks.loadgen.LoadGenerator` in its own event loop by default. Pinned
(``--pin``), that loop is allowed on every core of the comparison, so with two gateway
processes one thread sends twice the bots and moves between the two cores, taking its
turn on whichever gateway's core it lands. :class:`GeneratorShards` instead runs one
generator process per gateway process, pinned to that gateway's core, sending only to
it: with P processes each core then carries exactly what the single core carries at P=1
for its share of the bots (a gateway, the generator of its bots, a share of Redis and
of the kernel's loopback work), which is what a second process on a second core adds.

Each shard is a ``multiprocessing`` child (spawned, so it starts with a fresh
interpreter) running a :class:`LoadGenerator` on uvloop. The parent sends it commands
over a pipe, and the shard reads them with a reader on the pipe's descriptor, so its
loop runs no thread: ``connect``, ``start``, ``reset`` (the lateness histogram),
``stop`` (answers with the histogram and the write pauses), ``close`` (answers with
every bot's key and frame count, then exits).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from benchmarks.loadgen import LATE_BINS, LoadGenerator, lateness_ms


@dataclass
class BotCount:
    """What a shard reports for one of its bots once it has closed."""

    key: str
    frames_sent: int
    rosters_sent: int


@dataclass
class Shard:
    process: Any  # multiprocessing's SpawnProcess
    conn: Connection

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return int(self.process.pid)


class GeneratorShards:
    """One generator process per gateway port, each on the cores given for it.

    The same calls as :class:`LoadGenerator`, asynchronous where a shard must answer:
    :meth:`connect` per port, :meth:`start_audio`, :meth:`reset_lateness`,
    :meth:`stop_audio` (after which the lateness and write pauses can be read), then
    :meth:`close` (after which :attr:`bots` lists every bot in connect order).
    """

    def __init__(
        self,
        host: str,
        frames: list[bytes],
        frame_samples: int,
        rate: int,
        *,
        phases: int = 5,
        roster_every: float = 3.0,
    ) -> None:
        self._args = (host, frames, frame_samples, rate, phases, roster_every)
        self.shards: list[Shard] = []
        self.late = [0] * LATE_BINS
        self.write_pauses = 0
        self.bots: list[BotCount] = []

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.shards]

    async def connect(self, port: int, n: int, cores: set[int] | None) -> None:
        """A new shard on ``cores`` with ``n`` bots connected to ``port``."""
        ctx = mp.get_context("spawn")
        ours, theirs = ctx.Pipe()
        prefix = f"bench-s{len(self.shards)}"
        process = ctx.Process(
            target=_shard_main,
            args=(theirs, *self._args, prefix, cores),
            name=prefix,
            daemon=True,
        )
        process.start()
        theirs.close()
        shard = Shard(process, ours)
        self.shards.append(shard)
        await self._ask(shard, "connect", port, n)

    def start_audio(self) -> None:
        for shard in self.shards:
            shard.conn.send(("start",))

    def reset_lateness(self) -> None:
        for shard in self.shards:
            shard.conn.send(("reset",))

    async def stop_audio(self) -> None:
        replies = await asyncio.gather(*(self._ask(s, "stop") for s in self.shards))
        self.late = [sum(column) for column in zip(*(r["late"] for r in replies), strict=True)]
        self.write_pauses = sum(r["write_pauses"] for r in replies)

    async def close(self) -> int:
        """Close every bot as :meth:`LoadGenerator.close` does; the shards then exit."""
        replies = await asyncio.gather(*(self._ask(s, "close") for s in self.shards))
        self.bots = [BotCount(*bot) for r in replies for bot in r["bots"]]
        for shard in self.shards:
            await asyncio.to_thread(shard.process.join, 10)
        return sum(r["stuck"] for r in replies)

    def terminate(self) -> None:
        """Stop whatever shard is still running (after a failure)."""
        for shard in self.shards:
            if shard.process.is_alive():
                shard.process.kill()
                shard.process.join(5)

    @property
    def frames_sent(self) -> int:
        return sum(b.frames_sent for b in self.bots)

    def lateness_ms(self) -> dict[str, float | int | None]:
        return lateness_ms(self.late)

    async def _ask(self, shard: Shard, *command: Any) -> dict[str, Any]:
        shard.conn.send(command)
        try:
            reply: dict[str, Any] = await asyncio.to_thread(shard.conn.recv)
        except EOFError:
            raise RuntimeError(f"generator shard {shard.pid} exited") from None
        if "error" in reply:
            raise RuntimeError(f"generator shard {shard.pid}: {reply['error']}")
        return reply


def _shard_main(
    conn: Connection,
    host: str,
    frames: list[bytes],
    frame_samples: int,
    rate: int,
    phases: int,
    roster_every: float,
    prefix: str,
    cores: set[int] | None,
) -> None:
    if cores is not None:
        os.sched_setaffinity(0, cores)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    import uvloop

    async def serve() -> None:
        gen = LoadGenerator(
            host,
            0,
            frames,
            frame_samples,
            rate,
            prefix=prefix,
            phases=phases,
            roster_every=roster_every,
        )
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

        def read() -> None:
            try:
                inbox.put_nowait(conn.recv())
            except EOFError:  # the parent went away
                loop.remove_reader(conn.fileno())
                inbox.put_nowait(("exit",))

        loop.add_reader(conn.fileno(), read)
        while True:
            command, *args = await inbox.get()
            reply: dict[str, Any] = {}
            try:
                if command == "connect":
                    gen.port = args[0]
                    await gen.connect(args[1])
                elif command == "start":
                    gen.start_audio()
                    continue
                elif command == "reset":
                    gen.reset_lateness()
                    continue
                elif command == "stop":
                    await gen.stop_audio()
                    reply = {"late": gen.late, "write_pauses": gen.write_pauses}
                elif command == "exit":
                    await gen.close(limit=1.0)
                    return
                elif command == "close":
                    stuck = await gen.close()
                    bots = [(b.key, b.frames_sent, b.rosters_sent) for b in gen.bots]
                    conn.send({"stuck": stuck, "bots": bots})
                    return
                else:
                    reply = {"error": f"unknown command {command!r}"}
            except Exception as exc:  # reported to the parent, which raises it there
                reply = {"error": repr(exc)}
            conn.send(reply)

    with contextlib.suppress(KeyboardInterrupt):  # the parent's Ctrl-C reaches us too
        uvloop.run(serve())
