"""deploy/haproxy.cfg in front of two real gateway nodes: a session's key picks its node,
so a reconnecting bot comes back to the node that has its session, and a node that dies
is out within seconds with its keys served by the other one.

The nodes here run without Redis (they share nothing); what is tested is the proxy: where
each connection lands, read from each node's ``/sessions`` and from HAProxy's log.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
import redis.exceptions
import yaml  # type: ignore[import-untyped]
from websockets.asyncio.client import ClientConnection, connect

from .cluster import HAPROXY_BIN, HAPROXY_CFG, ROOT, HAProxy, RedisServer, binary, haproxy_env
from .conftest import wait_for
from .test_resume import Serve
from .timing import scaled

RATE = 16000
#: 20 ms of PCM silence at RATE: the bot's URL carries the rate, no handshake needed.
FRAME = bytes(2 * RATE // 50)
#: Fixed keys, so where each one lands is the same on every run.
KEYS = [f"meeting-{i:02d}" for i in range(20)]
NAMES = ("node1", "node2")  # the servers of deploy/haproxy.cfg, in order


@pytest.fixture
async def nodes(tmp_path: Path) -> AsyncIterator[list[Serve]]:
    """Two gateway nodes (recording only), each with its own data directory."""
    started: list[Serve] = []
    try:
        for name in NAMES:
            node = await Serve.start(tmp_path / name, GATEWAY_LINGER="60")
            started.append(node)  # stopped below even if the next one fails to start
        yield started
    finally:
        for node in started:
            if node.proc.returncode is None:
                await node.stop(signal.SIGKILL)


@pytest.fixture
async def proxy(tmp_path: Path, nodes: list[Serve]) -> AsyncIterator[HAProxy]:
    started = await HAProxy.start(tmp_path, [node.port for node in nodes])
    yield started
    await started.stop()


async def sessions(node: Serve) -> dict[str, dict[str, Any]]:
    """The node's ``GET /sessions``, by key."""

    def get() -> Any:
        url = f"http://127.0.0.1:{node.port}/sessions"
        with urllib.request.urlopen(url, timeout=scaled(5)) as r:
            return json.load(r)

    return {s["key"]: s for s in await asyncio.to_thread(get)}


async def placement(nodes: list[Serve]) -> dict[str, list[str]]:
    """Every key any node has a session for, and the nodes that have it."""
    found: dict[str, list[str]] = {}
    for name, node in zip(NAMES, nodes, strict=True):
        for key in await sessions(node):
            found.setdefault(key, []).append(name)
    return found


async def open_bot(proxy: HAProxy, path: str) -> ClientConnection:
    ws = await connect(proxy.url(path), open_timeout=scaled(10))
    await ws.send(FRAME)
    return ws


async def bot_visit(proxy: HAProxy, key: str) -> None:
    """A bot's output socket through the proxy: open, a frame of audio, close."""
    ws = await open_bot(proxy, f"/bots/{key}?rate={RATE}")
    await ws.close()


async def http_get(url: str) -> int:
    def get() -> int:
        try:
            with urllib.request.urlopen(url, timeout=scaled(5)) as r:
                status: int = r.status
                return status
        except urllib.error.HTTPError as e:
            return e.code

    return await asyncio.to_thread(get)


def haproxy_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``haproxy -c`` on deploy/haproxy.cfg with ``env`` and no other HAPROXY_/GATEWAY_
    variables."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("HAPROXY", "GATEWAY"))}
    return subprocess.run(
        [binary(HAPROXY_BIN), "-c", "-f", str(HAPROXY_CFG)],
        env={**inherited, **env},
        capture_output=True,
        text=True,
        timeout=scaled(30),
        check=False,
    )


def test_the_config_validates_here_and_as_docker_compose_runs_it() -> None:
    local = haproxy_check(haproxy_env(18080, [18081, 18082], 18404))
    assert local.returncode == 0, local.stdout + local.stderr
    # docker-compose.yml mounts this very file and names the nodes by service; those
    # names do not resolve here, and the servers start disabled instead of failing.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["haproxy"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in service["volumes"]
    env = service["environment"]
    assert env["GATEWAY_NODE1"] == "gateway1:8080" and env["GATEWAY_NODE2"] == "gateway2:8080"
    assert service["ports"] == [f"8080{env['HAPROXY_BIND']}"]
    in_compose = haproxy_check(env)
    assert in_compose.returncode == 0, in_compose.stdout + in_compose.stderr
    # Every address comes from the environment: none set is an error, not a default.
    unset = haproxy_check({})
    assert unset.returncode != 0, unset.stdout + unset.stderr


async def test_each_key_stays_on_one_node_and_the_keys_spread(
    nodes: list[Serve], proxy: HAProxy
) -> None:
    # Two visits, then a third with the input socket too, both held open.
    for _ in range(2):
        for key in KEYS:
            await bot_visit(proxy, key)
    held = []
    for key in KEYS:
        held.append(await open_bot(proxy, f"/bots/{key}?rate={RATE}"))
        held.append(await open_bot(proxy, f"/bots/{key}/input?rate={RATE}"))
    try:

        async def both_sockets_on_one_node() -> dict[str, str] | None:
            where = await placement(nodes)
            owner = {}
            for key in KEYS:
                if len(where.get(key, [])) != 1:
                    return None
                [name] = where[key]
                s = (await sessions(nodes[NAMES.index(name)]))[key]
                if not (s["connected"] and s["input_connected"]):
                    return None
                owner[key] = name
            return owner

        owner = await poll(both_sockets_on_one_node)
    finally:
        for ws in held:
            await ws.close()
    assert sorted(await placement(nodes)) == sorted(KEYS)
    for key, name in owner.items():
        # One session per key: the three visits reached the node that had it.
        assert (await sessions(nodes[NAMES.index(name)]))[key]["reconnects"] == 2
    counts = {name: list(owner.values()).count(name) for name in NAMES}
    assert all(counts.values()), counts  # both nodes take meetings

    # Every other URL that names the session goes where its bot goes: speech control,
    # its transcripts, Deepgram's API following it, and a URL with a token.
    targets = {
        key: [
            f"/bots/{key}/control",
            f"/bots/{key}/transcripts",
            f"/v1/listen?session={key}&model=nova-2",
            f"/bots/{key}?rate=24000&token=abc",
        ]
        for key in KEYS[:6]
    }
    for paths in targets.values():
        for path in paths:
            await http_get(proxy.http + path)  # a plain GET: the node answers 404 or 400
    # URLs without a key take turns.
    for i in range(4):
        assert await http_get(f"{proxy.http}/healthz?n={i}") == 200

    def logged() -> dict[str, str] | None:
        routed = {target: server for server, target in proxy.routed()}
        wanted = [p for paths in targets.values() for p in paths] + ["/healthz?n=3"]
        return routed if all(p in routed for p in wanted) else None

    routed = await wait_for(logged)
    for key, paths in targets.items():
        assert {routed[p] for p in paths} == {owner[key]}, (key, owner[key], routed)
    assert {routed[f"/healthz?n={i}"] for i in range(4)} == set(NAMES)


async def test_a_killed_node_s_bots_reconnect_to_the_other_node(
    nodes: list[Serve], proxy: HAProxy
) -> None:
    for key in KEYS[:8]:
        await bot_visit(proxy, key)
    where = await placement(nodes)
    on_node2 = [k for k in KEYS[:8] if where[k] == ["node2"]]
    on_node1 = [k for k in KEYS[:8] if where[k] == ["node1"]]
    assert len(on_node2) >= 2 and on_node1, where
    live = await open_bot(proxy, f"/bots/{on_node2[0]}?rate={RATE}")

    await nodes[1].stop(signal.SIGKILL)
    killed = time.monotonic()
    # The bot whose node died reconnects at once, before any check has failed: the
    # refused connection is retried on the other node.
    await wait_for_close(live)
    await bot_visit(proxy, on_node2[0])
    assert time.monotonic() - killed < scaled(2)
    # The checks take the node out within about 2 s (inter 1s, fall 2).
    await proxy.wait_for({"node2": "DOWN", "node1": "UP"}, within=4)
    assert time.monotonic() - killed < scaled(4)
    # Its keys, new meetings and old, are served by node1 now; node1's keep their place.
    for key in on_node2 + on_node1 + ["a-new-meeting"]:
        await bot_visit(proxy, key)
    left = await sessions(nodes[0])
    assert set(on_node2 + on_node1 + ["a-new-meeting"]) <= set(left)
    assert left[on_node1[0]]["reconnects"] == 1  # the same session, not a new one


async def wait_for_close(ws: ClientConnection) -> None:
    """The socket to the killed node is gone (reset); the bot sees it close."""
    async with asyncio.timeout(scaled(5)):
        await ws.wait_closed()


async def poll(condition: Any, within: float = 10.0) -> Any:
    """:func:`tests.conftest.wait_for` for an async condition."""
    limit = scaled(within)
    try:
        async with asyncio.timeout(limit):
            while not (value := await condition()):  # noqa: ASYNC110 - other processes' state
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"condition not met within {limit} s")
    return value


async def test_the_redis_helper_restarts_on_the_same_port(tmp_path: Path) -> None:
    """tests.cluster.RedisServer, which the cluster tests use to take Redis away."""

    async def get(url: str) -> bytes | str | None:
        client = redis.asyncio.Redis.from_url(url, socket_connect_timeout=1)
        try:
            value: bytes | str | None = await client.get("k")
            return value
        finally:
            await client.aclose()

    server = await RedisServer.start(tmp_path)
    try:
        url = server.url
        client = redis.asyncio.Redis.from_url(url)
        await client.set("k", "v")
        await client.aclose()
        assert await get(url) == b"v"
        await server.restart(down_for=0.2)
        assert server.url == url
        assert await get(url) is None  # the same port, and nothing persisted
        await server.kill()
        with pytest.raises(redis.exceptions.ConnectionError):
            await get(url)
        await server.restart()
        assert await get(url) is None
    finally:
        await server.stop()
