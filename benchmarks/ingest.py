"""Ingest benchmark: N simulated bots at real time against one gateway process.

For each N the gateway runs as its own process (``meeting-gateway serve``, recording
pipeline and VAD on, uvloop), fed by :mod:`benchmarks.loadgen` from this process: 10 ms
frames of real speech at 24 kHz, a roster change every few seconds per bot. Then the
floor (:mod:`benchmarks.floor`, a bare ``websockets`` server appending the frames to a
file) gets the same load. Reported per N:

* CPU per stream-second of the gateway process alone (``/proc/<pid>/stat``), of the
  floor, and their ratio;
* RSS per idle session (bots handshaken in the waiting room, no audio: the slope between
  N/2 and N sessions) and per live session, with the ring buffer reported apart;
* p50/p99 ingest lag and event-loop lag from the gateway's own histograms
  (``gateway_ingest_lag_seconds``, ``gateway_event_loop_lag_seconds``), the difference
  between scrapes at the start and end of the window, so as fine as their buckets;
* frames lost: frames sent minus ``gateway_audio_frames_received`` after every bot has
  closed, cross-checked against each session's ``session.json``;
* the generator's own lateness. Where it could not keep real time, the ingest lag is
  not the gateway's and is reported under ``ingest_lag_ms_unattributed`` instead;
* with ``--pages K``, K clients each asking ``GET /sessions`` once a second through the
  window, as K open live pages (or dashboards) do: how long each answer took
  (``sessions_get_ms``), while the lags above say what they cost the meetings.

One JSON object per N goes to stdout as it is measured, then a summary object; ``--out
FILE`` also writes the summary JSON there and a human summary beside it (``FILE.md``).

Run from the repository with the project's environment::

    .venv/bin/python benchmarks/ingest.py --n 1,50,100,200,300 --window 25 --out /tmp/ingest.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import common
from benchmarks.common import MIB, Scrape, ServerProcess
from benchmarks.loadgen import LoadGenerator, audio_frames
from benchmarks.shards import GeneratorShards
from gateway.config import Settings
from gateway.simulator import read_wav

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
PORT_LINE = r"listening on \S+:(\d+)"
HOST = "127.0.0.1"


def log(msg: str) -> None:
    print(f"[ingest {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def speech(rate: int) -> np.ndarray[Any, np.dtype[np.int16]]:
    """Every LibriVox utterance, end to end, at ``rate``: real speech for the VAD."""
    wavs = sorted(LIBRIVOX.glob("*.wav"))
    if not wavs:
        raise SystemExit(f"no speech in {LIBRIVOX}: install Debian's pocketsphinx-testdata")
    return np.concatenate([read_wav(w, rate)[0] for w in wavs])


async def scrape(port: int, attempts: int = 4) -> Scrape:
    """A scrape that waits out a stalled gateway rather than losing the whole point."""
    for attempt in range(1, attempts + 1):
        try:
            return await common.scrape(HOST, port)
        except (TimeoutError, OSError) as exc:
            if attempt == attempts:
                raise
            log(f"GET /metrics failed ({exc!r}); the gateway is stalled, asking again")
    raise AssertionError("unreachable")


async def pages(port: int, count: int, taken: list[float]) -> None:
    """``count`` pages polling ``GET /sessions`` every second, spread over the second,
    until cancelled; each answer's time goes to ``taken``."""

    async def page(offset: float) -> None:
        await asyncio.sleep(offset)
        while True:
            asked = time.perf_counter()
            status, _ = await common.http_get(HOST, port, "/sessions")
            if status != 200:
                raise RuntimeError(f"GET /sessions answered {status}")
            taken.append(time.perf_counter() - asked)
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - asked)))

    await asyncio.gather(*(page(i / count) for i in range(count)))


def niced(argv: list[str], opts: argparse.Namespace) -> list[str]:
    return ["nice", "-n", str(opts.nice), *argv] if opts.nice else argv


def generator_report(
    gen: LoadGenerator | GeneratorShards, opts: argparse.Namespace
) -> dict[str, Any]:
    late = gen.lateness_ms()
    p99 = late["p99"]
    return {
        "late_ms": late,
        "kept_real_time": p99 is not None and p99 <= opts.max_late_ms,
        "write_pauses": gen.write_pauses,
    }


async def run_gateway(n: int, opts: argparse.Namespace, frames: list[bytes], work: Path) -> Any:
    data = work / "data"
    argv = [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", "0"]
    argv += ["--data-dir", str(data), "--pipelines", "recording", "--linger", str(opts.linger)]
    argv += ["--ring-seconds", str(opts.ring_seconds), "--log-level", "INFO"]
    argv += ["--max-connections", str(max(2000, 2 * n))]
    argv += ["--max-connections-per-ip", str(max(500, 2 * n))]
    server = ServerProcess(niced(argv, opts), work / "gateway.log", PORT_LINE)
    try:
        port = await server.wait_port()
        result: dict[str, Any] = {}
        notes: list[str] = []
        frame = opts.rate * opts.frame_ms // 1000
        gen = LoadGenerator(
            HOST, port, frames, frame, opts.rate, phases=opts.phases, roster_every=opts.roster_every
        )

        async def sessions(state: str, count: int) -> bool:
            s = await scrape(port)
            return s.value("gateway_sessions", state=state) >= count

        # Idle sessions: handshaken bots in the waiting room, no audio yet.
        base = common.rss_bytes(server.pid)
        half = n // 2 if n >= 4 else 0
        rss_half = base
        if half:
            await gen.connect(half)
            if not await common.poll(lambda: sessions("waiting", half), 60):
                raise RuntimeError(f"{half} sessions did not open")
            await asyncio.sleep(1.0)  # let session start-up work (files, tasks) settle
            rss_half = common.rss_bytes(server.pid)
        await gen.connect(n - half)
        if not await common.poll(lambda: sessions("waiting", n), 60):
            raise RuntimeError(f"{n} sessions did not open")
        await asyncio.sleep(1.0)
        rss_idle = common.rss_bytes(server.pid)
        ring_bytes = 2 * int(opts.ring_seconds * opts.rate)
        result["rss_baseline_mib"] = round(base / MIB, 2)
        result["rss_idle_per_session_mib"] = round((rss_idle - rss_half) / (n - half) / MIB, 4)
        # The slope leaves out one-time costs of the first sessions; below 4 bots there
        # is no slope and those costs are included.
        result["rss_idle_method"] = f"slope {half}..{n}" if half else "delta from baseline"
        result["rss_idle_total_delta_mib"] = round((rss_idle - base) / MIB, 2)
        result["ring_mib_per_session"] = round(ring_bytes / MIB, 3)

        log(f"N={n}: {n} idle sessions; audio on, warm-up {opts.warmup} s")
        gen.start_audio()
        await asyncio.sleep(opts.warmup)
        s0 = await scrape(port)
        gen.reset_lateness()
        window = common.CpuWindow(server.pid)
        taken: list[float] = []
        polling = asyncio.create_task(pages(port, opts.pages, taken)) if opts.pages else None
        await asyncio.sleep(opts.window)
        cpu = window.finish(n)
        s1 = await scrape(port)
        if polling is not None and taken:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
            ms = np.array(taken) * 1000
            result["sessions_get_ms"] = {
                "n": len(ms),
                **{f"p{q}": round(float(np.percentile(ms, q)), 2) for q in (50, 99)},
                "max": round(float(ms.max()), 2),
            }
        rss_live = common.rss_bytes(server.pid)
        gen_report = generator_report(gen, opts)
        await gen.stop_audio()
        result.update(cpu)
        if cpu["runqueue_wait_pct"] > opts.max_wait_pct:
            notes.append(
                f"the gateway waited for a core {cpu['runqueue_wait_pct']}% of the window:"
                " other processes starved it, so its lag is partly the machine's"
            )
        audio_s = gen.frames_sent / n * frame / opts.rate
        touched = min(audio_s, opts.ring_seconds) * opts.rate * 2
        live = (rss_live - base) / n
        result["rss_live_per_session_mib"] = round(live / MIB, 4)
        result["ring_touched_mib_per_session"] = round(touched / MIB, 3)
        result["rss_live_beyond_ring_mib"] = round((live - touched) / MIB, 4)
        lag = common.histogram_ms(s0, s1, "gateway_ingest_lag_seconds")
        attribute_lag(result, notes, lag, gen_report, cpu, opts)
        result["loop_lag_ms"] = common.histogram_ms(s0, s1, "gateway_event_loop_lag_seconds")
        result["outputs_connected_at_window_end"] = s1.value("gateway_connections", role="output")
        if gen_report["write_pauses"]:
            notes.append("the gateway did not read as fast as the bots wrote (send buffers full)")

        # The end: close frames, so everything sent is read before the sockets close.
        stuck = await gen.close()
        sent = gen.frames_sent

        async def all_counted() -> bool:
            s = await scrape(port)
            return s.value("gateway_audio_frames_received_total") >= sent

        await common.poll(all_counted, 30)
        final = await scrape(port)
        received = int(final.value("gateway_audio_frames_received_total"))

        short = await short_sessions(gen, data)
        result.update(
            frames_sent=sent,
            frames_received=received,
            frames_lost=sent - received,
            sessions_disagreeing=short,
            rosters_sent=sum(b.rosters_sent for b in gen.bots),
            messages_rejected=final.total("gateway_messages_rejected_total"),
            closes_unanswered=stuck,
            generator=gen_report,
            notes=notes,
        )
        return result
    finally:
        code = await server.stop()
        if code not in (0, None):
            log(f"N={n}: gateway exited with {code}; see {server.log}")


async def run_floor(n: int, opts: argparse.Namespace, frames: list[bytes], work: Path) -> Any:
    floor = Path(__file__).with_name("floor.py")
    argv = [sys.executable, str(floor), "--host", HOST, "--port", "0", "--dir", str(work / "fl")]
    if opts.floor_no_uvloop:
        argv.append("--no-uvloop")
    server = ServerProcess(niced(argv, opts), work / "floor.log", PORT_LINE)
    try:
        port = await server.wait_port()
        frame = opts.rate * opts.frame_ms // 1000
        gen = LoadGenerator(
            HOST, port, frames, frame, opts.rate, phases=opts.phases, roster_every=opts.roster_every
        )
        await gen.connect(n)
        gen.start_audio()
        await asyncio.sleep(opts.warmup)
        gen.reset_lateness()
        window = common.CpuWindow(server.pid)
        await asyncio.sleep(opts.window)
        result: dict[str, Any] = window.finish(n)
        result["generator"] = generator_report(gen, opts)
        await gen.stop_audio()
        await gen.close()
        return result
    finally:
        await server.stop()


async def run_point(n: int, opts: argparse.Namespace, frames: list[bytes]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"ingest-{n}-", dir=opts.workdir))
    try:
        log(f"N={n}: gateway")
        point: dict[str, Any] = {"n": n, "gateway": await run_gateway(n, opts, frames, work)}
        if not opts.no_floor:
            log(f"N={n}: floor")
            point["floor"] = await run_floor(n, opts, frames, work)
            floor_cpu = point["floor"]["cpu_ms_per_stream_s"]
            gw_cpu = point["gateway"]["cpu_ms_per_stream_s"]
            point["cpu_vs_floor"] = round(gw_cpu / floor_cpu, 2) if floor_cpu else None
        point["valid"] = undisturbed(point, opts)
        return point
    finally:
        if opts.keep:
            log(f"N={n}: files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def undisturbed(point: dict[str, Any], opts: argparse.Namespace) -> bool:
    """Whether the figures are the servers' own: the generator kept real time and
    neither server was starved by other work on the machine. Targets use these only."""
    for phase in (point["gateway"], point.get("floor")):
        if phase is None:
            continue
        if not phase["generator"]["kept_real_time"]:
            return False
        if phase["runqueue_wait_pct"] > opts.max_wait_pct:
            return False
    return True


def summarize(points: list[dict[str, Any]], opts: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for p in points:
        g = p["gateway"]
        lag = g["ingest_lag_ms"] or {}
        rows.append(
            {
                "n": p["n"],
                "valid": p["valid"],
                "gateway_cpu_ms_per_stream_s": g["cpu_ms_per_stream_s"],
                "floor_cpu_ms_per_stream_s": p.get("floor", {}).get("cpu_ms_per_stream_s"),
                "cpu_vs_floor": p.get("cpu_vs_floor"),
                "gateway_core_pct": g["cpu_core_pct"],
                "gateway_runqueue_wait_pct": g["runqueue_wait_pct"],
                "generator_core_pct": g["generator_core_pct"],
                "ingest_lag_p50_ms": lag.get("p50"),
                "ingest_lag_p99_ms": lag.get("p99"),
                "loop_lag_p99_ms": g["loop_lag_ms"]["p99"],
                "frames_lost": g["frames_lost"],
                "sessions_get_ms": g.get("sessions_get_ms"),
                "rss_idle_per_session_mib": g["rss_idle_per_session_mib"],
                "rss_live_beyond_ring_mib": g["rss_live_beyond_ring_mib"],
                "generator_late_p99_ms": g["generator"]["late_ms"]["p99"],
                "generator_kept_real_time": g["generator"]["kept_real_time"],
                "others_core_pct": g["others_core_pct"],
            }
        )
    at_300 = next((r for r in rows if r["n"] == 300 and r["valid"]), None)
    lag_ok = None
    if at_300 is not None and at_300["ingest_lag_p99_ms"] is not None:
        lag_ok = at_300["ingest_lag_p99_ms"] <= 50 and at_300["frames_lost"] == 0
    ratios = [
        r["cpu_vs_floor"]
        for r in rows
        if r["valid"] and r["cpu_vs_floor"] is not None and r["n"] >= 50
    ]
    # Memory does not depend on the machine being quiet.
    idle = [r["rss_idle_per_session_mib"] for r in rows if r["n"] >= 4]
    return {
        "summary": True,
        "machine": common.machine(),
        "revision": common.revision(Path(__file__).resolve().parent.parent),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "points": rows,
        "targets": {
            "p99_lag_50ms_zero_loss_at_300": lag_ok,
            "cpu_within_1_5x_floor": None if not ratios else max(ratios) <= 1.5,
            "idle_session_1mib": None if not idle else max(idle) <= 1.0,
        },
        "targets_note": "null: no undisturbed point to judge by (see each point's notes)",
    }


def human(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# Ingest benchmark",
        "",
        f"{m['nproc']} cores ({m['cpu_model']}), {m['memory_gib']} GiB, Python {m['python']};"
        f" load average at the end {m['loadavg']}; gateway at {summary['revision']}."
        " `others %` is CPU used by everything"
        " but the gateway and the generator during the window; `gw waited %` is the time"
        " the gateway was runnable but waiting for a core (other processes starving it).",
        "",
        "| N | gw ms CPU/stream-s | floor | ratio | gw core % | gw waited % |"
        " lag p50/p99 ms | loop p99 ms | lost | idle MiB/session | live MiB beyond ring |"
        " gen late p99 ms | gen core % | others % |",
        "|" + "---|" * 14,
    ]
    for r in summary["points"]:
        lag = (
            f"{r['ingest_lag_p50_ms']}/{r['ingest_lag_p99_ms']}"
            if r["generator_kept_real_time"]
            else "n/a (generator late)"
        )
        lines.append(
            f"| {r['n']}{'' if r['valid'] else ' *'} | {r['gateway_cpu_ms_per_stream_s']}"
            f" | {r['floor_cpu_ms_per_stream_s']}"
            f" | {r['cpu_vs_floor']} | {r['gateway_core_pct']} | {r['gateway_runqueue_wait_pct']}"
            f" | {lag} | {r['loop_lag_p99_ms']} | {r['frames_lost']}"
            f" | {r['rss_idle_per_session_mib']} | {r['rss_live_beyond_ring_mib']}"
            f" | {r['generator_late_p99_ms']} | {r['generator_core_pct']}"
            f" | {r['others_core_pct']} |"
        )
    lines += [
        "",
        "`*`: disturbed (the generator fell behind real time or a server waited for a core"
        " too long); its CPU ratio and lag are not the servers' own.",
        "",
        "Targets (undisturbed points only): " + json.dumps(summary["targets"]),
        "",
    ]
    return "\n".join(lines)


def attribute_lag(
    result: dict[str, Any],
    notes: list[str],
    lag: dict[str, float | None],
    gen_report: dict[str, Any],
    cpu: dict[str, Any],
    opts: argparse.Namespace,
) -> None:
    """The ingest lag is the gateway's only while the generator kept real time."""
    if gen_report["kept_real_time"]:
        result["ingest_lag_ms"] = lag
        return
    result["ingest_lag_ms"] = None
    result["ingest_lag_ms_unattributed"] = lag
    notes.append(
        f"generator fell behind real time (p99 lateness {gen_report['late_ms']['p99']} ms"
        f" > {opts.max_late_ms} ms; it waited for a core"
        f" {cpu['generator_runqueue_wait_pct']}% of the window): ingest lag is not"
        " the gateway's"
    )


async def short_sessions(gen: LoadGenerator | GeneratorShards, data: Path) -> int:
    """Bots whose ``session.json`` does not count every frame they sent, once the files
    agree or 30 s have passed."""

    def count() -> int:
        short = 0
        for bot in gen.bots:
            path = data / "sessions" / bot.key / "session.json"
            try:
                got = json.loads(path.read_text())["frames_received"]
            except (OSError, ValueError, KeyError):
                got = -1
            short += got != bot.frames_sent
        return short

    async def recorded() -> bool:
        return count() == 0

    await common.poll(recorded, 30, interval=0.25)
    return count()


def add_load_options(p: argparse.ArgumentParser) -> None:
    """What the bots send and how a point is judged (shared with ``cluster.py``)."""
    p.add_argument("--window", type=float, default=25.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of audio before it")
    p.add_argument("--rate", type=int, default=24000, help="sample rate the bots stream at")
    p.add_argument("--frame-ms", type=int, default=10, help="audio per message, ms")
    p.add_argument("--phases", type=int, default=5, help="send slots per frame period")
    p.add_argument("--roster-every", type=float, default=3.0, help="seconds between rosters")
    p.add_argument("--linger", type=float, default=5.0, help="the gateways' --linger")
    p.add_argument("--ring-seconds", type=float, default=Settings().ring_seconds)
    p.add_argument(
        "--max-late-ms",
        type=float,
        default=10.0,
        help="generator p99 lateness above which lag is not the gateway's",
    )
    p.add_argument(
        "--max-wait-pct",
        type=float,
        default=10.0,
        help="run-queue wait of a gateway (%% of the window) above which it was starved",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="niceness for the servers and the generator; negative (root only) keeps"
        " other work on a shared machine from starving the measurement",
    )


def add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write the summary JSON here (and FILE.md)")
    p.add_argument("--workdir", type=Path, help="where temporary data goes (default: /tmp)")
    p.add_argument("--keep", action="store_true", help="keep recordings and server logs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--n", default="1,50,100,200,300", help="bot counts, comma-separated")
    add_load_options(p)
    p.add_argument("--no-floor", action="store_true", help="skip the floor server")
    p.add_argument("--floor-no-uvloop", action="store_true", help="floor on stock asyncio")
    p.add_argument(
        "--pages", type=int, default=0, help="clients polling GET /sessions every second"
    )
    add_output_options(p)
    opts = p.parse_args(argv)
    opts.counts = [int(x) for x in opts.n.split(",") if x.strip()]
    if not opts.counts or min(opts.counts) < 1:
        p.error("--n needs positive bot counts")
    if (opts.rate * opts.frame_ms) % 1000:
        p.error("--frame-ms must give a whole number of samples")
    return opts


async def amain(opts: argparse.Namespace) -> dict[str, Any]:
    frames = audio_frames(speech(opts.rate), opts.rate * opts.frame_ms // 1000)
    points = []
    for n in opts.counts:
        point = await run_point(n, opts, frames)
        print(json.dumps(point), flush=True)
        points.append(point)
    return summarize(points, opts)


def main(argv: list[str] | None = None) -> int:
    return common.run_benchmark(parse_args(argv), amain, human)


if __name__ == "__main__":
    sys.exit(main())
