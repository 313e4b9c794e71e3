"""Recognition jobs and results as Redis stream entries (sans I/O).

A node running ``--recognition pool`` appends each job to ``gateway:asr:final`` (finals
and first partials) or ``gateway:asr:partial`` (workers read the first one first); a
worker appends the result to the node's own ``gateway:asr:done:{node}``. Both sides
encode and decode here, so the format is one thing, tested without Redis.

A job carries its audio as 16 kHz 16-bit PCM (half the bytes of the float32 the model
takes; the model hears no difference), the session-clock offset, the language to decode
in (empty: detect) and when it was submitted (a worker skips a partial that is stale).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .engine import Hypothesis
from .words import HypWord

PREFIX = "gateway:asr:"
STREAMS = {"final": f"{PREFIX}final", "partial": f"{PREFIX}partial"}
GROUP = "workers"
WORKERS = f"{PREFIX}workers"


def stream_for(kind: str, urgent: bool) -> str:
    """Finals, and the partials that bring an utterance's first text, go where workers
    look first and run them on the lane they keep free (as a node's own lanes do)."""
    return STREAMS["final"] if kind == "final" or urgent else STREAMS["partial"]


def done_stream(node: str) -> str:
    return f"{PREFIX}done:{node}"


def worker_key(name: str) -> str:
    return f"{PREFIX}worker:{name}"


def worker_lanes(worker: dict[str, Any]) -> int:
    """The lanes a worker's heartbeat says it runs (one if it does not say)."""
    return max(1, int(worker.get("lanes") or 1))


def pool_busy(workers: list[dict[str, Any]]) -> float:
    """How busy the pool's lanes were over the last few seconds, from the live workers'
    heartbeats: each worker's share (:class:`~.scheduler.LaneUse`) weighted by its lanes.
    A worker that does not say counts as busy throughout; no worker at all, as busy."""
    lanes = [worker_lanes(w) for w in workers]
    if not lanes:
        return 1.0
    shares = [
        min(1.0, max(0.0, float(b))) if isinstance(b := w.get("busy"), int | float) else 1.0
        for w in workers
    ]
    return sum(n * s for n, s in zip(lanes, shares, strict=True)) / sum(lanes)


@dataclass(frozen=True, slots=True)
class JobSpec:
    id: str
    node: str
    session: str
    kind: str
    audio: npt.NDArray[np.float32]
    offset: float
    language: str | None
    submitted: float
    """Wall time the node submitted it (``time.time()``)."""
    urgent: bool = False
    """A partial that would bring an utterance's first text (runs with the finals)."""
    prompt: str = ""
    """The meeting's terms to expect; a node of an earlier release sends none."""


def encode_job(job: JobSpec) -> dict[str, bytes | str]:
    pcm = np.clip(job.audio * 32768.0, -32768, 32767).astype("<i2").tobytes()
    return {
        "id": job.id,
        "node": job.node,
        "session": job.session,
        "kind": job.kind,
        "offset": repr(job.offset),
        "language": job.language or "",
        "submitted": repr(job.submitted),
        "urgent": "1" if job.urgent else "",
        "prompt": job.prompt,
        "audio": pcm,
    }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def decode_job(fields: dict[Any, Any]) -> JobSpec:
    """Raises KeyError or ValueError for an entry that is not a job."""
    f = {_text(k): v for k, v in fields.items()}
    audio = np.frombuffer(f["audio"], dtype="<i2").astype(np.float32) / 32768.0
    return JobSpec(
        _text(f["id"]),
        _text(f["node"]),
        _text(f["session"]),
        _text(f["kind"]),
        audio,
        float(_text(f["offset"])),
        _text(f["language"]) or None,
        float(_text(f["submitted"])),
        bool(_text(f.get("urgent", ""))),
        _text(f.get("prompt", "")),
    )


def encode_result(job_id: str, hypothesis: Hypothesis | None, worker: str) -> dict[str, str]:
    """``hypothesis`` None: the worker skipped the job (a stale partial)."""
    if hypothesis is None:
        return {"id": job_id, "worker": worker, "skipped": "stale"}
    h = hypothesis
    body = {
        "words": [[w.text, w.start, w.end, w.probability] for w in h.words],
        # Apart from the words, which a gateway of an earlier release unpacks as four.
        "attached": [i for i, w in enumerate(h.words) if w.attached],
        "rejected": list(h.rejected),
        "audio_seconds": h.audio_seconds,
        "compute_seconds": h.compute_seconds,
        "language": h.language,
        "language_probability": h.language_probability,
    }
    return {"id": job_id, "worker": worker, "result": json.dumps(body, separators=(",", ":"))}


def decode_result(fields: dict[Any, Any]) -> tuple[str, Hypothesis | None]:
    """``(job id, hypothesis or None when skipped)``; raises KeyError or ValueError."""
    f = {_text(k): _text(v) for k, v in fields.items()}
    if "result" not in f:
        return f["id"], None
    body = json.loads(f["result"])
    attached = set(body.get("attached", ()))  # a worker of an earlier release sends none
    words = tuple(
        HypWord(str(t), float(s), float(e), float(p), "", i in attached)
        for i, (t, s, e, p) in enumerate(body["words"])
    )
    return f["id"], Hypothesis(
        words,
        tuple(str(r) for r in body["rejected"]),
        float(body["audio_seconds"]),
        float(body["compute_seconds"]),
        str(body["language"]),
        float(body["language_probability"]),
    )
