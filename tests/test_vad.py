"""Voice activity on real speech, at every rate the bot streams."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.noise import laid_under
from gateway.audio.resample import Resampler
from gateway.audio.vad import SpeechEnded, SpeechPaused, SpeechStarted, VoiceActivity
from gateway.config import VAD_MODELS
from gateway.simulator import read_wav
from pipelines.transcription.turns import QUIET

from .conftest import Utterance
from .sounds import voiced_part


def run(vad: VoiceActivity, samples: np.ndarray, chunk: int) -> list[object]:
    events: list[object] = []
    for i in range(0, len(samples), chunk):
        events.extend(vad.feed(samples[i : i + chunk]))
    return events


@pytest.mark.parametrize("model", VAD_MODELS)
@pytest.mark.parametrize("rate", [16000, 24000, 32000, 48000])
def test_speech_between_silences(librivox: list[Utterance], rate: int, model: str) -> None:
    speech, _ = read_wav(librivox[1].path, rate)
    silence = np.zeros(rate, dtype=np.int16)
    audio = np.concatenate([silence, speech, silence])
    events = run(VoiceActivity(rate, model=model), audio, rate // 100)
    events += VoiceActivity(rate, model=model).interrupt(len(audio))  # nothing open
    starts = [e for e in events if isinstance(e, SpeechStarted)]
    ends = [e for e in events if isinstance(e, SpeechEnded)]
    assert starts
    assert len(ends) == len(starts)
    # Positions are native-rate samples on the session clock.
    assert rate * 0.9 <= starts[0].sample <= rate * 1.6
    assert ends[-1].sample <= rate + len(speech) + rate // 10
    assert ends[-1].sample >= rate + len(speech) - rate // 2


@pytest.mark.parametrize("model", VAD_MODELS)
def test_a_speech_start_tells_the_silence_heard_before_it(
    librivox: list[Utterance], model: str
) -> None:
    speech, rate = read_wav(librivox[1].path, 24000)
    voice = voiced_part(speech, rate)
    audio = np.concatenate([np.zeros(rate, np.int16), voice, np.zeros(rate, np.int16), voice])
    starts = [
        e for e in run(VoiceActivity(rate, model=model), audio, 240) if type(e) is SpeechStarted
    ]
    assert starts[0].quiet == pytest.approx(starts[0].sample, abs=rate // 50)  # all of it
    assert starts[0].quiet >= 0.9 * rate
    after = next(s for s in starts if s.sample >= rate + len(voice))
    assert 0.8 * rate <= after.quiet <= 1.6 * rate  # the VAD hears the voice end early
    # A stream that starts (or resumes) in the middle of a voice: what the detector takes
    # for quiet is its own start (Silero's first frames), under the 0.3 s of quiet after
    # which the roster lag takes a start for a voice after silence (turns.QUIET).
    vad = VoiceActivity(rate, model=model)
    first = next(e for e in run(vad, voice, 240) if type(e) is SpeechStarted)
    assert first.quiet < QUIET * rate
    vad.interrupt(rate * 30)
    first = next(e for e in run(vad, voice, 240) if type(e) is SpeechStarted)
    assert first.sample >= rate * 30 and first.quiet < QUIET * rate


def test_silence_and_noise_floor_have_no_speech() -> None:
    rate = 24000
    rng = np.random.default_rng(1)
    quiet = (rng.standard_normal(rate * 10) * 30).astype(np.int16)
    vad = VoiceActivity(rate, aggressiveness=3)
    assert run(vad, np.zeros(rate * 10, dtype=np.int16), 240) == []
    assert [e for e in run(vad, quiet, 240) if isinstance(e, SpeechStarted)] == []


@pytest.mark.parametrize("model", VAD_MODELS)
def test_chunking_does_not_change_events(librivox: list[Utterance], model: str) -> None:
    speech, rate = read_wav(librivox[0].path, 24000)
    a = run(VoiceActivity(rate, model=model), speech, 240)
    b = run(VoiceActivity(rate, model=model), speech, 2400)
    c = run(VoiceActivity(rate, model=model), speech, 37)
    assert a and a == b == c


@pytest.mark.parametrize("model", VAD_MODELS)
def test_interrupt_closes_open_speech(librivox: list[Utterance], model: str) -> None:
    speech, rate = read_wav(librivox[0].path, 16000)
    vad = VoiceActivity(rate, model=model)
    events = run(vad, speech[: rate * 2], 160)
    assert vad.speaking
    assert isinstance(events[0], SpeechStarted)
    (end,) = vad.interrupt(rate * 10)
    assert isinstance(end, SpeechEnded)
    assert end.started == events[0].sample
    assert not vad.speaking
    # After the break, positions continue from where the stream resumed.
    after = run(vad, speech, 160)
    assert isinstance(after[0], SpeechStarted)
    assert after[0].sample >= rate * 10


def test_a_pause_is_reported_before_the_end_and_only_once(librivox: list[Utterance]) -> None:
    speech, rate = read_wav(librivox[1].path, 16000)
    quiet = np.zeros(rate, dtype=np.int16)
    alone = run(VoiceActivity(rate), np.concatenate([quiet, speech, quiet]), 160)
    voice = speech[max(0, alone[0].sample - rate) : alone[-1].sample - rate]  # type: ignore[attr-defined]
    gap = np.zeros(rate // 4, dtype=np.int16)  # 250 ms: a pause, not an end
    audio = np.concatenate([quiet, voice, gap, voice, quiet])
    events = run(VoiceActivity(rate, pause_ms=240), audio, 160)
    assert [type(e) for e in events] == [
        SpeechStarted,
        SpeechPaused,  # the gap: speech goes on
        SpeechPaused,  # the end, reported as a pause first
        SpeechEnded,
    ]
    _, gap_pause, end_pause, end = events
    assert isinstance(gap_pause, SpeechPaused) and isinstance(end_pause, SpeechPaused)
    assert isinstance(end, SpeechEnded)
    assert abs(gap_pause.sample - (rate + len(voice))) <= rate * 30 // 1000
    # Told at the voice's end, heard 240 ms (eight 30 ms frames) after it.
    assert end_pause.sample == end.sample
    assert (
        end_pause.heard - end_pause.sample
        == gap_pause.heard - gap_pause.sample
        == rate * 240 // 1000
    )
    # Without pause_ms the same audio gives the same start and end, and no pause.
    assert run(VoiceActivity(rate), audio, 160) == [events[0], events[-1]]


def test_resampler_is_chunking_invariant() -> None:
    x = np.random.default_rng(3).integers(-3000, 3000, 48000, dtype=np.int16)
    whole = Resampler(48000, 16000).process(x, last=True)
    r = Resampler(48000, 16000)
    parts = [r.process(x[i : i + 480]) for i in range(0, len(x), 480)]
    parts.append(r.process(x[:0], last=True))
    streamed = np.concatenate(parts)
    # Same length and the same signal: soxr's int16 output rounding may differ by an LSB or two.
    assert len(streamed) == len(whole)
    assert np.abs(streamed.astype(np.int32) - whole).max() <= 4
    assert abs(len(whole) - 16000) <= 1


def test_silero_hears_the_pauses_between_turns_while_somebody_types(
    librivox: list[Utterance],
) -> None:
    # Five readers answering each other with half-second pauses, and keystrokes over
    # all of it, 20 dB under the voices.
    rate = 24000
    pause = np.zeros(rate // 2, dtype=np.int16)
    parts, voice_ends = [pause], []
    for u in librivox[:5]:
        voice = voiced_part(read_wav(u.path, rate)[0], rate)
        parts += [voice, pause]
        voice_ends.append(sum(map(len, parts)) - len(pause))
    audio = laid_under(np.concatenate(parts), rate, "typing", 20.0)

    events = run(VoiceActivity(rate, model="silero"), audio, 480)
    ends = [e.sample for e in events if isinstance(e, SpeechEnded)]
    # Every pause, and only the pauses, ends speech: at the voice's end or in its last
    # breath (the voiced part keeps whatever is within 35 dB of the loudest), and before
    # the next voice.
    assert len(ends) == len(voice_ends), (ends, voice_ends)
    for heard, said in zip(ends, voice_ends, strict=True):
        assert said - 0.4 * rate <= heard < said + len(pause), (heard / rate, said / rate)
    assert sum(isinstance(e, SpeechStarted) for e in events) == len(voice_ends)
