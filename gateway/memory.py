"""Giving freed memory back to the system after sessions end.

A session allocates a few megabytes beside its ring (resampler and VAD state, decoded
frames, transcription windows, JSON) in many blocks of all sizes. Two things kept that
memory after the session ended, so that a long-running gateway grew with every meeting
it ever served (measured: 156 to 959 MiB over 2,000 one-second sessions):

* A session sits in reference cycles (callbacks, tasks, its pipelines' context), so it
  is freed only by the cyclic garbage collector, whose full collections come rarely: 200
  ended sessions held about 40 MiB until one ran.
* glibc's allocator keeps freed blocks in its heaps and arenas for reuse.
  ``malloc_trim(0)`` returns the free pages of every arena to the system.

:class:`Trimmer` does both, at most once per ``interval`` seconds and only after a
session ended: a collection on the loop (about 0.3 ms per ended session, measured; the
objects alive at start-up are frozen out of it by :func:`after_startup`) and the trim
in a thread. On a C library without ``malloc_trim`` (musl, macOS) only the collection
runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import time
from collections.abc import Callable

from .storage.offload import blocking

logger = logging.getLogger("gateway.memory")


def _load_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


_malloc_trim = _load_trim()


def trim() -> bool:
    """Return free heap memory to the system now; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


#: Seconds from a session's end to the collection and trim that cover it. A full
#: collection also walks every live session's objects (tens of ms with hundreds live),
#: so it runs at most this often however fast sessions end.
INTERVAL = 10.0


def after_startup() -> None:
    """Start-up is done (models loaded, lanes warm): collect, freeze what is alive now
    out of later collections, and give back what start-up freed. Blocks briefly."""
    gc.collect()
    gc.freeze()
    trim()


class Trimmer:
    """Trims once the sessions that ended in the last ``interval`` seconds are gone."""

    def __init__(self, interval: float = INTERVAL) -> None:
        self.interval = interval
        self.runs = 0
        self._task: asyncio.Task[None] | None = None

    def session_ended(self) -> None:
        if self._task is not None and not self._task.done():
            return  # one is already due: it will cover this session too
        self._task = asyncio.get_running_loop().create_task(self._later(), name="memory-trim")

    async def _later(self) -> None:
        await asyncio.sleep(self.interval)
        began = time.perf_counter()
        found = gc.collect()
        logger.debug("collected %d objects in %.1f ms", found, 1e3 * (time.perf_counter() - began))
        if _malloc_trim is not None:
            await blocking(trim)
        self.runs += 1

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
