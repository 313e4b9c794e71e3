"""Recognition lanes: how many, and the threads they run in.

A lane is one copy of the model on one inference thread (:mod:`.engine`). Lanes run
below the event loop's CPU priority, so ingest never waits for inference.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from gateway.config import Settings

T = TypeVar("T")


def asr_threads(settings: Settings) -> int:
    """Recognition lanes: as configured, else one per core."""
    if settings.asr_threads > 0:
        return settings.asr_threads
    return max(1, os.cpu_count() or 1)


def lane_priority(lane: int, lanes: int) -> None:
    """Lower the calling thread's CPU priority for recognition ``lane`` (Linux).

    Recognition never competes with the event loop: every lane runs below normal
    priority, so ingest and the loop take a core the moment they have work and
    inference uses whatever is left, on every core. With several lanes, lane 0 (the
    finals lane) runs at nice 19 and the others at ``SCHED_IDLE``, below it: a partial
    never slows a final down. Threads inherit this from the thread that starts them.
    Elsewhere, or where it is refused, nothing changes.
    """
    with contextlib.suppress(AttributeError, OSError):
        if lane == 0 and lanes > 1:
            os.setpriority(os.PRIO_PROCESS, 0, 19)  # on Linux: this thread only
        else:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def single_threaded_blas() -> None:
    """Keep numpy's BLAS (OpenBLAS) in the calling thread, for the whole process.

    OpenBLAS hands each matrix product to helper threads that run at normal priority
    and spin between calls; the products here (one mel filterbank per recognition) are
    far too small to gain from them, and under load the helper took half a core from
    the event loop and the recognition lanes.
    """
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")


def in_lane_thread(lane: int, lanes: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn`` in a fresh thread at ``lane``'s priority and wait for it.

    CTranslate2 starts its inference threads while a model loads, and they inherit
    their creator's priority: loading there lowers exactly those threads, never the
    thread that asked.
    """
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        lane_priority(lane, lanes)
        try:
            outcome.append((True, fn(*args, **kwargs)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name=f"asr-load-{lane}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]
