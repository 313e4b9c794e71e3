"""Prometheus metrics, built once on an injected registry.

Label values are bounded: close codes, rejection reasons from a fixed list, pipeline
names from the deployment's configuration. Never a session key or a speaker name.

Per-frame counters are not touched per frame: sessions count in plain integers and
flush into these counters every audio block (see :meth:`Session.flush_counts`), which
keeps the hot path to a few attribute updates.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Close codes reported by name; anything else is counted as "other".
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1012, 1013}
)


def close_label(code: int | None) -> str:
    if code is None:
        return "none"
    return str(code) if code in KNOWN_CLOSE_CODES else "other"


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.sessions = Gauge("gateway_sessions", "Sessions by state", ["state"], registry=r)
        self.connections = Gauge(
            "gateway_connections", "Open WebSocket connections by role", ["role"], registry=r
        )
        self.connections_closed = Counter(
            "gateway_connections_closed",
            "Closed connections by role and close code",
            ["role", "code"],
            registry=r,
        )
        self.refused = Counter(
            "gateway_connections_refused",
            "Connections refused before their first message, by reason",
            ["reason"],
            registry=r,
        )
        self.handler_errors = Counter(
            "gateway_handler_errors",
            "Unexpected errors in a connection handler, by stage (audio, text, connection);"
            " audio and text errors skip one message and the connection goes on",
            ["stage"],
            registry=r,
        )
        self.audio_bytes = Counter(
            "gateway_audio_received_bytes", "PCM bytes received from bots", registry=r
        )
        self.audio_seconds = Counter(
            "gateway_audio_received_seconds", "Audio received from bots, seconds", registry=r
        )
        self.frames = Counter(
            "gateway_audio_frames_received", "Binary audio messages received", registry=r
        )
        self.rejected = Counter(
            "gateway_messages_rejected",
            "Messages skipped or refused, by reason",
            ["reason"],
            registry=r,
        )
        self.ring_overruns = Counter(
            "gateway_ring_overruns",
            "Times a pipeline fell a whole ring behind and lost audio",
            ["pipeline"],
            registry=r,
        )
        self.ring_overrun_seconds = Counter(
            "gateway_ring_overrun_seconds",
            "Audio a pipeline lost to ring overruns, seconds",
            ["pipeline"],
            registry=r,
        )
        self.pipeline_queue = Gauge(
            "gateway_pipeline_queue_depth",
            "Events waiting, summed over sessions, by pipeline",
            ["pipeline"],
            registry=r,
        )
        self.pipeline_drops = Counter(
            "gateway_pipeline_dropped_events",
            "Events dropped because a pipeline's queue was full, by kind (roster, control)",
            ["pipeline", "kind"],
            registry=r,
        )
        self.pipeline_errors = Counter(
            "gateway_pipeline_errors",
            "Pipelines stopped by an exception",
            ["pipeline"],
            registry=r,
        )
        self.speakers_forgotten = Counter(
            "gateway_speakers_forgotten",
            "Speakers a session forgot to stay within max_speakers",
            registry=r,
        )
        self.speech_seconds = Counter(
            "gateway_vad_speech_seconds", "Speech detected by the VAD, seconds", registry=r
        )
        self.resumes = Counter(
            "gateway_session_resumes", "Reconnections that resumed a session", registry=r
        )
        self.rate_changes = Counter(
            "gateway_session_rate_changes",
            "Reconnects at a sample rate other than the session's (resampled to it)",
            registry=r,
        )
        self.gap_seconds = Counter(
            "gateway_gap_seconds", "Meeting time lost while bots were disconnected", registry=r
        )
        self.ingest_lag = Histogram(
            "gateway_ingest_lag_seconds",
            "Arrival of the newest sample in the ring behind the session's real-time clock",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.loop_lag = Histogram(
            "gateway_event_loop_lag_seconds",
            "How late the event loop woke a periodic timer",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=r,
        )
        # --- speech back into the meeting
        self.speech_first_frame = Histogram(
            "gateway_speech_first_frame_seconds",
            "Request to first audio frame sent to the bot, by source (say, play, pipeline)",
            ["source"],
            buckets=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.speech_frames_sent = Counter(
            "gateway_speech_frames_sent", "Audio messages sent to bots", registry=r
        )
        self.speech_sent_seconds = Counter(
            "gateway_speech_sent_seconds", "Audio sent to bots, seconds", registry=r
        )
        self.speech_underruns = Counter(
            "gateway_speech_underruns",
            "Times the bot ran out of audio in the middle of an utterance",
            registry=r,
        )
        self.speech_pacing_error = Histogram(
            "gateway_speech_pacing_error_seconds",
            "How late each audio message left against its real-time schedule",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
            registry=r,
        )
        self.speech_barge_ins = Counter(
            "gateway_speech_barge_ins",
            "People heard talking over the bot, by barge-in policy",
            ["policy"],
            registry=r,
        )
        self.speech_utterances = Counter(
            "gateway_speech_utterances",
            "Utterances by outcome (finished, interrupted, cancelled, failed, refused)",
            ["outcome"],
            registry=r,
        )
        self.control_events_dropped = Counter(
            "gateway_control_events_dropped",
            "Speech events not sent to a control client that read too slowly",
            registry=r,
        )


class DiskMetrics:
    """Writes to the data volume that failed, and what they cost; one set per registry.

    Built by :func:`gateway.storage.files.disk_watch`, shared by session metadata, the recording
    and the transcript files. ``what`` is ``recording``, ``metadata`` or ``transcript``.
    """

    WHAT = ("recording", "metadata", "transcript")

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.errors = Counter(
            "gateway_disk_errors",
            "Failed write attempts to the data volume (full disk, quota, I/O error), by what"
            " was written; failing writers retry with a back-off",
            ["what"],
            registry=r,
        )
        self.dropped_audio_seconds = Counter(
            "gateway_disk_dropped_audio_seconds",
            "Recorded audio the disk could not take before the backlog bound: silence in"
            " audio.wav instead, seconds",
            registry=r,
        )
        self.dropped_lines = Counter(
            "gateway_disk_dropped_lines",
            "speakers.jsonl (recording) and transcript.jsonl (transcript) lines the disk could"
            " not take before the backlog bound, by what",
            ["what"],
            registry=r,
        )
        self.held_audio_bytes = Gauge(
            "gateway_disk_held_audio_bytes",
            "Recorded audio waiting in memory for the disk, bytes, all sessions",
            registry=r,
        )
        for what in self.WHAT:
            self.errors.labels(what)
        for what in ("recording", "transcript"):
            self.dropped_lines.labels(what)
