"""Measurement helpers shared by the benchmark scripts.

* ``/proc`` sampling: a process's own CPU time (user + system) and resident memory, the
  machine's overall CPU use, and a description of the machine for the results table.
* Prometheus scrapes over a raw asyncio HTTP GET (a blocking client would stall a load
  generator sharing the loop), with histogram deltas and quantiles computed the way
  PromQL's ``histogram_quantile`` does: linear interpolation inside the bucket, so a
  quantile is only as fine as the histogram's buckets.
* :class:`ServerProcess`: a server started as a child process whose bound port is read
  back from its log, and stopped with SIGTERM.

Linux only: everything here reads ``/proc``.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20
#: A busy server can be slow to answer a scrape, but not this slow.
HTTP_TIMEOUT = 30.0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far (its threads included)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses: split after its closing one.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def runqueue_wait_seconds(pid: int) -> float:
    """Time the process's threads spent runnable but waiting for a core (``schedstat``).

    High values mean other processes starved this one: its lag is then the machine's.
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError):
            continue  # a thread that ended between listing and reading
    return total / 1e9


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def system_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine since boot, from ``/proc/stat``."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def busy_fraction(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of all cores' time spent busy between two :func:`system_jiffies` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return busy / total if total else 0.0


def machine() -> dict[str, object]:
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def revision(root: Path) -> str:
    """The commit the servers run, marked ``-dirty`` when the server code has edits."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "gateway", "pipelines"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


class CpuWindow:
    """CPU of a server, of this process (the load generator) and of the machine.

    Start one at the beginning of a measured window; :meth:`finish` at its end.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.t = time.monotonic()
        self.cpu = cpu_seconds(pid)
        self.wait = runqueue_wait_seconds(pid)
        self.own_wait = runqueue_wait_seconds(os.getpid())
        self.own = cpu_seconds(os.getpid())
        self.jiffies = system_jiffies()

    def finish(self, n: int) -> dict[str, float]:
        seconds = time.monotonic() - self.t
        cpu = cpu_seconds(self.pid) - self.cpu
        own = cpu_seconds(os.getpid()) - self.own
        busy = busy_fraction(self.jiffies, system_jiffies()) * (os.cpu_count() or 1)
        wait = runqueue_wait_seconds(self.pid) - self.wait
        own_wait = runqueue_wait_seconds(os.getpid()) - self.own_wait
        return {
            "seconds": round(seconds, 2),
            "cpu_ms_per_stream_s": round(1000 * cpu / (n * seconds), 3),
            "cpu_core_pct": round(100 * cpu / seconds, 1),
            "runqueue_wait_pct": round(100 * wait / seconds, 1),
            "generator_core_pct": round(100 * own / seconds, 1),
            "generator_runqueue_wait_pct": round(100 * own_wait / seconds, 1),
            # Everything else on the machine: other work sharing it makes figures noisy.
            "others_core_pct": round(100 * (busy - (cpu + own) / seconds), 1),
        }


# -- Prometheus -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scrape:
    """One scrape: every sample by name and label set, and when it was taken."""

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float]
    at: float

    @classmethod
    def parse(cls, text: str, at: float | None = None) -> Scrape:
        samples = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
        return cls(samples, time.monotonic() if at is None else at)

    def value(self, name: str, **labels: str) -> float:
        """A sample's value, 0 when absent (an unlabelled counter not yet touched)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def total(self, name: str) -> float:
        """Sum of a sample over every label set."""
        return sum(v for (n, _), v in self.samples.items() if n == name)

    def buckets(self, histogram: str) -> list[tuple[float, float]]:
        """Cumulative ``(upper bound, count)`` pairs of an unlabelled histogram."""
        found = [
            (float(dict(labels)["le"]), v)
            for (n, labels), v in self.samples.items()
            if n == f"{histogram}_bucket"
        ]
        return sorted(found)


def bucket_delta(
    before: list[tuple[float, float]], after: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """What a cumulative histogram observed between two scrapes."""
    old = dict(before)
    return [(le, count - old.get(le, 0.0)) for le, count in after]


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """PromQL-style quantile of cumulative buckets; None when nothing was observed.

    A quantile landing in the ``+Inf`` bucket is reported as the highest finite bound:
    read it as "at least this much".
    """
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return lower
            if count == below:
                return le
            return lower + (le - lower) * (rank - below) / (count - below)
        lower, below = le, count
    return lower


def highest_bucket(buckets: list[tuple[float, float]]) -> float | None:
    """Upper bound of the highest finite bucket that gained an observation (about a max).

    Observations above every finite bound are not reflected: see :func:`above_top`.
    """
    below = 0.0
    highest = None
    for le, count in buckets:
        if count > below and le != float("inf"):
            highest = le
        below = count
    return highest


def above_top(buckets: list[tuple[float, float]]) -> float:
    """Observations above the highest finite bound (in the ``+Inf`` bucket only)."""
    finite = [count for le, count in buckets if le != float("inf")]
    return buckets[-1][1] - finite[-1] if buckets and finite else 0.0


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """A minimal HTTP/1.1 GET for servers that close the connection after responding."""
    async with asyncio.timeout(HTTP_TIMEOUT):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            raw = await reader.read()
        finally:
            writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


async def scrape(host: str, port: int) -> Scrape:
    status, body = await http_get(host, port, "/metrics")
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}")
    return Scrape.parse(body.decode())


def histogram_ms(before: Scrape, after: Scrape, name: str) -> dict[str, float | None]:
    """p50, p99 and the highest bucket (in ms) of what a histogram saw between scrapes."""
    return buckets_ms(bucket_delta(before.buckets(name), after.buckets(name)))


def merge_buckets(parts: Sequence[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """One histogram from several with the same bounds (one per process): counts summed
    bucket by bucket, so quantiles of the merge are those of every observation together."""
    total: dict[float, float] = {}
    for buckets in parts:
        for le, count in buckets:
            total[le] = total.get(le, 0.0) + count
    return sorted(total.items())


def buckets_ms(buckets: list[tuple[float, float]]) -> dict[str, float | None]:
    """p50, p99 and the highest bucket (in ms) of cumulative buckets in seconds."""
    out: dict[str, float | None] = {}
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        v = quantile(q, buckets)
        out[label] = None if v is None else round(v * 1000, 2)
    top = highest_bucket(buckets)
    out["max_bucket"] = None if top is None else round(top * 1000, 2)
    out["above_top_bucket"] = above_top(buckets)
    out["observations"] = buckets[-1][1] if buckets else 0
    return out


# -- child servers ----------------------------------------------------------------------


class ServerProcess:
    """A server in a child process, its output in ``log``; the port comes from the log.

    The caller must :meth:`stop` it (a ``try``/``finally`` around the measurement).
    """

    def __init__(self, argv: Sequence[str], log: Path, port_pattern: str) -> None:
        self.log = log
        self._pattern = re.compile(port_pattern)
        # Output goes to a file, never a pipe: a full pipe would block the server.
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid
        self.port = 0

    async def wait_port(self, limit: float = 60.0) -> int:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            m = self._pattern.search(self.log.read_text(errors="replace"))
            if m:
                self.port = int(m.group(1))
                return self.port
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            await asyncio.sleep(0.05)
        raise TimeoutError(f"server did not report its port within {limit} s; see {self.log}")

    async def stop(self, limit: float = 60.0) -> int | None:
        """SIGTERM, wait for a graceful exit, SIGKILL after ``limit`` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, limit)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        return self.proc.returncode


async def poll(
    condition: Callable[[], Awaitable[bool]], limit: float, interval: float = 0.1
) -> bool:
    """Await ``condition()`` (a coroutine function) until true or ``limit`` seconds pass."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            if await condition():
                return True
        except (TimeoutError, OSError) as exc:
            print(f"waiting on a busy server: {exc!r}", file=sys.stderr, flush=True)
        await asyncio.sleep(interval)
    return False


def run_benchmark(
    opts: Any,
    amain: Callable[[Any], Awaitable[dict[str, Any]]],
    human: Callable[[dict[str, Any]], str],
) -> int:
    """Run a load benchmark's ``amain(opts)`` on uvloop with the file limit raised, print
    its summary as JSON and as text, and write both beside ``opts.out`` if given."""
    import resource

    # Each bot is a socket here and in the server; lift the soft limit to the hard one.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if opts.nice:
        os.setpriority(os.PRIO_PROCESS, 0, opts.nice)
    for name in [k for k in os.environ if k.startswith("GATEWAY_")]:
        del os.environ[name]  # the gateways must run with the settings given here only
    import uvloop

    summary = uvloop.run(amain(opts))
    print(json.dumps(summary), flush=True)
    text = human(summary)
    print(text, file=sys.stderr)
    if opts.out is not None:
        opts.out.write_text(json.dumps(summary, indent=2) + "\n")
        opts.out.with_suffix(opts.out.suffix + ".md").write_text(text)
    return 0
