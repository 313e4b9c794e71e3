"""Blocking work off the event loop, in one place.

Everything that can block for more than a moment (fsync, replacing a metadata file,
repairing a WAV, decoding and resampling a file to play, reading a transcript back,
loading certificates) goes through :func:`blocking`, never straight onto the loop: one
session's disk stall must not stall the ingest of every other meeting. The work runs on
a small pool of its own, so a burst of it (every session ending at once) queues there
and neither starves nor is starved by the recognition lanes or the voice.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

#: Threads for blocking file and setup work, per process.
WORKERS = 4

_pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="gateway-blocking")


async def blocking(fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Run ``fn(*args, **kwargs)`` on the blocking pool and wait for its result."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_pool, call)
