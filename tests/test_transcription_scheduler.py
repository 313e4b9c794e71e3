"""The recognition scheduler's lanes, with plain functions in place of the model."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from pipelines.transcription.metrics import TranscriptionMetrics
from pipelines.transcription.scheduler import FINAL, PARTIAL, Scheduler

from .timing import scaled

linux = pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are Linux's")


async def test_partials_never_take_the_finals_lane() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=2)
    await scheduler.start()
    ran: list[tuple[str, int]] = []

    def job(kind: str, seconds: float) -> Callable[[int], int]:
        def fn(lane: int) -> int:
            time.sleep(seconds)
            ran.append((kind, lane))
            return lane

        return fn

    try:
        # Eight sessions' partials at once: lane 0 stays free for the final after them.
        partials = [scheduler.submit(f"p{i}", PARTIAL, job(PARTIAL, 0.05)) for i in range(8)]
        final = scheduler.submit("f", FINAL, job(FINAL, 0.0))
        assert await asyncio.wait_for(final, scaled(5)) == 0
        # The final did not queue behind them: most partials are still to run.
        assert sum(p.done() for p in partials) < len(partials) // 2
        await asyncio.wait_for(asyncio.gather(*partials), scaled(5))
    finally:
        await scheduler.stop()
    assert ("final", 0) in ran
    assert {lane for kind, lane in ran if kind == PARTIAL} == {1}


async def test_finals_lane_takes_first_text_partials() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=2)
    await scheduler.start()
    gate = threading.Event()
    try:
        # Lane 1 is held by a long partial; a first-text partial still runs, on lane 0.
        held = scheduler.submit("a", PARTIAL, lambda lane: gate.wait(scaled(5)) and lane)
        await asyncio.sleep(scaled(0.05))  # for the held partial to take lane 1
        first = scheduler.submit("b", PARTIAL, lambda lane: lane, urgent=True)
        assert await asyncio.wait_for(first, scaled(5)) == 0
        gate.set()
        assert await asyncio.wait_for(held, scaled(5)) == 1
    finally:
        gate.set()
        await scheduler.stop()


async def test_one_lane_runs_everything() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=1)
    await scheduler.start()
    try:
        lanes = await asyncio.gather(
            scheduler.submit("a", PARTIAL, lambda lane: lane),
            scheduler.submit("b", FINAL, lambda lane: lane),
        )
    finally:
        await scheduler.stop()
    assert lanes == [0, 0]


@linux
async def test_lanes_run_below_the_event_loop() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=2)
    await scheduler.start()

    def where(lane: int) -> tuple[int, int, int]:
        return lane, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    try:
        final = await scheduler.submit("a", FINAL, where)
        partial = await scheduler.submit("b", PARTIAL, where)
    finally:
        await scheduler.stop()
    assert final == (0, os.SCHED_OTHER, 19)  # the finals lane: lowest normal priority
    assert partial is not None and partial[:2] == (1, os.SCHED_IDLE)  # below even that
    # The loop's own thread keeps its priority.
    assert threading.current_thread() is threading.main_thread()
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
    assert os.getpriority(os.PRIO_PROCESS, 0) == 0
