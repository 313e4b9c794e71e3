"""A recognition lane's time per job, one job per model call against batches.

Cuts partial-like excerpts (``--seconds`` long, at random places) from the conversation
recipes, recognizes them one per call (:meth:`Engine.transcribe`) and then in batches of
each ``--batches`` size (:meth:`Engine.transcribe_many`), on one lane, and prints the
milliseconds of lane time per job and how many words each way heard. Nothing else runs:
this is the lane's own cost, which the live load benchmark (``transcription.py
--load-only``) turns into meetings.

``--profile`` runs the same measurement in a child process with oneDNN's verbose log on
and adds, for each batch size, where the lane's time went: the matrix products of a
decoder step (one row per sequence), the vocabulary projection among them, the products
over a whole window (encoder, word alignment) and the rest (convolutions, reorders), in
milliseconds per job, with the costliest operations. CTranslate2 runs its matrix
products through oneDNN on CPUs where it does not use Intel MKL (AMD); where it uses MKL
(Intel) only the convolutions show.

Run::

    .venv/bin/python benchmarks/batching.py --seconds 4 --batches 2,3,4
    .venv/bin/python benchmarks/batching.py --seconds 4 --batches 3 --profile
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from benchmarks.common import machine, revision
from benchmarks.conversations import build
from gateway.config import Settings
from pipelines.transcription.engine import Request, shared_engine
from pipelines.transcription.words import ASR_RATE

ROOT = Path(__file__).resolve().parent.parent
#: Printed by a profiled child before each batch size's jobs.
PHASE = "batching-phase"
#: A matrix product ``MxK:KxN`` with more outputs than this is the vocabulary projection
#: (Whisper's widest other layer has 5,120).
VOCABULARY = 10_000
GEMM = re.compile(r"^(\d+)x(\d+):(\d+)x(\d+)$")


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="audio per job")
    parser.add_argument("--batches", default="2,3,4", help="batch sizes to measure")
    parser.add_argument("--jobs", type=int, default=48, help="jobs per measurement")
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache/meeting-gateway/conversations"
    )
    parser.add_argument(
        "--profile", action="store_true", help="also say where the time went (oneDNN)"
    )
    parser.add_argument("--phases", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.profile:
        given = sys.argv[1:] if argv is None else argv
        print(json.dumps(profile([a for a in given if a != "--profile"]), indent=2))
        return
    sizes = [int(n) for n in args.batches.split(",") if n]
    engine = shared_engine(Settings(asr_threads=1))
    engine.warm_up(0, 16.0, max(sizes, default=1))
    requests = excerpts(args.cache, args.seconds, args.jobs // 2)
    rows = []
    for size in [1, *sizes]:
        if args.phases:
            ctypes.CDLL(None).fflush(None)  # oneDNN's lines so far, before the mark
            print(PHASE, size, flush=True)
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


def profile(argv: list[str]) -> dict[str, object]:
    """Run the measurement with oneDNN's verbose log on; the results and, per batch
    size, where the time went."""
    child = subprocess.run(
        [sys.executable, "-m", "benchmarks.batching", *argv, "--phases"],
        cwd=ROOT,
        env=os.environ | {"ONEDNN_VERBOSE": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    rest: list[str] = []
    ops: dict[int, dict[tuple[str, str], list[float]]] = {}
    size = 0  # the warm-up's operations, before the first mark, are not counted
    for line in child.stdout.splitlines():
        if line.startswith(PHASE):
            size = int(line.split()[1])
            ops[size] = defaultdict(lambda: [0, 0.0])
        elif line.startswith("onednn_verbose"):
            fields = line.split(",")
            if size and "exec" in fields:
                kind = fields[fields.index("exec") + 2]
                op = ops[size][(kind, fields[-2])]
                op[0] += 1
                op[1] += float(fields[-1])
        else:
            rest.append(line)
    result = json.loads("\n".join(rest))
    for row in result["results"]:
        row["where"] = _where(ops[row["batch"]], row["batch"], result["jobs"])
    return result


def _where(ops: dict[tuple[str, str], list[float]], size: int, jobs: int) -> dict[str, object]:
    """Milliseconds per job by role: a decoder step's products (M up to the batch's
    sequences), the vocabulary projection among them, whole-window products, the rest."""
    roles: dict[str, float] = defaultdict(float)
    for (_kind, shape), (_, ms) in ops.items():
        gemm = GEMM.match(shape)
        if not gemm:
            roles["other"] += ms
        elif int(gemm[1]) > size:
            roles["per_window"] += ms
        elif int(gemm[4]) > VOCABULARY:
            roles["per_token_vocabulary"] += ms
        else:
            roles["per_token_layers"] += ms
    top = sorted(ops.items(), key=lambda item: -item[1][1])[:8]
    return {
        **{role: round(ms / jobs, 1) for role, ms in sorted(roles.items())},
        "total": round(sum(roles.values()) / jobs, 1),
        "costliest": [
            {"op": kind, "shape": shape, "calls": round(n / jobs, 1), "ms": round(ms / jobs, 1)}
            for (kind, shape), (n, ms) in top
        ],
    }


if __name__ == "__main__":
    main()
