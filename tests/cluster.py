"""Real processes for the cluster tests, on 127.0.0.1 free ports: ``redis-server`` and
HAProxy with ``deploy/haproxy.cfg``, the very file docker-compose.yml mounts.

Gateway nodes are ``python -m gateway serve`` subprocesses: :class:`tests.test_resume.Serve`.
A missing binary fails the test with what to install (``make testdata``); nothing skips.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import shutil
import signal
import urllib.request
from pathlib import Path

import pytest
import redis.asyncio
import redis.exceptions

from gateway.cluster.supervisor import free_port

from .timing import scaled

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"
HAPROXY_BIN = "/usr/sbin/haproxy"
REDIS_BIN = "/usr/bin/redis-server"


def binary(path: str) -> str:
    """``path`` if it is there (else the same name on PATH); fails the test if neither."""
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(Path(path).name)
    if found is None:
        pytest.fail(f"{path} is missing: `make testdata` installs it (apt-get)")
    return found


async def _stop(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), scaled(10))
        except TimeoutError:
            proc.kill()
            await proc.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class RedisServer:
    """``redis-server`` without persistence on a port of its own, kept across restarts."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.log = directory / "redis.log"
        self.proc: asyncio.subprocess.Process | None = None

    @classmethod
    async def start(cls, tmp_path: Path, port: int | None = None) -> RedisServer:
        directory = tmp_path / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        server = cls(directory, port or free_port())
        await server._launch()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _launch(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                binary(REDIS_BIN),
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        await self._wait_ready()

    async def _wait_ready(self) -> None:
        client = redis.asyncio.Redis.from_url(self.url, socket_connect_timeout=1)
        limit = scaled(10)
        try:
            async with asyncio.timeout(limit):
                while True:
                    if self.proc is not None and self.proc.returncode is not None:
                        pytest.fail(f"redis-server exited:\n{_tail(self.log)}")
                    try:
                        if await client.ping():
                            return
                    except (redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError):
                        pass
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"redis-server did not answer PING within {limit} s:\n{_tail(self.log)}")
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Shut it down (SIGTERM); nothing is saved."""
        if self.proc is not None:
            await _stop(self.proc, signal.SIGTERM)

    async def kill(self) -> None:
        """SIGKILL: as if the machine under it went away."""
        if self.proc is not None:
            await _stop(self.proc, signal.SIGKILL)

    async def restart(self, down_for: float = 0) -> None:
        """Stop, stay down ``down_for`` seconds, start again on the same port (empty)."""
        await self.stop()
        await asyncio.sleep(down_for)
        await self._launch()


class HAProxy:
    """HAProxy on ``deploy/haproxy.cfg`` in front of gateway nodes on 127.0.0.1.

    The config names two servers, ``node1`` and ``node2``: ``nodes[0]`` and ``nodes[1]``.
    Its stats page (``HAPROXY_STATS_BIND``) tells each server's health-check state.
    """

    def __init__(
        self, proc: asyncio.subprocess.Process, port: int, stats_port: int, log: Path
    ) -> None:
        self.proc = proc
        self.port = port
        self.stats_port = stats_port
        self.log = log

    @classmethod
    async def start(
        cls, tmp_path: Path, nodes: list[int], *, wait_up: bool = True, config: Path = HAPROXY_CFG
    ) -> HAProxy:
        """Start it and wait until it accepts, and with ``wait_up`` until every node is UP."""
        if len(nodes) != 2:
            raise ValueError(f"deploy/haproxy.cfg has two servers, not {len(nodes)}")
        directory = tmp_path / "haproxy"
        directory.mkdir(parents=True, exist_ok=True)
        port, stats_port = free_port(), free_port()
        log = directory / "haproxy.log"
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                binary(HAPROXY_BIN),
                "-db",
                "-f",
                str(config),
                env={**os.environ, **haproxy_env(port, nodes, stats_port)},
                cwd=directory,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        proxy = cls(proc, port, stats_port, log)
        try:
            await proxy._wait_listening()
            if wait_up:
                await proxy.wait_for({"node1": "UP", "node2": "UP"})
        except BaseException:
            await proxy.stop()
            raise
        return proxy

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _wait_listening(self) -> None:
        limit = scaled(10)
        try:
            async with asyncio.timeout(limit):
                while True:
                    if self.proc.returncode is not None:
                        pytest.fail(f"haproxy exited ({self.proc.returncode}):\n{_tail(self.log)}")
                    try:
                        _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    except OSError:
                        await asyncio.sleep(0.05)
                        continue
                    writer.close()
                    await writer.wait_closed()
                    return
        except TimeoutError:
            pytest.fail(f"haproxy did not listen within {limit} s:\n{_tail(self.log)}")

    async def servers(self) -> dict[str, str]:
        """Each gateway server's state from the stats page: ``UP``, ``DOWN``, ``UP 1/2``..."""
        url = f"http://127.0.0.1:{self.stats_port}/;csv"

        def get() -> str:
            with urllib.request.urlopen(url, timeout=scaled(5)) as r:
                body: bytes = r.read()
                return body.decode()

        text = (await asyncio.to_thread(get)).removeprefix("# ")
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "nodes" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    async def wait_for(self, states: dict[str, str], within: float = 10.0) -> float:
        """Wait until the named servers are in those states; returns how long it took."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        limit = scaled(within)
        seen: dict[str, str] = {}
        try:
            async with asyncio.timeout(limit):
                while True:
                    seen = await self.servers()
                    if all(seen.get(name) == state for name, state in states.items()):
                        return loop.time() - began
                    await asyncio.sleep(0.05)
        except TimeoutError:
            pytest.fail(f"haproxy servers {seen}, not {states} within {limit} s")

    def routed(self) -> list[tuple[str, str]]:
        """(server, request target) of every request logged so far, oldest first."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            # 127.0.0.1:5678 [date] gateway nodes/node1 0/0/0/1/1 404 89 ... "GET /x HTTP/1.1"
            fields = line.split()
            if len(fields) > 4 and fields[2] == "gateway" and '"' in line:
                request = line[line.index('"') + 1 :].split()
                if len(request) >= 2:
                    found.append((fields[3].removeprefix("nodes/"), request[1]))
        return found

    async def stop(self) -> None:
        await _stop(self.proc, signal.SIGTERM)


def haproxy_env(port: int, nodes: list[int], stats_port: int) -> dict[str, str]:
    """The environment ``deploy/haproxy.cfg`` reads, for nodes on 127.0.0.1."""
    return {
        "HAPROXY_BIND": f"127.0.0.1:{port}",
        "GATEWAY_NODE1": f"127.0.0.1:{nodes[0]}",
        "GATEWAY_NODE2": f"127.0.0.1:{nodes[1]}",
        "HAPROXY_STATS_BIND": f"127.0.0.1:{stats_port}",
    }
