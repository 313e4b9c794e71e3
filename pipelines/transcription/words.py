"""Recognized words and the rate the recognizer hears at: plain data, no model.

The sans-I/O streaming policy and the audio window use these without importing the
engine (and with it faster-whisper); :mod:`pipelines.transcription.engine` re-exports
them.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The recognizer's sample rate: windows hold, and jobs cut, audio at this rate.
ASR_RATE = 16000
_PUNCTUATION = "\"'\u201c\u201d\u2018\u2019\u00bf\u00a1([{-.,!?;:)]}\u2026"


@dataclass(frozen=True, slots=True)
class HypWord:
    """A recognized word; times are seconds on the session clock."""

    text: str
    """As written by the model (case, punctuation), without surrounding spaces."""
    start: float
    end: float
    probability: float
    language: str = ""
    """The language it was decoded in ("" when not known)."""

    @property
    def norm(self) -> str:
        return normalize(self.text)


def normalize(text: str) -> str:
    return text.strip().strip(_PUNCTUATION).lower()
