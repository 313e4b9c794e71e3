"""Live transcription benchmark: accuracy, latency and capacity on this machine.

Runs a real gateway (pipelines ``recording,transcription``, the configured model) in
this process and simulated bots plus transcript subscribers in a child process, so
the gateway's event loop is measured alone. Measures:

(i)   word error rate of streaming vs offline transcription of the LibriVox test
      utterances, at 16 and 24 kHz;
(ii)  end of speech to its final (p50/p95) and start of speech to the first partial
      (p95), as a subscriber sees them;
(iii) for each number of concurrent meetings (continuous speech at real time): p95
      final latency, finals lost, partials skipped, and the event loop's lag p99.

Prints one JSON document on stdout and a short summary on stderr (or ``--summary``).

    .venv/bin/python benchmarks/transcription.py --sessions 1,4,8,12 --duration 60
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.server import Gateway
from gateway.simulator import SimulatedBot, read_wav
from pipelines.transcription.engine import shared_engine
from pipelines.transcription.scoring import wer
from pipelines.transcription.scoring import words as norm_words

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
PAUSE = 0.8  # between utterances: longer than the VAD hangover, like a breath in a talk
FRAME_MS = 10
STAGGER = 5.0  # seconds over which meetings' start times are spread
GOLDEN = 0.6180339887  # spreads any number of meetings evenly over the stagger


def references() -> list[tuple[Path, str]]:
    out = []
    for line in (LIBRIVOX / "transcription").read_text().splitlines():
        m = re.match(r"<s>\s*(.*?)\s*</s>\s*\((.+)\)", line)
        if m:
            out.append((LIBRIVOX / f"{m.group(2)}.wav", m.group(1)))
    return out


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def pct(values: list[float], q: float) -> float | None:
    return None if not values else round(float(np.percentile(values, q)), 3)


# -- the client side (child process) ----------------------------------------------------


def voiced(samples: np.ndarray[Any, Any], rate: int) -> tuple[int, int]:
    """Where speech really starts and ends in a clip: 10 ms frames above 5% of the peak.

    The recordings carry up to 0.3 s of room tone at either end; latencies are measured
    from the voice, not from the file's edges.
    """
    step = rate // 100
    frames = np.abs(samples[: len(samples) // step * step].astype(np.float32))
    energy = frames.reshape(-1, step).mean(axis=1)
    loud = np.nonzero(energy > 0.05 * energy.max())[0]
    return int(loud[0]) * step, (int(loud[-1]) + 1) * step


def layout(
    rate: int, seconds: float, rotate: int, stagger: float = STAGGER
) -> tuple[np.ndarray[Any, Any], list[Any]]:
    """Utterances back to back until ``seconds``; voiced spans.

    Meeting ``rotate`` starts at utterance ``rotate`` after a lead-in of silence spread
    over ``stagger`` seconds (none for meeting 0): with only five recordings, meetings
    ``i`` and ``i + 5`` would otherwise speak in lockstep, every utterance ending in the
    same 10 ms, which independent meetings never do (``stagger=0`` measures that case).
    """
    refs = references()
    clips = [read_wav(p, rate)[0] for p, _ in refs]
    edges = [voiced(c, rate) for c in clips]
    lead = int((rotate * GOLDEN) % 1.0 * stagger * rate)
    parts, spans, pos, i = [np.zeros(lead, np.int16)], [], lead, rotate
    pause = np.zeros(int(PAUSE * rate), np.int16)
    # seconds <= 0: each utterance once.
    while (i - rotate < len(clips)) if seconds <= 0 else (pos < seconds * rate):
        k = i % len(clips)
        spans.append((pos + edges[k][0], pos + edges[k][1], refs[k][1]))
        parts += [clips[k], pause]
        pos += len(clips[k]) + len(pause)
        i += 1
    return np.concatenate(parts), spans


async def one_meeting(
    port: int, key: str, rate: int, seconds: float, rotate: int, stagger: float
) -> Any:
    samples, spans = layout(rate, seconds, rotate, stagger)
    received: list[tuple[float, dict[str, Any]]] = []
    ready = asyncio.Event()
    from websockets.asyncio.client import connect

    async def subscribe() -> None:
        async with connect(f"ws://127.0.0.1:{port}/bots/{key}/transcripts") as ws:
            ready.set()
            received.extend([(time.monotonic(), json.loads(m)) async for m in ws])

    reader = asyncio.create_task(subscribe())
    await ready.wait()
    bot = SimulatedBot(
        f"ws://127.0.0.1:{port}/bots/{key}", samples, rate, frame_ms=FRAME_MS, record_times=True
    )
    await bot.run()
    async with asyncio.timeout(120):
        await reader
    frame = rate * FRAME_MS // 1000
    sent = bot.send_times

    def at(sample: int) -> float:
        return sent[min(len(sent) - 1, sample // frame)]

    utterances = []
    for a, b, text in spans:
        t0, t1 = a / rate, b / rate
        overlapping = [
            (when, m)
            for when, m in received
            if m.get("type") == "Results"
            and m["start"] < t1 + PAUSE / 2
            and m["start"] + m["duration"] > t0 - 0.3
        ]
        first = min((when for when, _ in overlapping), default=None)
        finals = [(when, m) for when, m in overlapping if m["is_final"]]
        closing = [when for when, m in finals if m["speech_final"]]
        words = [
            w["punctuated_word"]
            for _, m in finals
            for w in m["channel"]["alternatives"][0]["words"]
        ]
        utterances.append(
            {
                "text": text,
                "said": " ".join(words),
                "final_latency": None if not closing else max(closing) - at(b - 1),
                "first_partial_latency": None if first is None else first - at(a),
            }
        )
    return utterances


def clients(port: int, n: int, rate: int, seconds: float, stagger: float, out: Any) -> None:
    async def main() -> list[Any]:
        return await asyncio.gather(
            *(one_meeting(port, f"bench{i}", rate, seconds, i, stagger) for i in range(n))
        )

    out.put(asyncio.run(main()))


# -- the gateway side (this process) ----------------------------------------------------


async def run(
    sessions: int, rate: int, seconds: float, settings: dict[str, Any], stagger: float = STAGGER
) -> Any:
    registry = CollectorRegistry()
    with tempfile.TemporaryDirectory(prefix="bench-transcription-") as tmp:
        s = Settings(
            host="127.0.0.1", port=0, data_dir=Path(tmp), linger=1.0, **settings
        ).validate()
        gateway = Gateway(s, registry)
        _, port = await gateway.start()
        lags: list[float] = []
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        async def sample_lag() -> None:
            while not stop.is_set():
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - before - 0.01)

        sampler = asyncio.create_task(sample_lag())
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=clients, args=(port, sessions, rate, seconds, stagger, out))
        proc.start()
        meetings = await asyncio.to_thread(_collect, out, proc)
        stop.set()
        await sampler
        await gateway.stop()
    skipped = sum(
        s.value
        for metric in registry.collect()
        if metric.name == "gateway_asr_skipped"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("kind") == "partial"
    )
    partials = sum(
        s.value
        for metric in registry.collect()
        if metric.name == "gateway_asr_jobs"
        for s in metric.samples
        if s.name.endswith("_total") and s.labels.get("kind") == "partial"
    )
    utterances = [u for m in meetings for u in m]
    finals = [u["final_latency"] for u in utterances if u["final_latency"] is not None]
    firsts = [u["first_partial_latency"] for u in utterances if u["first_partial_latency"]]
    return {
        "sessions": sessions,
        "rate": rate,
        "utterances": len(utterances),
        "finals_lost": sum(1 for u in utterances if not u["said"]),
        "final_latency_p50": pct(finals, 50),
        "final_latency_p95": pct(finals, 95),
        "first_partial_p50": pct(firsts, 50),
        "first_partial_p95": pct(firsts, 95),
        "partials_run": int(partials),
        "partials_skipped": int(skipped),
        "loop_lag_p99_ms": None if not lags else round(1000 * float(np.percentile(lags, 99)), 2),
        "loop_lag_max_ms": None if not lags else round(1000 * max(lags), 2),
        "_utterances": utterances,
    }


def _collect(out: Any, proc: Any) -> Any:
    """The child's result; fail instead of waiting forever if it died."""
    import queue

    while True:
        try:
            result = out.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"client process exited with {proc.exitcode}") from None
            continue
        proc.join()
        return result


def offline_wer(settings: dict[str, Any]) -> tuple[float, list[str]]:
    engine = shared_engine(Settings(**settings))
    refs, hyps, texts = [], [], []
    for path, text in references():
        samples, _ = read_wav(path, 16000)
        hyp = engine.transcribe(samples.astype(np.float32) / 32768, 0.0, compact=False)
        said = " ".join(w.text for w in hyp.words)
        refs += norm_words(text)
        hyps += norm_words(said)
        texts.append(said)
    return wer(refs, hyps), texts


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", default="1,2,4,6,8,10,12", help="meeting counts to try")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per load run")
    parser.add_argument("--model", default="tiny.en")
    parser.add_argument("--asr-threads", type=int, default=0, help="0: one lane per core")
    parser.add_argument(
        "--stagger",
        type=float,
        default=STAGGER,
        help="seconds over which meetings' start times are spread (0: lockstep)",
    )
    parser.add_argument("--load-only", action="store_true", help="skip (i) and (ii)")
    parser.add_argument("--summary", type=Path, help="write the human summary here too")
    args = parser.parse_args()
    settings = {"model": args.model, "asr_threads": args.asr_threads}
    shared_engine(Settings(**settings))  # load before timing anything

    offline, _ = offline_wer(settings)
    accuracy = {"offline_wer": round(offline, 4)}
    latency: dict[str, Any] = {}
    for rate in () if args.load_only else (16000, 24000):
        r = await run(1, rate, 0.0, settings)
        said = [w for u in r["_utterances"] for w in norm_words(u["said"])]
        ref = [w for u in r["_utterances"] for w in norm_words(u["text"])]
        accuracy[f"streaming_wer_{rate}"] = round(wer(ref, said), 4)
        latency[str(rate)] = {k: v for k, v in r.items() if not k.startswith("_")}
        latency[str(rate)]["per_utterance"] = [
            {
                "text": u["text"][:40],
                "final": _round(u["final_latency"]),
                "first_partial": _round(u["first_partial_latency"]),
            }
            for u in r["_utterances"]
        ]
    load = []
    for n in (int(x) for x in args.sessions.split(",")):
        r = await run(n, 16000, args.duration, settings, args.stagger)
        r.pop("_utterances")
        r["ok"] = bool(
            r["finals_lost"] == 0
            and r["final_latency_p95"] is not None
            and r["final_latency_p95"] <= 1.5
        )
        load.append(r)
        print(json.dumps(r), file=sys.stderr)
    passing = [r["sessions"] for r in load if r["ok"]]
    result = {
        "model": args.model,
        "asr_threads": args.asr_threads,
        "stagger": args.stagger,
        "accuracy": accuracy,
        "single_session": latency,
        "load": load,
        "max_sessions_p95_final_le_1_5s": max(passing, default=0),
    }
    print(json.dumps(result, indent=2))
    summary = render(result)
    print(summary, file=sys.stderr)
    if args.summary is not None:
        args.summary.write_text(summary)


def render(r: dict[str, Any]) -> str:
    a, one = r["accuracy"], r["single_session"].get("16000")
    lines = [
        f"# Transcription benchmark ({r['model']}, asr_threads={r['asr_threads']},"
        f" stagger={r['stagger']} s)",
        "",
    ]
    if one is not None:
        lines += [
            f"- WER offline {a['offline_wer']:.3f}; streaming 16 kHz"
            f" {a['streaming_wer_16000']:.3f}, 24 kHz {a['streaming_wer_24000']:.3f}",
            f"- one meeting: end of speech to final p50 {one['final_latency_p50']} s,"
            f" p95 {one['final_latency_p95']} s; start to first partial p95"
            f" {one['first_partial_p95']} s",
        ]
    lines += [
        f"- largest load with p95 final <= 1.5 s and no final lost:"
        f" {r['max_sessions_p95_final_le_1_5s']} meetings",
        "",
        "| meetings | final p50 | final p95 | first partial p95 | lost | partials run/skipped"
        " | loop lag p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['sessions']} | {x['final_latency_p50']} | {x['final_latency_p95']} |"
        f" {x['first_partial_p95']} | {x['finals_lost']} | {x['partials_run']}/"
        f"{x['partials_skipped']} | {x['loop_lag_p99_ms']} |"
        for x in r["load"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    asyncio.run(main())
