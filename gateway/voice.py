"""Moved to :mod:`gateway.speech.voice`; this name stays for code written against it."""

from .speech.voice import (
    AHEAD,
    SENTENCE_PAUSE,
    SYNTHESIS_NICE,
    SYNTHESIS_SLOTS,
    Samples,
    ThreadSource,
    decode_wav,
    load_voice,
    preload,
    resample,
    synthesize,
    tts,
)

__all__ = [
    "AHEAD",
    "SENTENCE_PAUSE",
    "SYNTHESIS_NICE",
    "SYNTHESIS_SLOTS",
    "Samples",
    "ThreadSource",
    "decode_wav",
    "load_voice",
    "preload",
    "resample",
    "synthesize",
    "tts",
]
