"""Cluster benchmark: N simulated bots at real time against P gateway processes and Redis.

What it answers: does a second process on the machine take more bots at the same ingest
lag, and what does cluster mode cost in Redis? For each (P, N) the script starts, from
scratch, a ``redis-server`` on a free port (no persistence) and P gateway processes that
are cluster nodes on it (``serve --redis-url ... --pipelines recording``: recording and VAD
on, uvloop, one shared data directory), then drives N bots with :mod:`benchmarks.loadgen`
from this process exactly as :mod:`benchmarks.ingest` does: 10 ms frames of real speech
at 24 kHz (by default), a roster change every few seconds per bot.

How the processes are run, and why not ``--workers P``: ``serve --workers P`` puts P
workers on one port with ``SO_REUSEPORT``, and a scrape of ``/metrics`` through that port
reaches whichever worker the kernel picks, so per-worker histograms and counters cannot
be read (the README's Cluster section says the same). Here the P nodes are P separate
``serve --workers 1`` processes, each on a port of its own, named ``<node-id>-w0``,
``-w1``... as the supervisor names its workers, and the load generator spreads the bots
over the ports itself: shares differ by at most one bot, as round robin gives (what
``SO_REUSEPORT`` does, minus the kernel's hashing noise). Each process is a node like a
worker: same Redis, same data directory, same settings. What is left out is the
supervisor (a parent that only waits) and ``worker_env``'s share of the cores for
recognition, which the recording pipeline does not use.

Reported per (P, N), over a window after a warm-up:

* ingest lag p50/p99 and event-loop lag p99 from every process's own histograms
  (``gateway_ingest_lag_seconds``, ``gateway_event_loop_lag_seconds``): the difference
  between scrapes at the start and end of the window, per process, then the bucket
  counts summed over processes before the quantiles are taken (so the p99 is that of
  every observation in the cluster, as fine as the buckets); each process's own too;
* frames lost: frames sent minus the sum over processes of
  ``gateway_audio_frames_received_total`` after every bot has closed, cross-checked
  against each session's ``session.json``;
* CPU of each gateway process, of ``redis-server`` and of the generator
  (``/proc/<pid>/stat``), each gateway's run-queue wait (time it was runnable but had no
  core) and everything else the machine ran;
* Redis's cost: ``INFO stats`` and ``INFO commandstats`` at the start and end of the
  window give commands per second, commands and bytes (in plus out) per meeting-second,
  and calls per meeting-second of each command; the benchmark's own ``INFO`` is taken
  out of the command count (its reply, a few KiB, stays in the bytes). Part of this is
  per node, not per meeting (heartbeats, session summaries, sweeps): the summary fits
  commands and bytes per second against N for each P, the slope being a meeting's
  marginal cost and the intercept the nodes' own;
* the cluster's own counters (claims, hand-overs, Redis errors): in this set-up every
  claim should be ``free`` and nothing handed over.

A point is *valid* when the generator kept real time and no gateway process waited for a
core more than ``--max-wait-pct`` of the window: only valid points are judged.

``--pin`` gives the comparison cores of its own when the machine has no core to spare for
the generator: with P processes everything runs on cores 0..P-1 (``taskset``), gateway
``w{i}`` on core ``i`` alone, and ``redis-server`` and this process (the generator) on all
P of them. P=1 is then one core doing all the work of N bots (receiving and sending them)
and P=2 two cores doing the same work for twice the bots: what a second process adds when
the generator's cost grows with the load as the gateway's does. Sharing a core is the
set-up here, so a pinned point is valid when the generator kept real time (the gateway's
wait for a core is reported, not judged). The target:
with P=2, at least 1.8x the bots of P=1 at p99 ingest lag <= 50 ms with no frame lost,
comparing the largest N meeting that bound for each P (so the N steps bound the
resolution: put steps near 1.8x the one-process figure). On a 2-core machine two gateway
processes, Redis and the generator share two cores: expect the P=2 points to be flagged.

``--split-generator`` runs a generator process per gateway process
(:mod:`benchmarks.shards`), sending to that process alone and, with ``--pin``, on its
core: one generator thread for every bot would move between the cores and serve twice
the bots at P=2, so the P=2 cores would not each carry what the P=1 core carries.
``--per-process`` reads ``--n`` as bots per gateway process, so each step measures P=1
with N bots and P=2 with 2N back to back, and drift in the machine touches both alike.

One JSON object per (P, N) goes to stdout as it is measured, then a summary object;
``--out FILE`` also writes the summary JSON there and a human summary beside it
(``FILE.md``). ``--quick`` is a smoke run (4 bots, a 3 s window) that checks the script.

Run from the repository with the project's environment::

    .venv/bin/python benchmarks/cluster.py --procs 1,2 --n 200,300,400,500,600 \\
        --window 25 --out /tmp/cluster.json
    .venv/bin/python benchmarks/cluster.py --pin --split-generator --per-process \\
        --procs 1,2 --n 260,280,300,320,340 --window 20 --out /tmp/cluster.json
    .venv/bin/python benchmarks/cluster.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from benchmarks import common
from benchmarks.common import MIB, Scrape, ServerProcess
from benchmarks.ingest import (
    HOST,
    PORT_LINE,
    add_load_options,
    add_output_options,
    attribute_lag,
    generator_report,
    niced,
    scrape,
    short_sessions,
    speech,
)
from benchmarks.loadgen import LoadGenerator, audio_frames
from benchmarks.shards import GeneratorShards
from gateway.cluster.supervisor import free_port

REDIS_BIN = "/usr/bin/redis-server"
#: redis-server's start-up line: ``Running mode=standalone, port=6379.``
REDIS_PORT_LINE = r"port=(\d+)\."
#: The target's bound: p99 ingest lag at most this, no frame lost.
LAG_BOUND_MS = 50.0
SCALE_TARGET = 1.8
QUICK = {"n": "4", "window": 3.0, "warmup": 1.0, "roster_every": 0.5}


def log(msg: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pinned(argv: list[str], cores: set[int] | None) -> list[str]:
    """``argv`` run on ``cores`` only (every thread it starts inherits them)."""
    if cores is None:
        return argv
    return ["taskset", "-c", ",".join(map(str, sorted(cores))), *argv]


def shares(n: int, p: int) -> list[int]:
    """``n`` bots over ``p`` processes, as round robin would: shares differ by one at most."""
    return [n // p + (i < n % p) for i in range(p)]


class RedisServer:
    """``redis-server`` without persistence in a child process, and a client for ``INFO``."""

    def __init__(self, work: Path, opts: argparse.Namespace, cores: set[int] | None = None) -> None:
        binary = REDIS_BIN if os.access(REDIS_BIN, os.X_OK) else shutil.which("redis-server")
        if binary is None:
            raise SystemExit(f"{REDIS_BIN} is missing: `make testdata` installs it (apt-get)")
        directory = work / "redis"
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port(HOST)
        argv = [binary, "--port", str(self.port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(directory)]
        argv = pinned(niced(argv, opts), cores)
        self.server = ServerProcess(argv, directory / "redis.log", REDIS_PORT_LINE)
        self.pid = self.server.pid
        self.client = aioredis.Redis(host=HOST, port=self.port, socket_timeout=10)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    async def wait_ready(self) -> None:
        await self.server.wait_port()

        async def pong() -> bool:
            try:
                return bool(await self.client.ping())
            except RedisError:
                return False

        if not await common.poll(pong, 10):
            raise RuntimeError(f"redis-server did not answer PING; see {self.server.log}")

    async def stats(self) -> dict[str, Any]:
        """Commands and network bytes so far, in total and per command."""
        info = await self.client.info("stats", "commandstats")
        return {
            "at": time.monotonic(),
            "commands": int(info["total_commands_processed"]),
            "in": int(info["total_net_input_bytes"]),
            "out": int(info["total_net_output_bytes"]),
            "calls": {
                k.removeprefix("cmdstat_"): int(v["calls"])
                for k, v in info.items()
                if k.startswith("cmdstat_")
            },
        }

    async def stop(self) -> int | None:
        await self.client.aclose()
        return await self.server.stop()


def redis_cost(
    before: dict[str, Any], after: dict[str, Any], n: int, cpu: dict[str, float]
) -> dict[str, Any]:
    seconds = after["at"] - before["at"]
    meeting_s = n * seconds
    # Our own INFO at the start of the window is counted in the end's total.
    commands = after["commands"] - before["commands"] - 1
    calls = {
        name: count - before["calls"].get(name, 0) - (name == "info")
        for name, count in after["calls"].items()
    }
    bytes_in, bytes_out = after["in"] - before["in"], after["out"] - before["out"]
    return {
        "seconds": round(seconds, 2),
        "commands": commands,
        "commands_per_s": round(commands / seconds, 1),
        "commands_per_meeting_s": round(commands / meeting_s, 4),
        "bytes_per_meeting_s": round((bytes_in + bytes_out) / meeting_s, 1),
        "bytes_in_per_meeting_s": round(bytes_in / meeting_s, 1),
        "bytes_out_per_meeting_s": round(bytes_out / meeting_s, 1),
        "calls_per_meeting_s": {
            name: round(count / meeting_s, 4)
            for name, count in sorted(calls.items(), key=lambda kv: -kv[1])
            if count > 0
        },
        "cpu_core_pct": cpu["cpu_core_pct"],
        "cpu_ms_per_meeting_s": round(1000 * cpu["cpu_s"] / meeting_s, 4),
        "runqueue_wait_pct": cpu["runqueue_wait_pct"],
    }


class CpuWindow:
    """CPU of several named processes, of the generator's processes and of the machine:
    :class:`benchmarks.common.CpuWindow` for more than one server."""

    def __init__(self, pids: dict[str, int], generators: list[int]) -> None:
        self.pids, self.generators = pids, generators
        self.t = time.monotonic()
        self.cpu = {name: common.cpu_seconds(pid) for name, pid in pids.items()}
        self.wait = {name: common.runqueue_wait_seconds(pid) for name, pid in pids.items()}
        self.own = self._generators(common.cpu_seconds)
        self.own_wait = self._generators(common.runqueue_wait_seconds)
        self.jiffies = common.system_jiffies()

    def _generators(self, measure: Callable[[int], float]) -> float:
        return sum(measure(pid) for pid in self.generators)

    def finish(self) -> dict[str, Any]:
        seconds = time.monotonic() - self.t
        busy = common.busy_fraction(self.jiffies, common.system_jiffies()) * (os.cpu_count() or 1)
        own = self._generators(common.cpu_seconds) - self.own
        own_wait = self._generators(common.runqueue_wait_seconds) - self.own_wait
        processes: dict[str, dict[str, float]] = {}
        for name, pid in self.pids.items():
            cpu = common.cpu_seconds(pid) - self.cpu[name]
            wait = common.runqueue_wait_seconds(pid) - self.wait[name]
            processes[name] = {
                "cpu_s": cpu,
                "cpu_core_pct": round(100 * cpu / seconds, 1),
                "runqueue_wait_pct": round(100 * wait / seconds, 1),
            }
        accounted = own + sum(p["cpu_s"] for p in processes.values())
        return {
            "seconds": seconds,
            "processes": processes,
            "generator_core_pct": round(100 * own / seconds, 1),
            "generator_runqueue_wait_pct": round(100 * own_wait / seconds, 1),
            # Everything else on the machine: other work sharing it makes figures noisy.
            "others_core_pct": round(100 * (busy - accounted / seconds), 1),
        }


def merged_ms(before: list[Scrape], after: list[Scrape], name: str) -> dict[str, float | None]:
    """A histogram's quantiles over the window, every process's observations together."""
    deltas = [
        common.bucket_delta(b.buckets(name), a.buckets(name))
        for b, a in zip(before, after, strict=True)
    ]
    return common.buckets_ms(common.merge_buckets(deltas))


def by_label(scrapes: list[Scrape], name: str, label: str) -> dict[str, float]:
    """A counter summed over processes, by one label's value."""
    out: dict[str, float] = {}
    for s in scrapes:
        for (sample, labels), v in s.samples.items():
            if sample == name:
                value = dict(labels).get(label, "")
                out[value] = out.get(value, 0.0) + v
    return out


async def start_gateways(
    p: int, n: int, opts: argparse.Namespace, redis_url: str, work: Path
) -> list[ServerProcess]:
    """P cluster nodes, each ``serve --workers 1`` on a port of its own."""
    data = work / "data"
    servers: list[ServerProcess] = []
    for i in range(p):
        argv = [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", "0"]
        argv += ["--redis-url", redis_url, "--workers", "1", "--node-id", f"{opts.node_id}-w{i}"]
        argv += ["--data-dir", str(data), "--pipelines", "recording", "--linger", str(opts.linger)]
        argv += ["--ring-seconds", str(opts.ring_seconds), "--log-level", "INFO"]
        argv += ["--max-connections", str(max(2000, 2 * n))]
        argv += ["--max-connections-per-ip", str(max(500, 2 * n))]
        argv = pinned(niced(argv, opts), {i} if opts.pin else None)
        servers.append(ServerProcess(argv, work / f"gateway-w{i}.log", PORT_LINE))
    ports = await asyncio.gather(*(s.wait_port() for s in servers))
    if len(set(ports)) != len(ports):
        # The nodes bind with SO_REUSEPORT: two on one port would share its connections.
        raise RuntimeError(f"gateway processes share a port: {ports}")
    return servers


async def run_cluster(
    p: int, n: int, opts: argparse.Namespace, frames: list[bytes], work: Path
) -> dict[str, Any]:
    store = RedisServer(work, opts, set(range(p)) if opts.pin else None)
    servers: list[ServerProcess] = []
    shards: GeneratorShards | None = None
    try:
        await store.wait_ready()
        servers = await start_gateways(p, n, opts, store.url, work)
        ports = [s.port for s in servers]
        result: dict[str, Any] = {}
        notes: list[str] = []
        frame = opts.rate * opts.frame_ms // 1000
        pace = {"phases": opts.phases, "roster_every": opts.roster_every}
        gen: LoadGenerator | GeneratorShards
        if opts.split_generator:
            gen = shards = GeneratorShards(HOST, frames, frame, opts.rate, **pace)
        else:
            gen = LoadGenerator(HOST, ports[0], frames, frame, opts.rate, **pace)
        share = shares(n, p)
        owner: list[int] = []
        for i, (port, k) in enumerate(zip(ports, share, strict=True)):
            if not k:
                continue
            if isinstance(gen, GeneratorShards):
                # A generator process per gateway process, on the same core when pinned.
                await gen.connect(port, k, {i} if opts.pin else None)
            else:
                # One generator (one pacing loop, one lateness histogram) for every
                # process: connect() opens its bots to gen.port, so point it at each
                # process in turn. Keys are numbered across calls; the send slots
                # interleave the processes' bots.
                gen.port = port
                await gen.connect(k)
            owner += [i] * k

        async def sessions(state: str) -> bool:
            got = await asyncio.gather(*(scrape(port) for port in ports))
            return all(
                s.value("gateway_sessions", state=state) >= k
                for s, k in zip(got, share, strict=True)
            )

        if not await common.poll(lambda: sessions("waiting"), 60):
            raise RuntimeError(f"{n} sessions did not open on {p} processes")
        await asyncio.sleep(1.0)  # let session start-up work (files, tasks, leases) settle

        log(f"P={p} N={n}: {share} sessions; audio on, warm-up {opts.warmup} s")
        gen.start_audio()
        await asyncio.sleep(opts.warmup)
        s0 = list(await asyncio.gather(*(scrape(port) for port in ports)))
        r0 = await store.stats()
        gen.reset_lateness()
        pids = {f"w{i}": s.pid for i, s in enumerate(servers)} | {"redis": store.pid}
        window = CpuWindow(pids, shards.pids if shards else [os.getpid()])
        await asyncio.sleep(opts.window)
        cpu = window.finish()
        s1 = list(await asyncio.gather(*(scrape(port) for port in ports)))
        r1 = await store.stats()
        rss = [common.rss_bytes(s.pid) for s in servers]
        cores = [os.sched_getaffinity(s.pid) for s in servers]
        await gen.stop_audio()
        gen_report = generator_report(gen, opts)
        if shards:
            gen_report["processes"] = [
                {"cores": sorted(os.sched_getaffinity(pid)), "bots": k}
                for pid, k in zip(shards.pids, [k for k in share if k], strict=True)
            ]
        seconds = cpu["seconds"]

        lag = merged_ms(s0, s1, "gateway_ingest_lag_seconds")
        attribute_lag(result, notes, lag, gen_report, cpu, opts)
        result["loop_lag_ms"] = merged_ms(s0, s1, "gateway_event_loop_lag_seconds")
        gw_cpu = sum(cpu["processes"][f"w{i}"]["cpu_s"] for i in range(p))
        result.update(
            seconds=round(seconds, 2),
            cpu_ms_per_stream_s=round(1000 * gw_cpu / (n * seconds), 3),
            cpu_core_pct=round(100 * gw_cpu / seconds, 1),
            runqueue_wait_pct_max=max(
                cpu["processes"][f"w{i}"]["runqueue_wait_pct"] for i in range(p)
            ),
            generator_core_pct=cpu["generator_core_pct"],
            generator_runqueue_wait_pct=cpu["generator_runqueue_wait_pct"],
            others_core_pct=cpu["others_core_pct"],
        )
        if result["runqueue_wait_pct_max"] > opts.max_wait_pct:
            notes.append(
                f"a gateway process waited for a core {result['runqueue_wait_pct_max']}% of the"
                " window: other processes starved it, so its lag is partly the machine's"
            )
        if gen.write_pauses:
            notes.append("the gateway did not read as fast as the bots wrote (send buffers full)")
        result["redis"] = redis_cost(r0, r1, n, cpu["processes"]["redis"])

        # The end: close frames, so everything sent is read before the sockets close.
        stuck = await gen.close()
        sent = gen.frames_sent

        async def counted() -> list[Scrape]:
            return list(await asyncio.gather(*(scrape(port) for port in ports)))

        async def all_counted() -> bool:
            got = await counted()
            return sum(s.value("gateway_audio_frames_received_total") for s in got) >= sent

        await common.poll(all_counted, 30)
        final = await counted()
        received = [int(s.value("gateway_audio_frames_received_total")) for s in final]

        data = work / "data"

        short = await short_sessions(gen, data)

        processes = []
        sent_by_bot = [b.frames_sent for b in gen.bots]
        for i, server in enumerate(servers):
            mine = cpu["processes"][f"w{i}"]
            sent_i = sum(k for k, o in zip(sent_by_bot, owner, strict=True) if o == i)
            bots = owner.count(i)
            processes.append(
                {
                    "node": f"{opts.node_id}-w{i}",
                    "port": server.port,
                    "bots": bots,
                    "cpu_core_pct": mine["cpu_core_pct"],
                    "cpu_ms_per_stream_s": (
                        round(1000 * mine["cpu_s"] / (bots * seconds), 3) if bots else None
                    ),
                    "runqueue_wait_pct": mine["runqueue_wait_pct"],
                    "ingest_lag_ms": common.histogram_ms(
                        s0[i], s1[i], "gateway_ingest_lag_seconds"
                    ),
                    "loop_lag_ms": common.histogram_ms(
                        s0[i], s1[i], "gateway_event_loop_lag_seconds"
                    ),
                    "rss_mib": round(rss[i] / MIB, 1),
                    "cores": sorted(cores[i]),
                    "frames_sent": sent_i,
                    "frames_received": received[i],
                    "frames_lost": sent_i - received[i],
                }
            )
        claims = by_label(final, "gateway_cluster_claims_total", "how")
        handoffs = by_label(final, "gateway_cluster_handoffs_total", "reason")
        redis_errors = sum(s.total("gateway_cluster_redis_errors_total") for s in final)
        if set(claims) - {"free"} or sum(handoffs.values()) or redis_errors:
            notes.append(
                f"sessions moved or Redis failed (claims {claims}, hand-overs {handoffs},"
                f" Redis errors {redis_errors}): not the steady state this measures"
            )
        result.update(
            frames_sent=sent,
            frames_received=sum(received),
            frames_lost=sent - sum(received),
            sessions_disagreeing=short,
            rosters_sent=sum(b.rosters_sent for b in gen.bots),
            messages_rejected=sum(s.total("gateway_messages_rejected_total") for s in final),
            closes_unanswered=stuck,
            cluster={
                "claims": claims,
                "handoffs": handoffs,
                "redis_errors": redis_errors,
                "relay_dropped": sum(s.total("gateway_cluster_relay_dropped_total") for s in final),
            },
            processes=processes,
            generator=gen_report,
            notes=notes,
        )
        return result
    finally:
        if shards is not None:
            shards.terminate()
        codes = await asyncio.gather(*(s.stop() for s in servers))
        for i, code in enumerate(codes):
            if code not in (0, None):
                log(f"P={p} N={n}: gateway w{i} exited with {code}; see {servers[i].log}")
        await store.stop()


async def run_point(
    p: int, n: int, opts: argparse.Namespace, frames: list[bytes]
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"cluster-{p}x{n}-", dir=opts.workdir))
    try:
        log(f"P={p} N={n}: redis-server and {p} gateway processes")
        everywhere = os.sched_getaffinity(0)
        if opts.pin:
            os.sched_setaffinity(0, set(range(p)))  # the generator's event loop
        try:
            result = await run_cluster(p, n, opts, frames, work)
        finally:
            os.sched_setaffinity(0, everywhere)
        valid = result["generator"]["kept_real_time"] and (
            opts.pin or result["runqueue_wait_pct_max"] <= opts.max_wait_pct
        )
        return {"procs": p, "n": n, "pinned": opts.pin, "valid": valid, "gateway": result}
    finally:
        if opts.keep:
            log(f"P={p} N={n}: files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def meets_bound(row: dict[str, Any]) -> bool:
    p99 = row["ingest_lag_p99_ms"]
    return p99 is not None and p99 <= LAG_BOUND_MS and row["frames_lost"] == 0


def capacity(rows: list[dict[str, Any]], procs: int, valid_only: bool) -> dict[str, Any]:
    """The largest N meeting the bound for ``procs`` processes, and how sure that is."""
    mine = [r for r in rows if r["procs"] == procs and (r["valid"] or not valid_only)]
    passing = [r["n"] for r in mine if meets_bound(r)]
    largest = max(passing) if passing else None
    return {
        "max_n": largest,
        "judged": len(mine),
        # The largest N measured passed: the capacity may be higher than max_n.
        "capped": largest is not None and largest == max(r["n"] for r in mine),
        "not_monotonic": largest is not None
        and any(r["n"] < largest and not meets_bound(r) for r in mine),
    }


def scale(one: dict[str, Any], two: dict[str, Any]) -> tuple[float | None, bool | None]:
    """P=2's capacity over P=1's, and whether that meets the target; None where the
    points cannot tell (P=1 passed at its largest N measured, so the ratio may be
    smaller, or P=2 did and falls short, so it may be larger)."""
    if one["max_n"] is None or not two["judged"]:
        return None, None
    ratio = round((two["max_n"] or 0) / one["max_n"], 2)
    if ratio >= SCALE_TARGET:
        return ratio, None if one["capped"] else True
    return ratio, None if two["capped"] else False


def redis_fit(rows: list[dict[str, Any]], procs: int) -> dict[str, float] | None:
    """Redis commands and bytes per second against N, fitted over every point of ``procs``
    processes: the slope is the marginal cost of a meeting, the intercept the nodes'
    own (heartbeats, session summaries, sweeps), which small N would charge to meetings."""
    mine = [r for r in rows if r["procs"] == procs]
    ns = [float(r["n"]) for r in mine]
    if len(set(ns)) < 2:
        return None
    out: dict[str, float] = {}
    for name, per_meeting in (
        ("commands", "redis_commands_per_meeting_s"),
        ("bytes", "redis_bytes_per_meeting_s"),
    ):
        ys = [r[per_meeting] * r["n"] for r in mine]  # per second, all meetings together
        mx, my = sum(ns) / len(ns), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(ns, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in ns
        )
        out[f"{name}_per_meeting_s_marginal"] = round(slope, 4)
        out[f"{name}_per_s_fixed"] = round(my - slope * mx, 1)
    return out


def summarize(points: list[dict[str, Any]], opts: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for pt in points:
        g = pt["gateway"]
        lag = g["ingest_lag_ms"] or {}
        r = g["redis"]
        rows.append(
            {
                "procs": pt["procs"],
                "n": pt["n"],
                "valid": pt["valid"],
                "ingest_lag_p50_ms": lag.get("p50"),
                "ingest_lag_p99_ms": lag.get("p99"),
                "loop_lag_p99_ms": g["loop_lag_ms"]["p99"],
                "frames_lost": g["frames_lost"],
                "gateway_cpu_ms_per_stream_s": g["cpu_ms_per_stream_s"],
                "gateway_core_pct": [x["cpu_core_pct"] for x in g["processes"]],
                "gateway_runqueue_wait_pct": [x["runqueue_wait_pct"] for x in g["processes"]],
                "redis_commands_per_s": r["commands_per_s"],
                "redis_commands_per_meeting_s": r["commands_per_meeting_s"],
                "redis_bytes_per_meeting_s": r["bytes_per_meeting_s"],
                "redis_core_pct": r["cpu_core_pct"],
                "redis_cpu_ms_per_meeting_s": r["cpu_ms_per_meeting_s"],
                "generator_late_p99_ms": g["generator"]["late_ms"]["p99"],
                "generator_kept_real_time": g["generator"]["kept_real_time"],
                "generator_core_pct": g["generator_core_pct"],
                "others_core_pct": g["others_core_pct"],
            }
        )
    procs = sorted({r["procs"] for r in rows})
    valid_cap = {str(p): capacity(rows, p, valid_only=True) for p in procs}
    any_cap = {str(p): capacity(rows, p, valid_only=False) for p in procs}
    ratio: float | None = None
    met: bool | None = None
    ratio_any: float | None = None
    if 1 in procs and 2 in procs:
        ratio, met = scale(valid_cap["1"], valid_cap["2"])
        ratio_any, _ = scale(any_cap["1"], any_cap["2"])
    return {
        "summary": True,
        "benchmark": "cluster",
        "machine": common.machine(),
        "revision": common.revision(Path(__file__).resolve().parent.parent),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "points": rows,
        "capacity": valid_cap,
        "capacity_including_disturbed": any_cap,
        "scale_2_vs_1": ratio,
        "scale_2_vs_1_including_disturbed": ratio_any,
        "redis_fit": {str(p): redis_fit(rows, p) for p in procs},
        "targets": {"two_procs_1_8x_bots_at_p99_50ms_zero_loss": met},
        "targets_note": (
            f"capacity: largest N with p99 ingest lag <= {LAG_BOUND_MS:g} ms and no frame lost,"
            " valid points only; capped: the largest N measured passed (the capacity may be"
            " higher); target null: no valid point to judge by (see each point's notes), or"
            " a capped capacity leaves the answer open (measure larger N)"
        ),
    }


def human(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# Cluster benchmark",
        "",
        f"{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']};"
        f" load average at the end {m['loadavg']}; gateway at {summary['revision']}. P gateway"
        " processes (cluster nodes, one port each, the bots shared evenly) and one"
        " redis-server. `gw core %` and `gw waited %` are per process; `others %` is CPU"
        " used by everything but the gateways, Redis and the generator during the window.",
        "",
        "| P | N | lag p50/p99 ms | loop p99 ms | lost | gw ms CPU/stream-s | gw core % |"
        " gw waited % | redis cmd/s | cmd/meeting-s | bytes/meeting-s | redis core % |"
        " gen late p99 ms | gen core % | others % |",
        "|" + "---|" * 15,
    ]
    for r in summary["points"]:
        lag = (
            f"{r['ingest_lag_p50_ms']}/{r['ingest_lag_p99_ms']}"
            if r["generator_kept_real_time"]
            else "n/a (generator late)"
        )
        lines.append(
            f"| {r['procs']} | {r['n']}{'' if r['valid'] else ' *'} | {lag}"
            f" | {r['loop_lag_p99_ms']} | {r['frames_lost']}"
            f" | {r['gateway_cpu_ms_per_stream_s']}"
            f" | {' / '.join(str(x) for x in r['gateway_core_pct'])}"
            f" | {' / '.join(str(x) for x in r['gateway_runqueue_wait_pct'])}"
            f" | {r['redis_commands_per_s']} | {r['redis_commands_per_meeting_s']}"
            f" | {r['redis_bytes_per_meeting_s']} | {r['redis_core_pct']}"
            f" | {r['generator_late_p99_ms']} | {r['generator_core_pct']}"
            f" | {r['others_core_pct']} |"
        )
    lines += [
        "",
        "`*`: disturbed (the generator fell behind real time or a gateway waited for a core"
        " too long); not judged.",
        "",
        "Capacity (valid points): " + json.dumps(summary["capacity"]),
        "",
        "Redis against N (slope: per meeting-second; intercept: the nodes' own, per second): "
        + json.dumps(summary["redis_fit"]),
        "",
        f"P=2 vs P=1: {summary['scale_2_vs_1']} (including disturbed points:"
        f" {summary['scale_2_vs_1_including_disturbed']}); targets: "
        + json.dumps(summary["targets"]),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--procs", default="1,2", help="gateway process counts, comma-separated")
    p.add_argument("--n", default="200,300,400,500,600", help="bot counts, comma-separated")
    add_load_options(p)
    p.add_argument("--node-id", default="bench", help="node names: NODE_ID-w0, NODE_ID-w1...")
    p.add_argument(
        "--pin",
        action="store_true",
        help="P processes on cores 0..P-1, one each, with Redis and the generator on them too",
    )
    p.add_argument(
        "--split-generator",
        action="store_true",
        help="a generator process per gateway process, sending to it alone (on its core"
        " with --pin), instead of one generator for all",
    )
    p.add_argument(
        "--per-process",
        action="store_true",
        help="--n counts bots per gateway process: P processes get P times as many, back to"
        " back with P=1 at each step",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: "
        + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in QUICK.items())
        + " unless given",
    )
    add_output_options(p)
    opts = p.parse_args(argv)
    if opts.quick:
        for name, value in QUICK.items():
            if getattr(opts, name) == p.get_default(name):
                setattr(opts, name, value)
    try:
        opts.counts = [int(x) for x in opts.n.split(",") if x.strip()]
        opts.proc_counts = [int(x) for x in opts.procs.split(",") if x.strip()]
    except ValueError:
        p.error("--n and --procs take comma-separated integers")
    if not opts.counts or min(opts.counts) < 1:
        p.error("--n needs positive bot counts")
    if not opts.proc_counts or min(opts.proc_counts) < 1:
        p.error("--procs needs positive process counts")
    if (opts.rate * opts.frame_ms) % 1000:
        p.error("--frame-ms must give a whole number of samples")
    if opts.pin and max(opts.proc_counts) > len(os.sched_getaffinity(0)):
        p.error(f"--pin needs a core per process: this machine has {os.cpu_count()}")
    return opts


async def amain(opts: argparse.Namespace) -> dict[str, Any]:
    frames = audio_frames(speech(opts.rate), opts.rate * opts.frame_ms // 1000)
    points = []
    # N outermost: both process counts at one N run close together in time, so drift in
    # what else the machine does touches them alike.
    for n in opts.counts:
        for p in opts.proc_counts:
            point = await run_point(p, n * p if opts.per_process else n, opts, frames)
            print(json.dumps(point), flush=True)
            points.append(point)
    return summarize(points, opts)


def main(argv: list[str] | None = None) -> int:
    return common.run_benchmark(parse_args(argv), amain, human)


if __name__ == "__main__":
    sys.exit(main())
