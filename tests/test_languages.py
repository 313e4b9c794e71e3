"""Every language Whisper knows: Spanish and German speech (espeak-ng voices) through a
gateway running the multilingual base model, a language given or detected per session,
and an English-only model refusing other languages instead of hearing English."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import connect

from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.simulator import SimulatedBot, read_wav
from pipelines.transcription.language import LanguageChoice
from pipelines.transcription.scoring import wer, words

from .conftest import GatewayFactory, session_dir, wait_for
from .timing import scaled

RATE = 16000
SPEECH = {
    "es": (
        "es",
        "Buenos días a todos. Hoy vamos a hablar del presupuesto del próximo año. "
        "Creo que tenemos que reducir los gastos de viaje.",
    ),
    "de": (
        "de",
        "Guten Morgen zusammen. Heute sprechen wir über den Plan für das nächste Jahr. "
        "Ich denke, wir sollten mehr Zeit für die Tests einplanen.",
    ),
}


def synthesize(voice: str, text: str, directory: Path) -> np.ndarray:
    """``text`` spoken by espeak-ng's ``voice``, at 16 kHz, with a pause after it."""
    path = directory / f"{voice}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", "150", "-w", str(path), text], check=True)
    audio, _ = read_wav(path, RATE)
    return np.concatenate([audio, np.zeros(2 * RATE, dtype=np.int16)])


async def transcribe(
    start_gateway: GatewayFactory, audio: np.ndarray, key: str, language: str
) -> list[dict[str, Any]]:
    """Stream ``audio`` as a bot with ``?language=``; returns the finals a subscriber saw."""
    running = await start_gateway(pipelines="transcription", model="base")
    bot = SimulatedBot(
        url=running.url(f"/bots/{key}?language={language}"), samples=audio, rate=RATE, speed=1.0
    )
    finals: list[dict[str, Any]] = []
    async with connect(running.url(f"/bots/{key}/transcripts")) as sub:
        await bot.run()
        with contextlib.suppress(Exception):
            while True:
                message = json.loads(await asyncio.wait_for(sub.recv(), scaled(60)))
                if message["type"] == "Results" and message["is_final"]:
                    finals.append(message)
    directory = session_dir(running.data_dir, key)
    # The subscriber's socket closes as the pipeline stops, before the session writes its
    # last session.json: read that one, not a periodic one from before the last finals.
    meta = directory / "session.json"
    ended = await wait_for(
        lambda: meta.exists() and (m := json.loads(meta.read_text()))["ended_at"] and m
    )
    annotations = ended["annotations"]
    transcript = json.loads((directory / "transcript.json").read_text())
    assert {s["language"] for s in transcript["transcript"]} == {
        w["language"] for m in finals for w in m["channel"]["alternatives"][0]["words"]
    }
    for m in finals:
        m["annotated_language"] = annotations["language"]
    return finals


def heard(finals: list[dict[str, Any]]) -> list[str]:
    return [w["word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]


@pytest.mark.model
@pytest.mark.parametrize(("language", "asked"), [("es", "es"), ("de", "auto")])
async def test_spanish_and_german_are_transcribed_in_their_language(
    start_gateway: GatewayFactory, tmp_path: Path, language: str, asked: str
) -> None:
    voice, text = SPEECH[language]
    audio = await asyncio.to_thread(synthesize, voice, text, tmp_path)
    finals = await transcribe(start_gateway, audio, f"lang-{language}", asked)
    error = wer(words(text), words(" ".join(heard(finals))))
    print(f"{language} (asked {asked}): WER {error:.3f}")
    assert error <= 0.35, (error, heard(finals))
    assert {lang for m in finals for lang in m["channel"]["alternatives"][0]["languages"]} == {
        language
    }
    assert {w["language"] for m in finals for w in m["channel"]["alternatives"][0]["words"]} == {
        language
    }
    # /sessions and session.json show the language heard.
    assert {m["annotated_language"] for m in finals} == {language}


@pytest.mark.model
async def test_an_english_only_model_refuses_another_language(
    start_gateway: GatewayFactory, tmp_path: Path
) -> None:
    running = await start_gateway(pipelines="transcription")  # tiny.en
    audio = await asyncio.to_thread(synthesize, "es", SPEECH["es"][1], tmp_path)
    bot = SimulatedBot(url=running.url("/bots/es-en?language=es"), samples=audio[:RATE], rate=RATE)
    playing = asyncio.create_task(bot.run())
    session = await wait_for(lambda: running.gateway.sessions.get("es-en"))
    # Not silent English: the session's transcription stops with the reason logged.
    await wait_for(lambda: session.runners and session.runners[0].failed)
    await playing


def test_an_english_only_model_with_another_language_is_a_start_up_error() -> None:
    with pytest.raises(ConfigError, match="knows only English"):
        Settings(language="es").validate()
    with pytest.raises(ConfigError, match="ISO 639-1"):
        Settings(language="spanish", model="base").validate()
    Settings(language="auto", model="base").validate()


def test_auto_settles_on_two_agreeing_detections_not_on_a_guess() -> None:
    # Detections seen on growing prefixes of espeak-ng German (base model, compact window).
    choice = LanguageChoice("auto")
    seen = [("en", 0.60, 0.5), ("th", 0.12, 2.0), ("en", 0.72, 2.5), ("de", 0.53, 3.0)]
    for language, probability, seconds in seen:
        choice.heard(language, probability, seconds)
        assert choice.for_request() is None, (language, seconds)
    assert choice.current == "de"
    choice.heard("de", 0.64, 3.5)
    assert choice.for_request() is None  # one sure detection is not yet a language
    choice.heard("de", 0.74, 4.0)
    assert choice.for_request() == "de"
    # A new speaker is detected anew; one already heard is not.
    choice.speaker("anna")
    assert choice.for_request() is None
    choice.heard("es", 0.9, 3.0)
    choice.heard("en", 0.9, 3.0)  # disagreement starts the count again
    choice.heard("es", 0.9, 3.0)
    assert choice.for_request() is None
    choice.heard("es", 0.95, 4.0)
    assert choice.for_request() == "es"
    choice.speaker("anna")
    assert choice.for_request() == "es"
    # A language given is never detected.
    given = LanguageChoice("de")
    given.heard("en", 0.99, 10.0)
    assert given.for_request() == "de"
