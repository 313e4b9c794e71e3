"""A long meeting's live transcript, from its first pass of the speech loop to its last.

The soak's meeting plays the same speech over and over (the LibriVox utterances, or a
conversation of the test set), so every pass of the loop is known word for word. A
subscriber on ``/bots/{key}/transcripts`` keeps each final with its arrival time, and the
bot sends frames on a monotonic schedule, so a word whose end is at ``t`` s of audio was
sent at ``t0 + t / speed``. Passes are scored one by one and grouped into buckets of
audio: a transcript that drifts, slows down or stalls as the hours go by shows as WER or
per-word final latency rising from one bucket to the next. A conversation's roster is
looped with it, and each bucket also says how many words went to the right speaker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from websockets.asyncio.client import connect

from benchmarks.conversations import reader_lines
from benchmarks.transcript_metrics import (
    FinalWord,
    duplicates,
    final_words,
    matched_words,
    pct,
    reference_words,
)
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


def attributed(turns: Sequence[Any], words: list[FinalWord], offset: float) -> tuple[int, int]:
    """Of one pass's final words (``offset`` s into the meeting), how many are on their
    reference turn's speaker, and how many were matched to the reference."""
    shifted = [dataclasses.replace(w, start=w.start - offset, end=w.end - offset) for w in words]
    pairs = matched_words(turns, reference_words(turns), shifted)
    return sum(h.speaker == r.speaker for r, h in pairs), len(pairs)


def report(
    received: Received,
    reference: list[str],
    *,
    t0: float,
    speed: float,
    loop_seconds: float,
    audio_seconds: float,
    bucket_seconds: float,
    turns: Sequence[Any] = (),
) -> dict[str, Any]:
    """WER and per-word final latency (wall seconds, from when the word's end was sent
    to the final's arrival) per bucket of whole passes, and over the meeting; with the
    loop's ``turns``, the share of words on the right speaker too."""
    words = final_words(received)
    passes = int(audio_seconds // loop_seconds)  # the last, cut short, is not scored
    by_pass: list[list[Any]] = [[] for _ in range(passes)]
    for w in words:
        k = int(w.start // loop_seconds)
        if k < passes:
            by_pass[k].append(w)
    per_bucket = max(1, round(bucket_seconds / loop_seconds))
    buckets, errors_all, latency_all = [], 0.0, []
    right_all = matched_all = 0
    for first in range(0, passes, per_bucket):
        group = by_pass[first : first + per_bucket]
        errors = sum(wer(reference, [w.word for w in p]) * len(reference) for p in group)
        latency = [w.arrival - (t0 + w.end / speed) for p in group for w in p]
        errors_all += errors
        latency_all += latency
        bucket = {
            "audio_from_s": round(first * loop_seconds, 1),
            "passes": len(group),
            "words": sum(len(p) for p in group),
            "wer": round(errors / (len(reference) * len(group)), 4),
            "word_final_p50": pct(latency, 50),
            "word_final_p95": pct(latency, 95),
        }
        if turns:
            counts = [attributed(turns, p, (first + k) * loop_seconds) for k, p in enumerate(group)]
            right, matched = sum(c[0] for c in counts), sum(c[1] for c in counts)
            right_all, matched_all = right_all + right, matched_all + matched
            bucket["attribution"] = round(right / max(1, matched), 4)
        buckets.append(bucket)
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
        "attribution": round(right_all / max(1, matched_all), 4) if turns else None,
        "buckets": buckets,
    }
