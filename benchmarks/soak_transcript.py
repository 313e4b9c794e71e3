"""A long meeting's live transcript, from its first pass of the speech loop to its last.

The soak's meeting plays the same LibriVox utterances over and over, so every pass of the
loop is known word for word. A subscriber on ``/bots/{key}/transcripts`` keeps each final
with its arrival time, and the bot sends frames on a monotonic schedule, so a word whose
end is at ``t`` s of audio was sent at ``t0 + t / speed``. Passes are scored one by one
and grouped into buckets of audio: a transcript that drifts, slows down or stalls as the
hours go by shows as WER or per-word final latency rising from one bucket to the next.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from websockets.asyncio.client import connect

from benchmarks.conversations import reader_lines
from benchmarks.transcript_metrics import duplicates, final_words, pct
from pipelines.transcription.scoring import wer
from pipelines.transcription.scoring import words as norm_words

Received = list[tuple[float, dict[str, Any]]]


def loop_words() -> list[str]:
    """The LibriVox loop's words, utterance after utterance in the order the soak plays
    them (by file name), normalized as transcripts are scored."""
    return [w for _, text in sorted(reader_lines().values()) for w in norm_words(text)]


async def subscribe(url: str, received: Received, ready: asyncio.Event) -> None:
    """Every message of a session's transcript stream, with its arrival (monotonic)."""
    async with connect(url, open_timeout=30) as ws:
        ready.set()
        received.extend([(time.monotonic(), json.loads(m)) async for m in ws])


def report(
    received: Received,
    reference: list[str],
    *,
    t0: float,
    speed: float,
    loop_seconds: float,
    audio_seconds: float,
    bucket_seconds: float,
) -> dict[str, Any]:
    """WER and per-word final latency (wall seconds, from when the word's end was sent
    to the final's arrival) per bucket of whole passes, and over the meeting."""
    words = final_words(received)
    passes = int(audio_seconds // loop_seconds)  # the last, cut short, is not scored
    by_pass: list[list[Any]] = [[] for _ in range(passes)]
    for w in words:
        k = int(w.start // loop_seconds)
        if k < passes:
            by_pass[k].append(w)
    per_bucket = max(1, round(bucket_seconds / loop_seconds))
    buckets, errors_all, latency_all = [], 0.0, []
    for first in range(0, passes, per_bucket):
        group = by_pass[first : first + per_bucket]
        errors = sum(wer(reference, [w.word for w in p]) * len(reference) for p in group)
        latency = [w.arrival - (t0 + w.end / speed) for p in group for w in p]
        errors_all += errors
        latency_all += latency
        buckets.append(
            {
                "audio_from_s": round(first * loop_seconds, 1),
                "passes": len(group),
                "words": sum(len(p) for p in group),
                "wer": round(errors / (len(reference) * len(group)), 4),
                "word_final_p50": pct(latency, 50),
                "word_final_p95": pct(latency, 95),
            }
        )
    finals = [m for _, m in received if m.get("type") == "Results" and m["is_final"]]
    return {
        "speed": speed,
        "loop_seconds": round(loop_seconds, 2),
        "finals": len(finals),
        "speech_finals": sum(1 for m in finals if m["speech_final"]),
        "words": len(words),
        "last_word_end_s": round(max((w.end for w in words), default=0.0), 2),
        "duplicates": len(duplicates(words)),
        "wer": round(errors_all / max(1, len(reference) * passes), 4),
        "word_final_p50": pct(latency_all, 50),
        "word_final_p95": pct(latency_all, 95),
        "buckets": buckets,
    }
