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
from pipelines.transcription.scheduler import FINAL, PARTIAL, Batchable, Scheduler

from .timing import scaled

linux = pytest.mark.skipif(sys.platform != "linux", reason="thread priorities are Linux's")


async def test_every_lane_runs_partials_and_a_final_goes_next() -> None:
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
        # Eight sessions' partials at once, then a final: it runs on the first lane free.
        partials = [scheduler.submit(f"p{i}", PARTIAL, job(PARTIAL, 0.05)) for i in range(8)]
        await asyncio.sleep(0)  # both lanes take a partial
        final = scheduler.submit("f", FINAL, job(FINAL, 0.0))
        await asyncio.wait_for(final, scaled(5))
        # The final did not queue behind them: most partials are still to run.
        assert sum(p.done() for p in partials) < len(partials) // 2
        await asyncio.wait_for(asyncio.gather(*partials), scaled(5))
    finally:
        await scheduler.stop()
    assert ran.index(("final", 0) if ("final", 0) in ran else ("final", 1)) <= 2
    # In a conversation partials make the finals: both lanes run them.
    assert {lane for kind, lane in ran if kind == PARTIAL} == {0, 1}


async def test_a_first_text_partial_does_not_wait_for_a_long_one() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=2)
    await scheduler.start()
    gate = threading.Event()
    try:
        # A lane is held by a long partial; a first-text partial runs on the other.
        held = scheduler.submit("a", PARTIAL, lambda lane: gate.wait(scaled(5)) and lane)
        await asyncio.sleep(scaled(0.05))  # for the held partial to take a lane
        first = scheduler.submit("b", PARTIAL, lambda lane: lane, urgent=True)
        lane = await asyncio.wait_for(first, scaled(5))
        assert not held.done()
        gate.set()
        assert await asyncio.wait_for(held, scaled(5)) == 1 - lane
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


async def test_the_lanes_report_how_busy_they_were() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=2)
    await scheduler.start()
    try:
        assert scheduler.busy() == 0.0
        gate = threading.Event()
        held = scheduler.submit("a", PARTIAL, lambda lane: gate.wait(scaled(5)))
        await asyncio.sleep(scaled(0.2))
        running = scheduler.busy()  # one lane of two, busy for 0.2 s of the window
        gate.set()
        await asyncio.wait_for(held, scaled(5))
        done = scheduler.busy()
    finally:
        await scheduler.stop()
    assert 0.0 < running <= done < 0.5


async def test_waiting_jobs_of_several_sessions_share_one_call() -> None:
    metrics = TranscriptionMetrics(CollectorRegistry())
    scheduler = Scheduler(metrics, lanes=1, max_batch=2)
    await scheduler.start()
    calls: list[list[str]] = []

    def run(items: list[str], lane: int, ready: object) -> list[str]:
        calls.append(list(items))
        return [f"{item} heard on lane {lane}" for item in items]

    gate = threading.Event()
    try:
        # The only lane is busy; meanwhile four sessions' jobs wait, one not batchable.
        held = scheduler.submit("x", PARTIAL, lambda lane: gate.wait(scaled(5)))
        await asyncio.sleep(scaled(0.05))
        final = scheduler.submit("f", FINAL, Batchable(run, "f"))
        alone = scheduler.submit("a", PARTIAL, lambda lane: "a alone")
        b = scheduler.submit("b", PARTIAL, Batchable(run, "b"))
        c = scheduler.submit("c", PARTIAL, Batchable(run, "c"))
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(held, final, alone, b, c), scaled(5))
    finally:
        gate.set()
        await scheduler.stop()
    # The final goes first and alone; the plain partial runs on its own; the two
    # batchable partials share a call. Each job gets its own result.
    assert calls == [["f"], ["b", "c"]]
    assert results[1:] == ["f heard on lane 0", "a alone", "b heard on lane 0", "c heard on lane 0"]
    assert metrics.batch._sum.get() == 1 + 1 + 1 + 2  # five jobs in four calls


async def test_no_batch_while_a_lane_is_idle() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=2, max_batch=4)
    await scheduler.start()
    calls: list[tuple[int, list[str]]] = []

    def run(items: list[str], lane: int, ready: object) -> list[int]:
        calls.append((lane, list(items)))
        time.sleep(0.05)
        return [lane for _ in items]

    try:
        # Both lanes are free: each takes one job, sooner than one lane taking both.
        lanes = await asyncio.wait_for(
            asyncio.gather(
                scheduler.submit("a", PARTIAL, Batchable(run, "a")),
                scheduler.submit("b", PARTIAL, Batchable(run, "b")),
            ),
            scaled(5),
        )
    finally:
        await scheduler.stop()
    assert sorted(lanes) == [0, 1]
    assert sorted(items for _, items in calls) == [["a"], ["b"]]


async def test_a_job_of_a_batch_does_not_wait_for_the_others() -> None:
    scheduler = Scheduler(TranscriptionMetrics(CollectorRegistry()), lanes=1, max_batch=2)
    await scheduler.start()
    hold, gate = threading.Event(), threading.Event()

    def run(items: list[str], lane: int, ready: Callable[[int, str], None] | None) -> list[str]:
        assert ready is not None
        ready(0, items[0])  # the first is settled; the second needs more work
        gate.wait(scaled(5))
        return list(items)

    try:
        held = scheduler.submit("x", PARTIAL, lambda lane: hold.wait(scaled(5)))
        await asyncio.sleep(scaled(0.05))
        first = scheduler.submit("a", PARTIAL, Batchable(run, "a"))
        second = scheduler.submit("b", PARTIAL, Batchable(run, "b"))
        hold.set()  # the lane is free: "a" and "b" run in one call
        assert await asyncio.wait_for(first, scaled(5)) == "a"
        assert not second.done()  # still in the call
        gate.set()
        assert await asyncio.wait_for(second, scaled(5)) == "b"
        await held
    finally:
        hold.set()
        gate.set()
        await scheduler.stop()
