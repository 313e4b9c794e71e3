"""Speech benchmark: N sessions speaking at once while their bots stream real speech.

The gateway runs as its own process (``meeting-gateway serve``, recording pipeline and
VAD on). This process plays N bots on dual sockets: each streams LibriVox speech at
24 kHz in 20 ms frames at real time (the ingest load) and timestamps every binary
message the gateway sends back. A controller per session sends ``say`` requests over
``/bots/{key}/control`` back to back (a short pause between them) for the window.
Reported per N:

* request to first frame: control request sent to first speech frame at the bot, p50/p95
  (target p50 <= 300 ms);
* pacing jitter: each frame's arrival against its schedule ``t0 + n * 20 ms - lead``,
  relative to the utterance's median offset, p99 of the absolute value (target <= 5 ms),
  and the gateway's own send lateness (``gateway_speech_pacing_error_seconds`` p99);
* underruns: the bot's player (20 ms frames, 80 ms start buffer) finding its queue
  empty mid-utterance, and the gateway's ``gateway_speech_underruns`` (target 0);
* ingest: p99 of ``gateway_ingest_lag_seconds`` and frames lost, against the ingest
  targets (p99 <= 50 ms, nothing lost).

Measured on whatever else the machine is doing: timings from a shared, busy machine are
upper bounds. One JSON object per N on stdout, then a summary; ``--out FILE`` writes the
summary there and a human summary beside it (``FILE.md``).

    .venv/bin/python -m benchmarks.speech --n 1,2,4,8 --window 20 --out /tmp/speech.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks import common
from benchmarks.common import ServerProcess
from gateway.simulator import read_wav

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
HOST = "127.0.0.1"
RATE = 24000
FRAME = RATE * 20 // 1000
LEAD = 0.100
TEXTS = [
    "Thanks everyone for joining. Let us start with the project status.",
    "The budget review is scheduled for Thursday afternoon.",
    "Could you share the slides after the meeting? I will send the notes.",
    "We are on track for the release. Two items remain open.",
]


def log(msg: str) -> None:
    print(f"[speech {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 2)


@dataclass
class Bot:
    key: str
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    texts: int = 0
    frames_sent: int = 0
    late: list[float] = field(default_factory=list)

    async def stream(self, port: int, audio: np.ndarray, until: float) -> None:
        ws = await connect(f"ws://{HOST}:{port}/bots/{self.key}?rate={RATE}", max_size=None)
        hs = {"protocol_version": 1, "bot_id": f"bench-{self.key}", "sample_rate": RATE}
        await ws.send(json.dumps(hs))
        reader = asyncio.create_task(self._read(ws))
        loop = asyncio.get_running_loop()
        t0, pos = loop.time(), 0
        try:
            while loop.time() < until:
                i = pos % (len(audio) - FRAME)
                await ws.send(audio[i : i + FRAME].tobytes())
                self.frames_sent += 1
                pos += FRAME
                delay = t0 + pos / RATE - loop.time()
                self.late.append(max(0.0, -delay))
                await asyncio.sleep(max(0.0, delay))
        finally:
            await ws.close()
            reader.cancel()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                if isinstance(message, str):
                    self.texts += 1
                else:
                    self.arrivals.append((time.monotonic(), len(message) // 2))
        except ConnectionClosed:
            pass


@dataclass
class Request:
    sent: float
    uid: str | None = None
    end: dict[str, Any] | None = None


async def control(port: int, key: str, until: float, requests: list[Request]) -> None:
    async with connect(f"ws://{HOST}:{port}/bots/{key}/control") as ws:
        n = 0
        while time.monotonic() < until:
            req = Request(time.monotonic())
            requests.append(req)
            await ws.send(json.dumps({"type": "say", "text": TEXTS[n % len(TEXTS)]}))
            n += 1
            async for raw in ws:
                event = json.loads(raw)
                if event["type"] == "error":
                    await asyncio.sleep(0.5)  # the session is not live yet
                    requests.remove(req)
                    break
                if event["type"] == "accepted":
                    req.uid = event["id"]
                elif event.get("id") == req.uid and event["type"] in (
                    "finished",
                    "interrupted",
                    "cancelled",
                    "failed",
                ):
                    req.end = event
                    break
            await asyncio.sleep(0.5)


def analyse(bot: Bot, requests: list[Request]) -> dict[str, list[float]]:
    """Split a bot's arrivals into utterances by request; latency, jitter, underruns."""
    latency, jitter, underruns = [], [], []
    arrivals = bot.arrivals
    for req in requests:
        if req.end is None or req.end["type"] != "finished":
            continue
        total = req.end["samples"]
        mine, got = [], 0
        for at, n in arrivals:
            if at >= req.sent and got < total:
                mine.append(at)
                got += n
        if not mine:
            continue
        latency.append((mine[0] - req.sent) * 1000)
        offsets = [a - mine[0] - max(0.0, i * 0.020 - LEAD) for i, a in enumerate(mine)]
        mid = statistics.median(offsets)
        jitter.extend(abs(o - mid) * 1000 for o in offsets)
        underruns.append(playout_underruns(mine))
    return {"latency_ms": latency, "jitter_ms": jitter, "underruns": underruns}


def playout_underruns(arrivals: list[float]) -> float:
    """The bot's player: 20 ms frames, starting once 80 ms is queued (one frame each)."""
    queued, tick, start, empty = 0, 0.0, None, 0
    for i, at in enumerate(arrivals):
        if start is not None:
            while tick <= at:
                if queued == 0:
                    empty += 1
                queued = max(0, queued - 1)
                tick += 0.020
        queued += 1
        if start is None and queued >= 4:
            start = tick = at
        del i
    return float(empty)


async def run_point(n: int, opts: argparse.Namespace, audio: np.ndarray, work: Path) -> Any:
    argv = [sys.executable, "-m", "gateway", "serve", "--host", HOST, "--port", "0"]
    argv += ["--data-dir", str(work / f"data{n}"), "--pipelines", opts.pipelines]
    argv += ["--log-level", "INFO", "--linger", "5"]
    # The bots stream a person talking the whole time: barge-in would cut every
    # utterance, and this measures pacing, not barge-in.
    argv += ["--barge-in", "ignore"]
    server = ServerProcess(argv, work / f"gateway{n}.log", r"listening on \S+:(\d+)")
    try:
        port = await server.wait_port()
        # Warm the voice once, as a running gateway would have.
        async with connect(f"ws://{HOST}:{port}/bots/warm/control") as ws:
            await ws.send(json.dumps({"type": "stop"}))
            await ws.recv()
        before = await common.scrape(HOST, port)
        window = common.CpuWindow(server.pid)
        until = time.monotonic() + opts.window
        bots = [Bot(f"s{i}") for i in range(n)]
        requests: list[list[Request]] = [[] for _ in range(n)]
        loop_until = asyncio.get_running_loop().time() + opts.window + 3
        streams = [asyncio.create_task(b.stream(port, audio, loop_until)) for b in bots]
        await asyncio.sleep(1.0)  # sessions start on the handshake
        await asyncio.gather(
            *(control(port, b.key, until, r) for b, r in zip(bots, requests, strict=True))
        )
        await asyncio.gather(*streams)
        cpu = window.finish(n)
        after = await common.scrape(HOST, port)
        await asyncio.sleep(1.0)
        final = await common.scrape(HOST, port)
    finally:
        await server.stop()
    lat: list[float] = []
    jit: list[float] = []
    under: list[float] = []
    for bot, reqs in zip(bots, requests, strict=True):
        a = analyse(bot, reqs)
        lat += a["latency_ms"]
        jit += a["jitter_ms"]
        under += a["underruns"]
    sent = sum(b.frames_sent for b in bots)
    lost = sent - final.total("gateway_audio_frames_received_total")
    return {
        "n": n,
        "utterances": len(lat),
        "first_frame_ms": {"p50": pct(lat, 50), "p95": pct(lat, 95), "max": pct(lat, 100)},
        "jitter_ms": {"p50": pct(jit, 50), "p99": pct(jit, 99)},
        "send_lateness_ms": common.histogram_ms(
            before, after, "gateway_speech_pacing_error_seconds"
        ),
        "underruns_bot_side": sum(under),
        "underruns_gateway": after.total("gateway_speech_underruns_total")
        - before.total("gateway_speech_underruns_total"),
        "text_frames_to_bot": sum(b.texts for b in bots),
        "ingest_lag_ms": common.histogram_ms(before, after, "gateway_ingest_lag_seconds"),
        "frames_lost": lost,
        "generator_late_p99_ms": pct([x * 1000 for b in bots for x in b.late], 99),
        "cpu": cpu,
    }


def judge(row: dict[str, Any]) -> dict[str, bool | None]:
    p50 = row["first_frame_ms"]["p50"]
    jitter = row["jitter_ms"]["p99"]
    lag = row["ingest_lag_ms"].get("p99")
    return {
        "first_frame_p50_300ms": None if p50 is None else p50 <= 300,
        "jitter_p99_5ms": None if jitter is None else jitter <= 5,
        "no_underruns": row["underruns_bot_side"] == 0 and row["underruns_gateway"] == 0,
        "ingest_p99_50ms_no_loss": None if lag is None else lag <= 50 and row["frames_lost"] == 0,
    }


def human(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        "# Speech benchmark",
        "",
        f"{m['nproc']} cores ({m['cpu_model']}), load average {m['loadavg']} at the end;"
        f" gateway at {summary['revision']}, pipelines {summary['settings']['pipelines']}."
        " A shared, busy machine: timings are upper bounds.",
        "",
        "| N | utterances | first frame p50/p95 ms | jitter p99 ms | send late p99 ms |"
        " underruns bot/gw | ingest lag p99 ms | frames lost | gen late p99 ms | targets |",
        "|" + "---|" * 10,
    ]
    for r in summary["points"]:
        ok = all(v for v in r["targets"].values())
        lines.append(
            f"| {r['n']} | {r['utterances']} | {r['first_frame_ms']['p50']}/"
            f"{r['first_frame_ms']['p95']} | {r['jitter_ms']['p99']}"
            f" | {r['send_lateness_ms'].get('p99')} | {r['underruns_bot_side']:.0f}/"
            f"{r['underruns_gateway']:.0f} | {r['ingest_lag_ms'].get('p99')}"
            f" | {r['frames_lost']:.0f} | {r['generator_late_p99_ms']}"
            f" | {'met' if ok else 'missed'} |"
        )
    lines += ["", f"Most sessions speaking at once with every target met: {summary['max_n']}", ""]
    return "\n".join(lines)


async def main(opts: argparse.Namespace, audio: np.ndarray, root: Path) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="speech-bench-") as tmp:
        for n in opts.n:
            log(f"{n} sessions for {opts.window} s")
            row = await run_point(n, opts, audio, Path(tmp))
            row["targets"] = judge(row)
            print(json.dumps(row), flush=True)
            rows.append(row)
    met = [r["n"] for r in rows if all(r["targets"].values())]
    return {
        "summary": True,
        "machine": common.machine(),
        "revision": common.revision(root),
        "settings": {
            "n": opts.n,
            "window": opts.window,
            "rate": RATE,
            "pipelines": opts.pipelines,
        },
        "points": rows,
        "max_n": max(met) if met else 0,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--n", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    p.add_argument("--window", type=float, default=20.0, help="seconds of speech per point")
    p.add_argument("--out", type=Path, help="write the summary JSON here (and FILE.md)")
    p.add_argument(
        "--pipelines",
        default="recording",
        help="the gateway's pipelines, e.g. recording,transcription to speak while transcribing",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    options = parse_args()
    speech = np.concatenate([read_wav(p, RATE)[0] for p in sorted(LIBRIVOX.glob("*.wav"))])
    result = asyncio.run(main(options, speech, Path(__file__).resolve().parent.parent))
    print(json.dumps(result), flush=True)
    if options.out is not None:
        options.out.write_text(json.dumps(result, indent=2) + "\n")
        options.out.with_suffix(".md").write_text(human(result))
    print(human(result), file=sys.stderr)
