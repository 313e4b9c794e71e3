"""Shared fixtures: real speech, and real gateways on 127.0.0.1 port 0."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import Settings
from gateway.server import Gateway

from .timing import scaled

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


@dataclass(frozen=True)
class Utterance:
    path: Path
    text: str


def _librivox() -> list[Utterance]:
    lines = (LIBRIVOX / "transcription").read_text().splitlines()
    found = []
    for line in lines:
        m = re.match(r"<s>\s*(.*?)\s*</s>\s*\((.+)\)", line)
        if m:
            found.append(Utterance(LIBRIVOX / f"{m.group(2)}.wav", m.group(1)))
    return found


@pytest.fixture(scope="session")
def librivox() -> list[Utterance]:
    """The LibriVox test utterances (16 kHz WAV) with their exact transcripts."""
    if not (LIBRIVOX / "transcription").exists():
        pytest.fail(f"{LIBRIVOX} is missing: install Debian's pocketsphinx-testdata")
    return _librivox()


@dataclass
class RunningGateway:
    gateway: Gateway
    port: int
    data_dir: Path

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


@pytest.fixture
async def start_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start real gateways with settings overrides; all are stopped after the test."""
    started: list[Gateway] = []

    async def start(factories: dict[str, Any] | None = None, **overrides: Any) -> RunningGateway:
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": 0,
            "data_dir": tmp_path / "data",
            "pipelines": "recording",
            "linger": 0.5,
        }
        values.update(overrides)
        gateway = Gateway(Settings(**values).validate(), CollectorRegistry())
        for name, factory in (factories or {}).items():
            gateway.factories[name] = factory(gateway.env)
        _, port = await gateway.start()
        started.append(gateway)
        return RunningGateway(gateway, port, values["data_dir"])

    yield start
    for gateway in started:
        await gateway.stop()


async def wait_for(condition: Callable[[], Any], within: float = 10.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail after ``within`` s,
    scaled by GATEWAY_TESTS_TIMEOUT_FACTOR (:mod:`tests.timing`)."""
    limit = scaled(within)
    try:
        async with asyncio.timeout(limit):
            while not (value := condition()):  # noqa: ASYNC110 - files and sockets, no event
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"condition not met within {limit} s")
    return value


def session_dir(data_dir: Path, key: str) -> Path:
    return data_dir / "sessions" / key


def refusals(running: RunningGateway, reason: str) -> float | None:
    """``gateway_connections_refused_total{reason}`` of a running gateway."""
    registry = running.gateway.metrics.registry
    value: float | None = registry.get_sample_value(
        "gateway_connections_refused_total", {"reason": reason}
    )
    return value


def ended_metadata(directory: Path) -> dict[str, Any] | None:
    """``session.json`` once the session has been finalized, else None."""
    path = directory / "session.json"
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("ended_at") else None


def read_recording(directory: Path) -> tuple[bytes, int]:
    with wave.open(str(directory / "audio.wav"), "rb") as w:
        return w.readframes(w.getnframes()), w.getframerate()


@pytest.fixture(scope="session")
def whisper_model() -> Any:
    """The default model (tiny.en), loaded once for the whole test run.

    Gateways started with default model settings share this instance (the engine keeps
    one loaded model per process), so tests pay the load once.
    """
    from pipelines.transcription.engine import shared_engine

    return shared_engine(Settings())


async def refused_with(url: str, **kwargs: Any) -> tuple[int, dict[str, str]]:
    """Open a WebSocket to ``url`` expecting an HTTP refusal before the upgrade; returns
    the status and the response headers (lower-cased names)."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as info:
        async with connect(url, **kwargs):
            pass
    response = info.value.response
    return response.status_code, {k.lower(): v for k, v in response.headers.raw_items()}


@pytest.fixture
async def serves() -> AsyncIterator[list[Any]]:
    """Gateway processes a test starts (``test_resume.Serve``): killed if still running."""
    started: list[Any] = []
    yield started
    for s in started:
        if s.proc.returncode is None:
            await s.stop(signal.SIGKILL)
        # Captured by pytest and shown only when the test failed.
        print(f"--- gateway on port {s.port} (exit {s.proc.returncode}) ---\n{s.stderr}")
