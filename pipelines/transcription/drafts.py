"""What the streaming policy (:mod:`.policy`) hands out: requests for recognition, and
drafts of results, before speaker attribution."""

from __future__ import annotations

from dataclasses import dataclass

from .words import HypWord


@dataclass(frozen=True, slots=True)
class Request:
    """Recognize session audio ``[start, end)`` seconds."""

    id: int
    kind: str
    """``"partial"`` or ``"final"``."""
    utterance: int
    segment: int
    start: float
    end: float
    confirmed: tuple[HypWord, ...]
    """Words already confirmed in this segment: a final keeps them as they are."""
    released: int
    """How many of ``confirmed`` are already final (a final carries the rest)."""
    speech_final: bool
    speech_start: float
    speech_end: float | None
    """The VAD's end of speech, for finals that close an utterance."""
    first: bool
    """No partial of this segment has shown words yet."""


@dataclass(frozen=True, slots=True)
class Draft:
    """A result before speaker attribution."""

    words: tuple[HypWord, ...]
    is_final: bool
    speech_final: bool
    request: Request | None
