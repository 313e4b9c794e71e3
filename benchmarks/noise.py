"""Background noise for the conversation set: somebody typing, or voices in the room.

Meetings are not held in studios. Somebody types notes while the others talk, and an
open office or a café leaves voices behind the speaker's. Both are sounds a voice
activity detector may take for speech, and then it does not hear the pauses between
turns. :func:`mix` lays one of them under a conversation, at a level given as a
signal-to-noise ratio: the RMS of the conversation's speech (its louder half of 20 ms
frames) over the RMS of the noise, in dB. The same arguments give the same samples.

- ``typing``: keystrokes in bursts of a few words, 4-9 keys a second, each a press and
  a release (a click of 2-6 ms of decaying noise, 60-120 ms apart) at random strengths,
  over a faint hiss. The RMS counts the quiet between clicks: at 20 dB the 10 ms
  around a click is typically 11 dB under the speech, the loudest 2 dB under it.
- ``babble``: six LibriVox readers at once (Debian's ``pocketsphinx-testdata``), each
  looped from its own place: voices too many and too far to follow.

Run ``.venv/bin/python -m benchmarks.noise standup typing 20 --out standup-typing.wav``
to listen to one; with ``--vads`` it also prints where each voice activity model of the
gateway ends speech in it, and its CPU time per second of audio.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
import wave
from pathlib import Path

import numpy as np
import numpy.typing as npt
import soxr

from benchmarks.conversations import DEFAULT_CACHE, LIBRIVOX, Conversation, build, save
from gateway.audio.vad import SpeechEnded, SpeechStarted, VoiceActivity
from gateway.config import VAD_MODELS, Settings

Floats = npt.NDArray[np.float64]

NOISES = ("typing", "babble")
#: Readers talking at once in ``babble``.
VOICES = 6


def typing(n: int, rate: int, rng: np.random.Generator) -> Floats:
    """``n`` samples of keystrokes over a faint hiss."""
    out = rng.standard_normal(n) * 0.01
    t = 0.0
    while True:
        t += rng.uniform(0.3, 2.0)  # a pause between bursts of typing
        for _ in range(int(rng.integers(3, 25))):  # a few words' keys
            for dt in (0.0, rng.uniform(0.06, 0.12)):  # press, release
                at = round((t + dt) * rate)
                length = round(rng.uniform(0.002, 0.006) * rate)
                if at + length >= n:
                    return out
                click = rng.standard_normal(length) * np.exp(-np.arange(length) / (length / 4))
                out[at : at + length] += click * rng.uniform(0.3, 1.0)
            t += 1.0 / rng.uniform(4.0, 9.0)


def babble(n: int, rate: int, rng: np.random.Generator) -> Floats:
    """``n`` samples of :data:`VOICES` LibriVox readers at once."""
    files = sorted(LIBRIVOX.glob("*.wav"))
    if not files:
        raise FileNotFoundError(f"{LIBRIVOX} is missing: install Debian's pocketsphinx-testdata")
    readings = []
    for path in files:
        with wave.open(str(path)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
            readings.append(soxr.resample(pcm.astype(np.float64), w.getframerate(), rate))
    out = np.zeros(n)
    for _ in range(VOICES):
        order = rng.permutation(len(readings))
        voice = np.concatenate([readings[i] for i in order])
        start = int(rng.integers(0, len(voice)))
        out += np.resize(np.roll(voice, -start), n)
    return out


def speech_rms(samples: npt.NDArray[np.int16], rate: int) -> float:
    """RMS of the louder half of ``samples``' 20 ms frames."""
    step = rate // 50
    frames = samples[: len(samples) // step * step].reshape(-1, step).astype(np.float64)
    energy = (frames**2).mean(axis=1)
    return float(np.sqrt(energy[energy >= np.median(energy)].mean()))


def _noise(kind: str, n: int, rate: int, seed: int) -> Floats:
    rng = np.random.default_rng(seed)
    if kind == "typing":
        return typing(n, rate, rng)
    if kind == "babble":
        return babble(n, rate, rng)
    raise ValueError(f"no noise {kind!r}: one of {', '.join(NOISES)}")


def laid_under(
    samples: npt.NDArray[np.int16], rate: int, kind: str, snr: float, seed: int = 5
) -> npt.NDArray[np.int16]:
    """``samples`` with ``kind`` of noise under them, ``snr`` dB below their speech."""
    noise = _noise(kind, len(samples), rate, seed)
    noise *= speech_rms(samples, rate) / np.sqrt((noise**2).mean()) / 10 ** (snr / 20)
    return np.clip(np.round(samples + noise), -32768, 32767).astype(np.int16)


def alone(kind: str, seconds: float, rate: int, rms: float, seed: int = 5) -> npt.NDArray[np.int16]:
    """``seconds`` of ``kind`` of noise with nobody talking, at ``rms`` (peaks clipped)."""
    noise = _noise(kind, round(seconds * rate), rate, seed)
    noise *= rms / np.sqrt((noise**2).mean())
    return np.clip(np.round(noise), -32768, 32767).astype(np.int16)


def mix(conv: Conversation, kind: str, snr: float, seed: int = 5) -> Conversation:
    """``conv`` with ``kind`` of noise under it, ``snr`` dB below its speech."""
    mixed = laid_under(conv.samples, conv.rate, kind, snr, seed)
    return dataclasses.replace(conv, samples=mixed, recipe=f"{conv.recipe}+{kind}{snr:g}")


def parse(text: str) -> tuple[str, float] | None:
    """``typing:20`` as ``("typing", 20.0)``; empty: no noise."""
    if not text:
        return None
    kind, _, snr = text.partition(":")
    if kind not in NOISES or not snr:
        raise ValueError(f"noise is KIND:SNR with KIND one of {', '.join(NOISES)}: {text!r}")
    return kind, float(snr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a conversation recipe")
    parser.add_argument("kind", choices=NOISES)
    parser.add_argument("snr", type=float, help="speech over noise, dB")
    parser.add_argument("--out", type=Path, help="WAV to write (turns go beside it as JSON)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--rate", type=int, default=24000)
    parser.add_argument("--vads", action="store_true", help="run each VAD model over it")
    args = parser.parse_args(argv)
    clean = build(args.name, args.cache, args.rate)
    conv = mix(clean, args.kind, args.snr)
    out = args.out or Path(f"{args.name}-{args.kind}{args.snr:g}.wav")
    save(conv, out)
    result: dict[str, object] = {"wav": str(out), "duration": round(conv.duration, 2)}
    if args.vads:
        result["vads"] = {
            model: {"clean": endpoints(clean, model), "noisy": endpoints(conv, model)}
            for model in VAD_MODELS
        }
    print(json.dumps(result, indent=1))


def endpoints(conv: Conversation, model: str) -> dict[str, object]:
    """Where ``model``, with the gateway's default settings, ends speech in ``conv``
    (fed in 20 ms chunks, as a bot sends), and its CPU time per second of audio."""
    vad = VoiceActivity.configured(conv.rate, Settings(vad=model))  # as the gateway has it
    step = conv.rate // 50
    began = time.process_time()
    events = [
        e for i in range(0, len(conv.samples), step) for e in vad.feed(conv.samples[i : i + step])
    ]
    cpu = time.process_time() - began
    return {
        "ends": [round(e.sample / conv.rate, 2) for e in events if isinstance(e, SpeechEnded)],
        "starts": sum(isinstance(e, SpeechStarted) for e in events),
        "cpu_ms_per_audio_s": round(1000 * cpu / conv.duration, 3),
    }


if __name__ == "__main__":
    main()
