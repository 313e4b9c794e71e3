"""The gateway owns pipeline concurrency: slow or failing pipelines hurt only themselves."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from gateway.pipeline import Gap, Pipeline, PipelineEvent, PipelineFactory, SessionContext
from gateway.simulator import SimulatedBot, read_wav

from .conftest import (
    GatewayFactory,
    Utterance,
    ended_metadata,
    read_recording,
    session_dir,
    wait_for,
)


class Collecting(Pipeline):
    """Keeps a copy of everything it is given, optionally slowly or until it crashes."""

    audio_block_ms = 100

    def __init__(
        self, delay: float = 0.0, crash_after: int | None = None, event_delay: float = 0.0
    ) -> None:
        self.delay = delay
        self.event_delay = event_delay
        self.crash_after = crash_after
        self.audio_calls: list[tuple[int, np.ndarray]] = []
        self.events: list[PipelineEvent] = []
        self.stopped = False

    async def audio(self, start: int, samples: Any) -> None:
        if self.crash_after is not None and len(self.audio_calls) >= self.crash_after:
            raise RuntimeError("pipeline bug")
        self.audio_calls.append((start, samples.copy()))
        if self.delay:
            await asyncio.sleep(self.delay)

    async def event(self, event: PipelineEvent) -> None:
        self.events.append(event)
        if self.event_delay:
            await asyncio.sleep(self.event_delay)

    async def stop(self) -> None:
        self.stopped = True


def factory(**kwargs: Any) -> tuple[type[PipelineFactory], list[Collecting]]:
    made: list[Collecting] = []

    class Factory(PipelineFactory):
        name = "collect"

        def create(self, ctx: SessionContext) -> Pipeline:
            made.append(Collecting(**kwargs))
            return made[-1]

    return Factory, made


async def stream(gw: Any, key: str, librivox: list[Utterance], speed: float = 10.0) -> bytes:
    samples, rate = read_wav(librivox[3].path, 16000)
    await SimulatedBot(gw.url(f"/bots/{key}"), samples, rate, speed=speed).run()
    directory = session_dir(gw.data_dir, key)
    await wait_for(lambda: ended_metadata(directory), within=30)
    return samples.tobytes()


async def test_slow_and_crashing_pipelines_leave_the_recording_intact(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    slow, slow_made = factory(delay=0.05)
    crash, crash_made = factory(crash_after=3)
    gw = await start_gateway(factories={"slow": slow, "crash": crash})
    sent = await stream(gw, "robust", librivox)
    pcm, _ = read_recording(session_dir(gw.data_dir, "robust"))
    assert pcm == sent
    registry = gw.gateway.metrics.registry
    assert registry.get_sample_value("gateway_pipeline_errors_total", {"pipeline": "crash"}) == 1
    assert registry.get_sample_value("gateway_pipeline_errors_total", {"pipeline": "slow"}) is None
    # The crashed pipeline was stopped alone; the slow one still got every sample, in order.
    assert crash_made[0].stopped
    (slow_pipeline,) = slow_made
    got = np.concatenate([s for _, s in slow_pipeline.audio_calls]).tobytes()
    assert got == sent
    starts = [start for start, _ in slow_pipeline.audio_calls]
    assert starts == sorted(starts)
    meta = ended_metadata(session_dir(gw.data_dir, "robust"))
    assert meta is not None
    assert meta["pipelines"]["crash"]["failed"] is True
    assert meta["pipelines"]["slow"]["failed"] is False


async def test_pipeline_that_falls_a_ring_behind_gets_an_overrun_gap(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    slow, made = factory(delay=0.3)
    gw = await start_gateway(factories={"slow": slow}, ring_seconds=1.0)
    sent = await stream(gw, "overrun", librivox, speed=5.0)
    pcm, _ = read_recording(session_dir(gw.data_dir, "overrun"))
    assert pcm == sent  # the recording keeps up and loses nothing
    (pipeline,) = made
    gaps = [e for e in pipeline.events if isinstance(e, Gap)]
    assert gaps
    assert {g.reason for g in gaps} == {"overrun"}
    # What it did receive plus what it was told it lost covers the whole meeting.
    received = sum(len(s) for _, s in pipeline.audio_calls)
    assert received + sum(g.length for g in gaps) == len(sent) // 2
    registry = gw.gateway.metrics.registry
    assert registry.get_sample_value("gateway_ring_overruns_total", {"pipeline": "slow"}) >= 1


async def test_event_queue_overflow_is_counted(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    slow, _ = factory(event_delay=0.5)
    gw = await start_gateway(factories={"slow": slow}, pipeline_queue=2)
    samples, rate = read_wav(librivox[1].path, 16000)
    roster = [
        {"at": i * 0.05, "roster": [{"name": "A", "id": 1, "isSpeaking": i % 2 == 0}]}
        for i in range(20)
    ]
    await SimulatedBot(gw.url("/bots/q"), samples, rate, speed=4.0, roster=roster).run()
    registry = gw.gateway.metrics.registry
    dropped = await wait_for(
        lambda: registry.get_sample_value(
            "gateway_pipeline_dropped_events_total", {"pipeline": "slow", "kind": "roster"}
        )
    )
    assert dropped >= 1
    assert (
        registry.get_sample_value(
            "gateway_pipeline_dropped_events_total", {"pipeline": "recording", "kind": "roster"}
        )
        is None
    )


async def test_url_chooses_the_session_pipelines(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    collect, made = factory()
    gw = await start_gateway(factories={"collect": collect})
    samples, rate = read_wav(librivox[1].path, 16000)
    url = gw.url("/bots/only?pipelines=collect,nonexistent")
    await SimulatedBot(url, samples, rate, speed=10.0).run()
    directory = session_dir(gw.data_dir, "only")
    meta = await wait_for(lambda: ended_metadata(directory))
    assert list(meta["pipelines"]) == ["collect"]
    assert meta["rejected"] == {"unknown_pipeline": 1}
    assert not (directory / "audio.wav").exists()
    assert len(made) == 1
