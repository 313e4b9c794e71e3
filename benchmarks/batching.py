"""A recognition lane's time per job, one job per model call against batches.

Cuts partial-like excerpts (``--seconds`` long, at random places) from the conversation
recipes, recognizes them one per call (:meth:`Engine.transcribe`) and then in batches of
each ``--batches`` size (:meth:`Engine.transcribe_many`), on one lane, and prints the
milliseconds of lane time per job and how many words each way heard. Nothing else runs:
this is the lane's own cost, which the live load benchmark (``transcription.py
--load-only``) turns into meetings.

Run::

    .venv/bin/python benchmarks/batching.py --seconds 4 --batches 2,3,4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine, revision
from benchmarks.conversations import build
from gateway.config import Settings
from pipelines.transcription.engine import Request, shared_engine
from pipelines.transcription.words import ASR_RATE

ROOT = Path(__file__).resolve().parent.parent


def excerpts(cache: Path, seconds: float, per_recipe: int) -> list[Request]:
    rng = np.random.default_rng(1)
    found = []
    for name in ("dialogue", "meeting"):
        conv = build(name, cache, ASR_RATE)
        audio = (conv.at_rate(ASR_RATE) / 32768).astype(np.float32)
        for _ in range(per_recipe):
            at = float(rng.uniform(0, len(audio) / ASR_RATE - seconds))
            found.append(Request(audio[int(at * ASR_RATE) : int((at + seconds) * ASR_RATE)], at))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per job")
    parser.add_argument("--batches", default="2,3,4", help="batch sizes to measure")
    parser.add_argument("--jobs", type=int, default=48, help="jobs per measurement")
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache/meeting-gateway/conversations"
    )
    args = parser.parse_args()
    sizes = [int(n) for n in args.batches.split(",") if n]
    engine = shared_engine(Settings(asr_threads=1))
    engine.warm_up(0, 16.0, max(sizes, default=1))
    requests = excerpts(args.cache, args.seconds, args.jobs // 2)
    rows = []
    for size in [1, *sizes]:
        began = time.perf_counter()
        heard = []
        for i in range(0, len(requests), size):
            if size == 1:
                heard.append(engine.transcribe(requests[i].audio, requests[i].offset))
            else:
                heard += engine.transcribe_many(requests[i : i + size])
        took = time.perf_counter() - began
        row = {
            "batch": size,
            "ms_per_job": round(1000 * took / len(requests), 1),
            "words": sum(len(h.words) for h in heard),
        }
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    print(
        json.dumps(
            {
                "seconds": args.seconds,
                "jobs": len(requests),
                "revision": revision(ROOT),
                "machine": machine(),
                "results": rows,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
