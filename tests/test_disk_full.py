"""A data volume that fills up mid-meeting: nothing raises, audio waits, and comes back.

A real full filesystem: a 3 MiB tmpfs (so the tests need root to mount it), filled by a
filler file while a real bot streams over a real socket, then freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect

from gateway.storage.files import disk_watch

from .conftest import GatewayFactory, RunningGateway, ended_metadata, read_recording, wait_for
from .timing import scaled

RATE = 16000
FRAME = RATE // 50  # 20 ms frames, as a bot sends


@pytest.fixture
def volume(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs, unmounted afterwards. Request it before ``start_gateway``."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a really full disk) needs root")
    path = tmp_path / "volume"
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(volume: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte."""
    path = volume / "filler"
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1):
            chunk = b"\xff" * size
            with contextlib.suppress(OSError):
                while f.write(chunk):
                    pass
    with pytest.raises(OSError) as refused, open(volume / "probe", "wb", buffering=0) as f:
        f.write(b"x" * 4096)
    assert refused.value.errno == errno.ENOSPC
    (volume / "probe").unlink(missing_ok=True)
    return path


def speech(seconds: float, seed: int) -> np.ndarray:
    """Random audio with no zero sample, so silence in the file means dropped audio."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    magnitude = rng.integers(1, 20000, n, dtype=np.int16)
    sign = np.where(rng.random(n) < 0.5, -1, 1).astype(np.int16)
    return (magnitude * sign).astype(np.int16)


async def send(ws: ClientConnection, samples: np.ndarray) -> None:
    data = samples.astype("<i2").tobytes()
    for i in range(0, len(data), 2 * FRAME):
        await ws.send(data[i : i + 2 * FRAME])


async def readyz(gw: RunningGateway) -> tuple[int, str]:
    return await asyncio.to_thread(_get, gw.http + "/readyz")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=scaled(5)) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(gw: RunningGateway, name: str, **labels: str) -> float:
    value = gw.gateway.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


def wav_bytes(directory: Path) -> int:
    try:
        return (directory / "audio.wav").stat().st_size
    except OSError:
        return 0


async def open_bot(gw: RunningGateway, key: str) -> ClientConnection:
    ws = await connect(gw.url(f"/bots/{key}"))
    await ws.send(json.dumps({"protocol_version": 1, "bot_id": key, "sample_rate": RATE}))
    return ws


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


async def test_recording_waits_for_the_disk_and_loses_nothing(
    volume: Path, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(data_dir=volume / "data")
    directory = volume / "data" / "sessions" / "full"
    watch = disk_watch(gw.gateway.metrics.registry)
    before, during, after = speech(1.0, 1), speech(3.0, 2), speech(1.0, 3)
    ws = await open_bot(gw, "full")
    await send(ws, before)
    await wait_for(lambda: wav_bytes(directory) >= 44 + before.nbytes)
    assert await readyz(gw) == (200, "ready\n")
    meta_before = (directory / "session.json").read_bytes()

    filler = fill(volume)
    await send(ws, during)
    roster = [{"name": "Alice", "id": 1, "isSpeaking": True, "timestamp": 1}]
    await ws.send(json.dumps(roster))
    await wait_for(lambda: sample(gw, "gateway_disk_errors_total", what="recording") > 0)
    status, body = await readyz(gw)
    assert status == 503
    assert "disk full" in body
    session = gw.gateway.sessions.get("full")
    assert session is not None
    # All of it waits in memory (the disk took at most what fit in its last page).
    await wait_for(lambda: session.ring is not None and session.ring.written == 4 * RATE)
    await wait_for(lambda: sample(gw, "gateway_disk_held_audio_bytes") > during.nbytes - 8192)
    # session.json cannot be replaced now: the old one stays whole, no temp file is left.
    await session.metadata_file.flush()
    assert sample(gw, "gateway_disk_errors_total", what="metadata") >= 1
    assert (directory / "session.json").read_bytes() == meta_before
    assert leftovers(directory) == []
    assert gw.gateway.sessions.get("full") is session  # nothing raised into the session

    filler.unlink()
    # No more audio comes: the retry timer writes what waits, and readiness comes back.
    await wait_for(lambda: watch.problem is None)
    assert await readyz(gw) == (200, "ready\n")
    await wait_for(lambda: wav_bytes(directory) == 44 + before.nbytes + during.nbytes)
    assert sample(gw, "gateway_disk_held_audio_bytes") == 0
    await send(ws, after)
    await ws.close()

    meta = await wait_for(lambda: ended_metadata(directory))
    pcm, rate = read_recording(directory)
    assert rate == RATE
    assert pcm == before.tobytes() + during.tobytes() + after.tobytes()
    assert meta["audio_seconds"] == pytest.approx(5.0)
    assert meta["bytes_received"] == 5 * RATE * 2
    lines = (directory / "speakers.jsonl").read_text().splitlines()
    assert [json.loads(line)["speaker"] for line in lines] == ["Alice", "Alice"]
    assert leftovers(directory) == []
    assert sample(gw, "gateway_disk_dropped_audio_seconds_total") == 0
    assert sample(gw, "gateway_pipeline_errors_total", pipeline="recording") == 0
    assert await readyz(gw) == (200, "ready\n")


async def test_past_the_bound_the_oldest_audio_becomes_silence(
    volume: Path, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(data_dir=volume / "data", disk_backlog_seconds=0.5)
    directory = volume / "data" / "sessions" / "bounded"
    watch = disk_watch(gw.gateway.metrics.registry)
    before, during, after = speech(1.0, 4), speech(3.0, 5), speech(1.0, 6)
    ws = await open_bot(gw, "bounded")
    await send(ws, before)
    await wait_for(lambda: wav_bytes(directory) >= 44 + before.nbytes)

    filler = fill(volume)
    await send(ws, during)
    await wait_for(lambda: sample(gw, "gateway_disk_dropped_audio_seconds_total") >= 2.0)
    assert (await readyz(gw))[0] == 503
    # Memory stays within the bound (plus the block being taken).
    assert sample(gw, "gateway_disk_held_audio_bytes") <= RATE  # 0.5 s of s16le

    filler.unlink()
    await wait_for(lambda: watch.problem is None)
    await send(ws, after)
    await ws.close()
    meta = await wait_for(lambda: ended_metadata(directory))

    pcm, _ = read_recording(directory)
    audio = np.frombuffer(pcm, dtype="<i2")
    sent = np.concatenate([before, during, after])
    # Aligned: the file is as long as the session clock, sample for sample.
    assert len(audio) == len(sent) == round(meta["audio_seconds"] * RATE)
    # Silence exactly where audio was dropped: one run, as long as the count says.
    silent = np.flatnonzero(audio == 0)
    dropped = sample(gw, "gateway_disk_dropped_audio_seconds_total")
    assert len(silent) == round(dropped * RATE) > 0
    assert silent[-1] - silent[0] + 1 == len(silent)
    assert len(before) <= silent[0] and silent[-1] < len(before) + len(during)
    kept = audio != 0
    assert np.array_equal(audio[kept], sent[kept])
    assert leftovers(directory) == []


async def test_a_session_that_starts_on_a_full_disk(
    volume: Path, start_gateway: GatewayFactory
) -> None:
    gw = await start_gateway(data_dir=volume / "data")
    (volume / "data" / "sessions").mkdir(parents=True)
    directory = volume / "data" / "sessions" / "late"
    watch = disk_watch(gw.gateway.metrics.registry)
    filler = fill(volume)
    audio = speech(2.0, 7)
    ws = await open_bot(gw, "late")
    await send(ws, audio)
    await wait_for(lambda: sample(gw, "gateway_disk_errors_total", what="metadata") > 0)
    await wait_for(lambda: sample(gw, "gateway_disk_errors_total", what="recording") > 0)
    assert "disk full" in (await readyz(gw))[1]
    assert not (directory / "session.json").exists()
    assert leftovers(directory) == []

    filler.unlink()
    # session.json is retried on its own, the recording by its timer.
    await wait_for(lambda: (directory / "session.json").exists() and watch.problem is None)
    assert await readyz(gw) == (200, "ready\n")
    await ws.close()
    await wait_for(lambda: ended_metadata(directory))
    pcm, _ = read_recording(directory)
    assert pcm == audio.tobytes()
    assert leftovers(directory) == []


def test_a_short_odd_write_never_splits_a_sample(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk takes an odd number of bytes, then nothing; the bound then drops audio."""
    from pipelines import wav

    real = os.pwrite
    budget = [44 + 1001]  # the header and 500.5 samples, then the disk is full

    def pwrite(fd: int, data: bytes | memoryview, offset: int) -> int:
        if budget[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real(fd, memoryview(data)[: budget[0]], offset)
        budget[0] -= n
        return n

    monkeypatch.setattr(wav.os, "pwrite", pwrite)
    path = tmp_path / "audio.wav"
    writer = wav.WavWriter(path, RATE, refresh_samples=RATE, hold_samples=1500)
    sent = speech(1.0, 8)
    for block in np.split(sent, 10):
        writer.write(block)
    writer.silence(RATE // 10)  # a gap while the disk is full costs no memory
    assert writer.failing
    assert writer.held_samples <= 1500
    budget[0] = 1 << 30  # space again
    writer.close()
    pcm, _ = read_recording(tmp_path)
    audio = np.frombuffer(pcm, dtype="<i2")
    assert len(audio) == writer.samples == len(sent) + RATE // 10
    assert not audio[len(sent) :].any()
    head = audio[: len(sent)]
    silent = np.flatnonzero(head == 0)
    assert len(silent) * 2 == writer.dropped > 0
    assert silent[0] >= 500 and silent[-1] - silent[0] + 1 == len(silent)
    kept = head != 0
    assert np.array_equal(head[kept], sent[kept])  # no sample half audio, half silence
