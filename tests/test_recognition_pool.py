"""Recognition as a shared pool: ``meeting-gateway worker`` processes taking a node's jobs
from a real Redis, with the real model, and a worker killed while it holds a job."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect

from pipelines.transcription import jobs
from pipelines.transcription.engine import Hypothesis
from pipelines.transcription.scoring import wer, words
from pipelines.transcription.words import HypWord

from .backoff_bot import BackoffBot
from .cluster import RedisServer
from .conftest import Utterance
from .test_cluster import final_text, is_final, metric
from .test_resume import RATE, Serve, meeting_audio
from .timing import scaled


def test_a_job_and_its_answer_survive_the_wire() -> None:
    audio = (np.sin(np.arange(16000) / 7) * 0.5).astype(np.float32)
    spec = jobs.JobSpec("j1", "node-a", "s-1", "final", audio, 12.5, None, 1.7e9)
    back = jobs.decode_job({k.encode(): v for k, v in jobs.encode_job(spec).items()})
    assert (back.id, back.node, back.session, back.kind) == ("j1", "node-a", "s-1", "final")
    assert (back.offset, back.language, back.submitted) == (12.5, None, 1.7e9)
    assert np.abs(back.audio - audio).max() <= 1 / 32768  # 16-bit on the wire
    said = (HypWord("cold", 12.5, 12.9, 0.93), HypWord("-hearted", 12.9, 13.2, 0.8, "", True))
    h = Hypothesis(said, ("no_speech",), 1.0, 0.05, "de", 0.8)
    assert jobs.decode_result(jobs.encode_result("j1", h, "w")) == ("j1", h)
    assert jobs.decode_result(jobs.encode_result("j2", None, "w")) == ("j2", None)
    # A worker of an earlier release does not say which words are attached: none is.
    earlier = jobs.encode_result("j3", h, "w")
    body = json.loads(earlier["result"])
    assert {len(w) for w in body["words"]} == {4}  # as a gateway of an earlier release reads
    del body["attached"]
    earlier["result"] = json.dumps(body)
    _, back_h = jobs.decode_result(earlier)
    assert back_h is not None and [w.attached for w in back_h.words] == [False, False]


class Worker:
    """``python -m gateway worker`` in a subprocess; its log is kept."""

    def __init__(self, proc: asyncio.subprocess.Process, log: list[str]) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, redis: RedisServer, name: str) -> Worker:
        env = {**os.environ, "GATEWAY_REDIS_URL": redis.url, "GATEWAY_NODE_ID": name}
        env["GATEWAY_ASR_THREADS"] = "1"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway", "worker", env=env, stderr=asyncio.subprocess.PIPE
        )
        assert proc.stderr is not None
        log: list[str] = []
        while True:
            line = (await asyncio.wait_for(proc.stderr.readline(), scaled(60))).decode()
            assert line, "worker exited before taking jobs:\n" + "".join(log)
            log.append(line)
            if "takes jobs" in line:
                worker = cls(proc, log)
                worker._drain = asyncio.create_task(worker._read())
                return worker

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            self.log.append(line.decode())

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), scaled(30))
        await self._drain
        return code


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[tuple[RedisServer, list[Any]]]:
    server = await RedisServer.start(tmp_path / "redis")
    started: list[Any] = []
    yield server, started
    for p in started:
        if p.proc.returncode is None:
            p.proc.kill()
            await p.proc.wait()
    await server.stop()


def test_the_pool_is_as_busy_as_its_workers_lanes_say() -> None:
    assert jobs.pool_busy([{"lanes": 2, "busy": 0.1}]) == pytest.approx(0.1)
    # Shares weigh by lanes: one idle lane and three busy ones are three quarters busy.
    assert jobs.pool_busy([{"lanes": 1, "busy": 0}, {"lanes": 3, "busy": 1}]) == 0.75
    # A worker that does not say (an older one) counts as busy, as does no worker at all.
    assert jobs.pool_busy([{"lanes": 1, "busy": 0.0}, {"lanes": 1}]) == 0.5
    assert jobs.pool_busy([]) == 1.0
    assert jobs.pool_busy([{"lanes": 2, "busy": 7}, {"lanes": 2, "busy": "x"}]) == 1.0


async def pool_node(tmp_path: Path, redis: RedisServer, started: list[Any]) -> Serve:
    node = await Serve.start(
        tmp_path,
        GATEWAY_REDIS_URL=redis.url,
        GATEWAY_WORKERS="1",
        GATEWAY_NODE_ID="node",
        GATEWAY_PIPELINES="recording,transcription",
        GATEWAY_RECOGNITION="pool",
        GATEWAY_LINGER="2",
    )
    started.append(node)
    return node


async def meeting(node: Serve, audio: np.ndarray, during: Any = None) -> list[dict[str, Any]]:
    """A bot streams ``audio`` into session ``pool``; what a subscriber heard."""
    heard: list[dict[str, Any]] = []

    async def subscribe() -> None:
        async with connect(node.url("/bots/pool/transcripts")) as ws:
            heard.extend([json.loads(m) async for m in ws])

    reader = asyncio.create_task(subscribe())
    await asyncio.sleep(0.5)
    bot = BackoffBot(node.url("/bots/pool"), audio, RATE)
    streaming = asyncio.create_task(bot.run())
    if during is not None:
        await during()
    await asyncio.wait_for(streaming, scaled(60))
    await asyncio.wait_for(reader, scaled(90))  # closed when the session ends
    return heard


def said(heard: list[dict[str, Any]]) -> list[str]:
    return words(" ".join(final_text(m) for m in heard if is_final(m)))


@pytest.mark.model
async def test_a_worker_transcribes_a_nodes_meeting(
    tmp_path: Path, librivox: list[Utterance], pool: tuple[RedisServer, list[Any]]
) -> None:
    redis, started = pool
    worker = await Worker.start(redis, "w1")
    started.append(worker)
    node = await pool_node(tmp_path, redis, started)
    audio = meeting_audio(librivox[:3], 60.0)
    reference = words(" ".join(u.text for u in librivox[:3]))
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    busiest = {"worker": 0.0, "node": 0.0}

    async def watch_the_pool() -> None:
        # The worker says how busy its lane was; the node's partials follow the pool's share.
        deadline = time.monotonic() + scaled(40)
        while min(busiest.values()) == 0 and time.monotonic() < deadline:
            beat = json.loads(await client.hget(jobs.WORKERS, "w1") or "{}")
            busiest["worker"] = max(busiest["worker"], float(beat.get("busy", 0.0)))
            gauge = await asyncio.to_thread(metric, node, "gateway_asr_lanes_busy")
            busiest["node"] = max(busiest["node"], gauge)
            await asyncio.sleep(0.25)

    try:
        heard = await meeting(node, audio, during=watch_the_pool)
    finally:
        await client.aclose()
    assert 0 < busiest["worker"] <= 1 and 0 < busiest["node"] <= 1, busiest
    assert wer(reference, said(heard)) <= 0.3, said(heard)
    assert metric(node, "gateway_asr_skipped_total", '{kind="final",reason="overflow"}') == 0
    assert await worker.stop() == 0
    [line] = [x for x in worker.log if "stopped after" in x]
    assert int(line.split("stopped after ")[1].split()[0]) >= len([m for m in heard if is_final(m)])


@pytest.mark.model
async def test_a_job_of_a_worker_killed_mid_job_is_answered_by_another(
    tmp_path: Path, librivox: list[Utterance], pool: tuple[RedisServer, list[Any]]
) -> None:
    redis, started = pool
    doomed = await Worker.start(redis, "doomed")
    started.append(doomed)
    node = await pool_node(tmp_path, redis, started)
    audio = meeting_audio(librivox[:3], 60.0)
    reference = words(" ".join(u.text for u in librivox[:3]))
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    held: list[str] = []

    async def kill_mid_job() -> None:
        # Freeze the worker the moment it holds a job, make sure it still does, kill it.
        deadline = time.monotonic() + scaled(20)
        while not held:
            assert time.monotonic() < deadline, "the worker never held a job"
            for stream in jobs.STREAMS.values():
                pending = await client.xpending_range(stream, jobs.GROUP, "-", "+", 10, "doomed")
                if pending:
                    doomed.proc.send_signal(signal.SIGSTOP)
                    again = await client.xpending_range(stream, jobs.GROUP, "-", "+", 10, "doomed")
                    if again:
                        held.extend(str(p["message_id"]) for p in again)
                        break
                    doomed.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.01)
        doomed.proc.kill()
        started.append(await Worker.start(redis, "rescuer"))

    try:
        heard = await meeting(node, audio, during=kill_mid_job)
        rescuer = started[-1]
        assert any("took over job" in line for line in rescuer.log), rescuer.log
        for stream in jobs.STREAMS.values():  # nothing left pending anywhere
            assert await client.xpending_range(stream, jobs.GROUP, "-", "+", 10) == []
    finally:
        await client.aclose()
    assert held
    # No final lost: the meeting's words all came, in order.
    assert wer(reference, said(heard)) <= 0.3, said(heard)
