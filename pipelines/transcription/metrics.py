"""Transcription metrics, built once per process on the injected registry.

Labels are bounded: job kinds (``partial``, ``final``) and fixed reason words, never a
session key or a speaker name.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
#: A word's wait for its final: the conversation targets are 1.5 s (p50) and 2.5 s (p95).
_WORD_BUCKETS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0)
_RTF_BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0)


class TranscriptionMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.queue_depth = Gauge(
            "gateway_asr_queue_depth", "Recognition jobs waiting, by kind", ["kind"], registry=r
        )
        self.lanes_busy = Gauge(
            "gateway_asr_lanes_busy",
            "Share of the recognition lanes' time busy over the last 5 s (partials hear "
            "8 s of audio until it passes 0.7, 4 s until it is back under 0.4)",
            registry=r,
        )
        self.jobs = Counter(
            "gateway_asr_jobs", "Recognition jobs run, by kind", ["kind"], registry=r
        )
        self.skipped = Counter(
            "gateway_asr_skipped",
            "Recognition jobs not run: superseded or stale partials, finals over the bound",
            ["kind", "reason"],
            registry=r,
        )
        self.busy_seconds = Counter(
            "gateway_asr_busy_seconds", "Time spent recognizing, seconds", registry=r
        )
        self.audio_seconds = Counter(
            "gateway_asr_audio_seconds", "Audio recognized, seconds", registry=r
        )
        self.rtf = Histogram(
            "gateway_asr_real_time_factor",
            "Compute time over audio time, per recognition",
            ["kind"],
            buckets=_RTF_BUCKETS,
            registry=r,
        )
        self.wait = Histogram(
            "gateway_asr_wait_seconds",
            "Time a job waited in the queue",
            ["kind"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch = Histogram(
            "gateway_asr_batch_jobs",
            "Jobs of different sessions run in one recognition call",
            buckets=(1, 2, 3, 4, 6, 8),
            registry=r,
        )
        self.results = Counter(
            "gateway_transcription_results",
            "Results published, by kind",
            ["kind"],
            registry=r,
        )
        self.rejected = Counter(
            "gateway_transcription_rejected_segments",
            "Recognized segments thrown away as non-speech or hallucination, by reason",
            ["reason"],
            registry=r,
        )
        self.early_finals = Counter(
            "gateway_transcription_early_finals",
            "Utterance ends recognized at a VAD pause: used (the pause was the end) or "
            "wasted (speech went on)",
            ["outcome"],
            registry=r,
        )
        self.bot_words_dropped = Counter(
            "gateway_transcription_bot_words_dropped",
            "Words of the bot's own voice dropped (bot_speech=drop)",
            registry=r,
        )
        self.final_latency = Histogram(
            "gateway_transcription_final_latency_seconds",
            "From the end of speech to its final being published, wall time",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.word_final_latency = Histogram(
            "gateway_transcription_word_final_latency_seconds",
            "From the end of each word to the final that carries it, wall time: in a "
            "conversation, how late the transcript runs",
            buckets=_WORD_BUCKETS,
            registry=r,
        )
        self.first_partial_latency = Histogram(
            "gateway_transcription_first_partial_latency_seconds",
            "From the start of speech to the utterance's first partial, wall time",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.errors = Counter("gateway_asr_errors", "Recognition jobs that raised", registry=r)

    def recognized(
        self, kind: str, audio_seconds: float, compute_seconds: float, rejected: Sequence[str]
    ) -> None:
        """A recognition of ``kind`` heard ``audio_seconds`` in ``compute_seconds``, and
        left out the segments ``rejected`` names (a reason each)."""
        for reason in rejected:
            self.rejected.labels(reason).inc()
        self.audio_seconds.inc(audio_seconds)
        self.busy_seconds.inc(compute_seconds)
        if audio_seconds > 0:
            self.rtf.labels(kind).observe(compute_seconds / audio_seconds)
