"""Live transcription benchmark: accuracy, latency and capacity on this machine.

Runs a real gateway (pipelines ``recording,transcription``, the configured model) in
this process and simulated bots plus transcript subscribers in a child process, so
the gateway's event loop is measured alone. Two workloads (``--workload``):

``conversation`` (the dialogue, meeting and stand-up of :mod:`benchmarks.conversations`, 24 kHz,
with the roster the bot would send):

(i)   one meeting at a time, roster on time: per-word final latency (when each
      reference word's end was streamed to the final carrying it, p50/p95),
      speech_final latency (end of its last word to its arrival), first partial from
      a turn's start (p95), and WER streaming vs offline with the same model, over
      windows of at most 28 s cut at pauses and by faster-whisper's own loop over the
      whole audio;
(ii)  for each roster timing (``--lags``, seconds late; negative: early): speaker
      attribution of the matched final words, duplicated words and repeated phrases;
(iii) for each number of concurrent meetings (the recipes looped, each meeting starting
      at a different turn after a different lead-in): the latencies of (i), reference
      words lost and words no final covers, finals and partials skipped, subscribers
      dropped, the event loop's lag p99, and the cores the gateway and the bots'
      process used while the meetings played (both run on this machine).

``read`` (the LibriVox test utterances back to back, one reader):

(i)   word error rate of streaming vs offline transcription, at 16 and 24 kHz;
(ii)  end of speech to its final (p50/p95) and start of speech to the first partial
      (p95), as a subscriber sees them; also per-word final and speech_final latency
      measured as for conversations;
(iii) for each number of concurrent meetings (continuous speech at real time): p95
      final latency, finals lost, partials skipped, and the event loop's lag p99.

How transcripts are scored per word: :mod:`benchmarks.transcript_metrics`, which also
holds the conversation targets. Prints one JSON document on stdout and a short summary
on stderr (or ``--summary``). The full run (about 40 minutes):

    .venv/bin/python benchmarks/transcription.py --sessions 1,2,4,8,12,16 --duration 60

Recognition through the cluster's pool instead of the gateway's own lanes
(``--recognition pool``): a ``redis-server`` and ``--pool-workers`` ``meeting-gateway
worker`` processes of ``--asr-threads`` lanes each are started, and the gateway sends its
jobs there (its one local lane is only the fallback). Compare with the same command
without the flag, e.g. the read workload at 4 and 8 meetings::

    .venv/bin/python benchmarks/transcription.py --workload read --sessions 4,8 \\
        --recognition pool --pool-workers 1 --asr-threads 2

The conversations under background noise (``benchmarks/noise.py``: somebody typing, or
voices in the room), with the voice activity model to compare::

    .venv/bin/python benchmarks/transcription.py --workload conversation --sessions "" \\
        --lags 0 --noise typing:20 --vad silero

Meetings that expect names and terms (``--keywords``, ``--roster-keywords``: what they cost
a node), e.g. the names conversation at 4 and 8 meetings; the offline reference is not
prompted::

    .venv/bin/python benchmarks/transcription.py --workload conversation --load-only \\
        --conversations names --sessions 4,8 --roster-keywords \\
        --keywords Postgres,Grafana,Figma,Kubernetes,Terraform

A short one while developing:

    .venv/bin/python benchmarks/transcription.py --workload conversation \\
        --conversations dialogue --excerpt 30 --lags 0 --sessions 1,2 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from benchmarks import common
from benchmarks import transcript_metrics as tm
from benchmarks.conversations import (
    DEFAULT_CACHE,
    Conversation,
    Turn,
    build,
    offline_wers,
    reader_lines,
)
from benchmarks.noise import mix
from benchmarks.noise import parse as parse_noise
from gateway import keywords
from gateway.config import Settings
from gateway.errors import ConfigError
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
TAIL = 0.5  # silence after a conversation meeting's last turn, as after the recipes' own
ROOT = Path(__file__).resolve().parent.parent


def references() -> list[tuple[Path, str]]:
    return [(LIBRIVOX / f"{full}.wav", text) for full, text in reader_lines().values()]


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


pct = tm.pct


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


def cut_points(conv: Conversation) -> list[float]:
    """Seconds where nobody speaks: the middle of every gap between turns, and both ends."""
    cuts, reach = [0.0], 0.0
    for turn in sorted(conv.turns, key=lambda t: t.start):
        if reach > 0 and turn.start > reach:
            cuts.append((reach + turn.start) / 2)
        reach = max(reach, turn.end)
    return [*cuts, conv.duration]


def meeting_audio(
    conv: Conversation,
    seconds: float = 0.0,
    offset: float = 0.0,
    lead: float = 0.0,
    excerpt: float = 0.0,
) -> Conversation:
    """A meeting's audio and turns: ``lead`` seconds of silence, then the conversation
    from the gap ``offset`` (a fraction) of the way in, looped and cut between turns
    once ``seconds`` are reached (``seconds <= 0``: once round), and :data:`TAIL` seconds
    of silence. ``excerpt > 0`` plays only the first ``excerpt`` seconds of the
    conversation (to the next gap)."""
    rate = conv.rate
    cuts = [round(c * rate) for c in cut_points(conv)]
    if excerpt > 0:
        end = next((c for c in cuts[1:] if c >= excerpt * rate), cuts[-1])
        cuts = [*(c for c in cuts if c < end), end]
    blocks = list(itertools.pairwise(cuts))
    first = int(offset * len(blocks)) % len(blocks)
    pos = round(lead * rate)
    parts, turns, n = [np.zeros(pos, np.int16)], [], 0
    while (n < len(blocks)) if seconds <= 0 else (pos < seconds * rate):
        a, b = blocks[(first + n) % len(blocks)]
        shift = (pos - a) / rate
        parts.append(conv.samples[a:b])
        turns += [
            dataclasses.replace(t, start=t.start + shift, end=t.end + shift)
            for t in conv.turns
            if a <= t.start * rate < b
        ]
        pos, n = pos + b - a, n + 1
    turns.sort(key=lambda t: t.start)
    samples = np.concatenate([*parts, np.zeros(round(TAIL * rate), np.int16)])
    return Conversation(conv.name, rate, samples, tuple(turns), conv.recipe)


async def stream(
    port: int,
    key: str,
    samples: Any,
    rate: int,
    roster: list[dict[str, Any]] | None = None,
    query: str = "",
) -> tuple[list[tuple[float, dict[str, Any]]], list[float]]:
    """Play ``samples`` as a bot at real time (its URL ending in ``query``) while
    subscribed to the session's transcripts: every message with its arrival time, and the
    send time of every frame."""
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
        f"ws://127.0.0.1:{port}/bots/{key}{query}",
        samples,
        rate,
        frame_ms=FRAME_MS,
        record_times=True,
        roster=roster or [],
    )
    await bot.run()
    async with asyncio.timeout(120):
        await reader
    return received, bot.send_times


def read_scores(spans: list[Any], rate: int, received: Any, sent: list[float]) -> Any:
    """Each utterance's final and first-partial latency, and the per-word measures."""
    frame = rate * FRAME_MS // 1000

    def at(sample: int) -> float:
        return sent[min(len(sent) - 1, sample // frame)]

    turns = [
        Turn("reader", 0, text, a / rate, b / rate, tuple(norm_words(text))) for a, b, text in spans
    ]
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
    return {
        "utterances": utterances,
        "words": tm.score(turns, received, lambda t: at(max(0, round(t * rate)))),
    }


def conversation_scores(conv: Conversation, received: Any, sent: list[float]) -> Any:
    frame = conv.rate * FRAME_MS // 1000

    def sent_at(t: float) -> float:
        return sent[min(len(sent) - 1, max(0, round(t * conv.rate)) // frame)]

    return tm.score(conv.turns, received, sent_at)


def clients(port: int, specs: list[dict[str, Any]], out: Any) -> None:
    """Play the meetings of ``specs`` at once; their audio is made before any is played,
    and what was received is scored once all have ended."""
    load = functools.cache(build)
    meetings: list[tuple[Any, int, list[dict[str, Any]], Any]] = []
    for s in specs:
        if s["kind"] == "read":
            samples, spans = layout(s["rate"], s["seconds"], s["rotate"], s["stagger"])
            meetings.append((samples, s["rate"], [], spans))
        else:
            conv = meeting_audio(
                load(s["name"], Path(s["cache"]), s["rate"]),
                s["seconds"],
                s["offset"],
                s["lead"],
                s["excerpt"],
            )
            if noise := parse_noise(s.get("noise", "")):
                conv = mix(conv, *noise)
            meetings.append((conv.samples, conv.rate, conv.roster_script(s["lag"]), conv))

    async def main() -> list[Any]:
        got = await asyncio.gather(
            *(
                stream(port, f"bench{i}", samples, rate, roster, spec.get("query", ""))
                for i, ((samples, rate, roster, _), spec) in enumerate(
                    zip(meetings, specs, strict=True)
                )
            )
        )
        return list(got)

    began, cpu = time.monotonic(), time.process_time()
    streamed = asyncio.run(main())
    cores = round((time.process_time() - cpu) / (time.monotonic() - began), 2)
    for n, (s, (received, sent)) in enumerate(zip(specs, streamed, strict=True)):
        if s.get("keep"):
            keep = Path(s["keep"])
            keep.mkdir(parents=True, exist_ok=True)
            name = f"{s['name']}-lag{s['lag']:g}-of{len(specs)}-{n}.json"
            (keep / name).write_text(json.dumps({"spec": s, "received": received, "sent": sent}))
    scores = [
        read_scores(ref, rate, *got) if isinstance(ref, list) else conversation_scores(ref, *got)
        for (_, rate, _, ref), got in zip(meetings, streamed, strict=True)
    ]
    out.put((scores, cores))


# -- the gateway side (this process) ----------------------------------------------------


def _counter_value(registry: CollectorRegistry, name: str, kind: str | None = None) -> float:
    """A counter's total over its labels (only those of ``kind`` when given)."""
    return sum(
        s.value
        for metric in registry.collect()
        if metric.name == name
        for s in metric.samples
        if s.name.endswith("_total") and kind in (None, s.labels.get("kind"))
    )


def _counter(registry: CollectorRegistry, name: str, kind: str | None = None) -> int:
    return int(_counter_value(registry, name, kind))


def _mean(registry: CollectorRegistry, name: str, kind: str | None = None) -> float | None:
    """A histogram's mean over its labels (only those of ``kind`` when given)."""
    sums = {"_sum": 0.0, "_count": 0.0}
    for metric in registry.collect():
        if metric.name != name:
            continue
        for s in metric.samples:
            suffix = s.name[len(name) :]
            if suffix in sums and kind in (None, s.labels.get("kind")):
                sums[suffix] += s.value
    return round(sums["_sum"] / sums["_count"], 3) if sums["_count"] else None


async def run(settings: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, Any]:
    """One gateway, the meetings of ``specs`` at once: what each client measured and the
    gateway's scheduler metrics and event-loop lag."""
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
        began, cpu = time.monotonic(), time.process_time()
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        proc = ctx.Process(target=clients, args=(port, specs, out))
        proc.start()
        meetings, client_cores = await asyncio.to_thread(_collect, out, proc)
        gateway_cores = (time.process_time() - cpu) / (time.monotonic() - began)
        stop.set()
        await sampler
        await gateway.stop()
    jobs = _counter(registry, "gateway_asr_jobs")
    return {
        "meetings": meetings,
        "recognitions": jobs,
        # Seconds of audio per recognition: the partials' span, which the lanes' load sets.
        "audio_per_recognition": round(_counter(registry, "gateway_asr_audio_seconds") / jobs, 2)
        if jobs
        else None,
        "partials_run": _counter(registry, "gateway_asr_jobs", "partial"),
        # Jobs of different sessions per model call, how long partials waited for a lane,
        # and the lanes' seconds per recognition (a batch's shared among its jobs).
        "jobs_per_call": _mean(registry, "gateway_asr_batch_jobs"),
        "partial_wait_mean": _mean(registry, "gateway_asr_wait_seconds", "partial"),
        "compute_per_recognition": round(
            _counter_value(registry, "gateway_asr_busy_seconds") / jobs, 3
        )
        if jobs
        else None,
        "partials_skipped": _counter(registry, "gateway_asr_skipped", "partial"),
        "finals_skipped": _counter(registry, "gateway_asr_skipped", "final"),
        "subscribers_dropped": _counter(registry, "gateway_transcript_subscriber_drops"),
        # Cores used while the meetings played: the gateway (its lanes included) and the
        # bots' process (streaming, subscribing, scoring), which shares this machine.
        "gateway_cores": round(gateway_cores, 2),
        "client_cores": client_cores,
        "loop_lag_p99_ms": None if not lags else round(1000 * float(np.percentile(lags, 99)), 2),
        "loop_lag_max_ms": None if not lags else round(1000 * max(lags), 2),
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


# -- recognition through the pool -------------------------------------------------------


@contextlib.asynccontextmanager
async def recognition_pool(workers: int, lanes: int, model: str) -> AsyncIterator[dict[str, Any]]:
    """A Redis and ``workers`` worker processes; yields the gateway settings that use them."""
    from benchmarks.cluster import RedisServer

    with tempfile.TemporaryDirectory(prefix="bench-pool-") as tmp:
        redis = RedisServer(Path(tmp), argparse.Namespace(nice=0))
        await redis.wait_ready()
        procs = []
        for i in range(workers):
            env = {**os.environ, "GATEWAY_REDIS_URL": redis.url, "GATEWAY_MODEL": model}
            env |= {"GATEWAY_NODE_ID": f"bench-worker-{i}", "GATEWAY_ASR_THREADS": str(lanes)}
            with open(Path(tmp) / f"worker-{i}.log", "wb") as log:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "gateway", "worker", env=env, stderr=log, cwd=ROOT
                    )
                )

        async def joined() -> bool:
            return bool(await redis.client.hlen("gateway:asr:workers") >= workers)

        try:
            if not await common.poll(joined, 120):
                raise RuntimeError(f"the workers did not start; see {tmp}/worker-*.log")
            yield {"redis_url": redis.url, "recognition": "pool", "node_id": "bench-node"}
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                await asyncio.wait_for(proc.wait(), 30)
            await redis.stop()


# -- the read workload ------------------------------------------------------------------

#: Measures of the conversation workload that mean the same for read speech.
READ_WORD_FIELDS = (
    "word_final_p50",
    "word_final_p95",
    "words_expected",
    "words_matched",
    "speech_final_p50",
    "speech_final_p95",
)


async def read_point(
    sessions: int, rate: int, seconds: float, settings: dict[str, Any], stagger: float = STAGGER
) -> Any:
    spec = {"kind": "read", "rate": rate, "seconds": seconds, "stagger": stagger}
    r = await run(settings, [{**spec, "rotate": i} for i in range(sessions)])
    meetings = r.pop("meetings")
    utterances = [u for m in meetings for u in m["utterances"]]
    words = tm.summarize(m["words"] for m in meetings)
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
        **{k: words[k] for k in READ_WORD_FIELDS},
        "partials_run": r["partials_run"],
        "partials_skipped": r["partials_skipped"],
        "loop_lag_p99_ms": r["loop_lag_p99_ms"],
        "loop_lag_max_ms": r["loop_lag_max_ms"],
        "_utterances": utterances,
    }


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


async def read_workload(args: Any, settings: dict[str, Any]) -> dict[str, Any]:
    offline, _ = offline_wer(settings)
    accuracy = {"offline_wer": round(offline, 4)}
    latency: dict[str, Any] = {}
    for rate in () if args.load_only else (16000, 24000):
        r = await read_point(1, rate, 0.0, settings)
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
    for n in args.sessions:
        r = await read_point(n, 16000, args.duration, settings, args.stagger)
        r.pop("_utterances")
        r["ok"] = bool(
            r["finals_lost"] == 0
            and r["final_latency_p95"] is not None
            and r["final_latency_p95"] <= 1.5
        )
        load.append(r)
        print("read", json.dumps(r), file=sys.stderr)
    passing = [r["sessions"] for r in load if r["ok"]]
    return {
        "accuracy": accuracy,
        "single_session": latency,
        "load": load,
        "max_sessions_p95_final_le_1_5s": max(passing, default=0),
    }


# -- the conversation workload ----------------------------------------------------------


def conversation_spec(args: Any, name: str, **kw: Any) -> dict[str, Any]:
    spec = {"kind": "conversation", "name": name, "cache": str(args.cache), "rate": args.rate}
    if getattr(args, "keep", None):
        spec["keep"] = str(args.keep)
    if getattr(args, "noise", ""):
        spec["noise"] = args.noise
    return {**spec, "lag": 0.0, "seconds": 0.0, "offset": 0.0, "lead": 0.0, "excerpt": 0.0, **kw}


async def conversation_workload(args: Any, settings: dict[str, Any]) -> dict[str, Any]:
    names = args.conversations
    convs = {n: build(n, args.cache, args.rate) for n in names}
    result: dict[str, Any] = {"conversations": names, "rate": args.rate, "excerpt": args.excerpt}
    if not args.load_only:
        engine = shared_engine(Settings(**settings))
        offline = {}
        for n in names:
            audio = meeting_audio(convs[n], excerpt=args.excerpt)
            if noise := parse_noise(args.noise):
                audio = mix(audio, *noise)  # the same audio the meeting plays
            offline[n] = offline_wers(audio, engine)
        runs: dict[float, dict[str, Any]] = {}
        for lag in dict.fromkeys([0.0, *args.lags]):
            runs[lag] = {}
            for n in names:
                spec = conversation_spec(args, n, lag=lag, excerpt=args.excerpt)
                runs[lag][n] = (await run(settings, [spec]))["meetings"][0]
            row = tm.summarize(runs[lag].values())
            print(f"conversation lag {lag}:", json.dumps(row), file=sys.stderr)
        result.update(tm.single_session(runs[0.0], offline))
        result["attribution"] = [tm.attribution_row(lag, runs[lag]) for lag in args.lags]
    load = []
    for n in args.sessions:
        specs = [
            conversation_spec(
                args,
                names[i % len(names)],
                seconds=args.duration,
                offset=(i // len(names) * GOLDEN) % 1.0,
                lead=(i * GOLDEN) % 1.0 * args.stagger,
                query=own_terms(args, i),
            )
            for i in range(n)
        ]
        r = await run(settings, specs)
        row = {"sessions": n, **tm.summarize(r.pop("meetings")), **r}
        row["ok"] = tm.load_ok(row)
        load.append(row)
        print("conversation", json.dumps(row), file=sys.stderr)
    result["load"] = load
    result["max_sessions"] = max((r["sessions"] for r in load if r["ok"]), default=0)
    result["targets"] = tm.targets(result)
    return result


def own_terms(args: Any, i: int) -> str:
    """With ``--own-keywords``, meeting ``i``'s bot URL query: the ``--keywords`` in an
    order of its own, so that no two meetings have one prompt (and share a model call)."""
    if not args.own_keywords:
        return ""
    terms = keywords.split(args.keywords)
    order = next(
        itertools.islice(itertools.permutations(terms), i % math.factorial(len(terms)), None)
    )
    return "?keywords=" + ",".join(order)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default, help in (
        ("--workload", "conversation,read", "workloads to run, in order: conversation, read"),
        ("--sessions", "1,2,4,6,8,10,12", "meeting counts to try (empty: no load sweep)"),
        ("--duration", 60.0, "seconds per load run"),
        ("--model", "tiny.en", "Whisper model"),
        ("--asr-threads", 0, "recognition lanes (0: one per core)"),
        ("--stagger", STAGGER, "seconds over which meetings' starts are spread (0: lockstep)"),
        ("--conversations", "dialogue,meeting,standup", "conversation recipes to play"),
        ("--lags", "0,1,2,-0.5", "roster lags to score attribution at, s (negative: early)"),
        ("--rate", 24000, "conversation sample rate"),
        ("--cache", DEFAULT_CACHE, "where built conversations are kept"),
        ("--excerpt", 0.0, "single-meeting conversation runs play only this many s (0: all)"),
        ("--recognition", "local", "local lanes, or pool: worker processes on a Redis"),
        ("--pool-workers", 1, "worker processes with --recognition pool"),
        ("--noise", "", "background noise under the conversations, KIND:SNR (typing:20)"),
        ("--vad", Settings().vad, "the gateway's voice activity model: webrtc or silero"),
        ("--keywords", "", "terms every meeting expects (GATEWAY_KEYWORDS), comma-separated"),
    ):
        parser.add_argument(flag, type=type(default), default=default, help=help)
    parser.add_argument(
        "--own-keywords",
        action="store_true",
        help="each meeting's bot URL names the --keywords in an order of its own (no two"
        " meetings share a prompt) instead of the deployment's GATEWAY_KEYWORDS",
    )
    parser.add_argument(
        "--roster-keywords",
        action="store_true",
        help="every meeting expects the names on its roster (GATEWAY_ROSTER_KEYWORDS)",
    )
    parser.add_argument("--load-only", action="store_true", help="only the load sweeps")
    parser.add_argument("--summary", type=Path, help="write the human summary here too")
    parser.add_argument(
        "--keep",
        type=Path,
        help="write what each conversation meeting's subscriber received (and when each"
        " frame was sent) here, one JSON file per meeting, to see where a figure came from",
    )
    args = parser.parse_args()
    args.sessions = [int(x) for x in _floats(args.sessions)]
    args.lags = _floats(args.lags)
    args.conversations = [x for x in args.conversations.split(",") if x]
    workloads = [x for x in args.workload.split(",") if x]
    if unknown := set(workloads) - {"conversation", "read"}:
        parser.error(f"unknown workload {', '.join(sorted(unknown))}")
    try:
        parse_noise(args.noise)
    except ValueError as exc:
        parser.error(str(exc))
    settings = {"model": args.model, "asr_threads": args.asr_threads, "vad": args.vad}
    if args.keywords or args.roster_keywords:  # the offline reference is not prompted
        deployment = "" if args.own_keywords else args.keywords
        settings.update(keywords=deployment, roster_keywords=args.roster_keywords)
    if args.own_keywords and not args.keywords:
        parser.error("--own-keywords needs --keywords")
    try:
        Settings(**settings).validate()
    except ConfigError as exc:
        parser.error(str(exc))
    shared_engine(Settings(**settings))  # load before timing anything

    result: dict[str, Any] = {
        "model": args.model,
        "asr_threads": args.asr_threads,
        "stagger": args.stagger,
        "duration": args.duration,
        "revision": common.revision(ROOT),
        "machine": common.machine(),
        "workloads": workloads,
        "noise": args.noise,
        "vad": args.vad,
        "keywords": args.keywords,
        "roster_keywords": args.roster_keywords,
        "own_keywords": args.own_keywords,
    }
    result["recognition"] = args.recognition
    pool: Any = contextlib.nullcontext({})
    if args.recognition == "pool":
        pool = recognition_pool(args.pool_workers, args.asr_threads or 1, args.model)
        result["pool_workers"] = args.pool_workers
    async with pool as extra:
        settings.update(extra)
        for workload in workloads:
            if workload == "read":
                result["read"] = await read_workload(args, settings)
            else:
                result["conversation"] = await conversation_workload(args, settings)
    print(json.dumps(result, indent=2))
    summary = render(result)
    print(summary, file=sys.stderr)
    if args.summary is not None:
        args.summary.write_text(summary)


def render(r: dict[str, Any]) -> str:
    lines = [
        f"# Transcription benchmark ({r['model']}, asr_threads={r['asr_threads']},"
        f" recognition={r.get('recognition', 'local')}, vad={r.get('vad', 'webrtc')},"
        f" noise={r.get('noise') or 'none'},"
        f" stagger={r['stagger']} s, revision {r['revision']})",
        "",
    ]
    if "conversation" in r:
        lines += tm.render(r["conversation"], r["duration"])
    if "read" in r:
        lines += render_read(r["read"])
    return "\n".join(lines) + "\n"


def render_read(r: dict[str, Any]) -> list[str]:
    a, one = r["accuracy"], r["single_session"].get("16000")
    lines = ["## Read speech (LibriVox, one reader)", ""]
    if one is not None:
        lines += [
            f"- WER offline {a['offline_wer']:.3f}; streaming 16 kHz"
            f" {a['streaming_wer_16000']:.3f}, 24 kHz {a['streaming_wer_24000']:.3f}",
            f"- one meeting: end of speech to final p50 {one['final_latency_p50']} s,"
            f" p95 {one['final_latency_p95']} s; start to first partial p95"
            f" {one['first_partial_p95']} s; per-word final p50 {one['word_final_p50']} s,"
            f" p95 {one['word_final_p95']} s ({one['words_matched']}/{one['words_expected']}"
            " words)",
        ]
    lines += [
        f"- largest load with p95 final <= 1.5 s and no final lost:"
        f" {r['max_sessions_p95_final_le_1_5s']} meetings",
        "",
        "| meetings | final p50 | final p95 | first partial p95 | lost | partials run/skipped"
        " | loop lag p99 ms | word final p50/p95 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['sessions']} | {x['final_latency_p50']} | {x['final_latency_p95']} |"
        f" {x['first_partial_p95']} | {x['finals_lost']} | {x['partials_run']}/"
        f"{x['partials_skipped']} | {x['loop_lag_p99_ms']} |"
        f" {x['word_final_p50']}/{x['word_final_p95']} |"
        for x in r["load"]
    ]
    return [*lines, ""]


if __name__ == "__main__":
    asyncio.run(main())
