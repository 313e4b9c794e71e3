"""What the transcription pipeline produces, independent of any output format.

Times are seconds on the session audio clock (since the session's first audio sample,
gaps included). The engine and streaming policy produce these; the outputs
(:mod:`pipelines.transcription.outputs`) turn them into Deepgram-style live messages,
``transcript.jsonl``, the Meeting BaaS ``transcript.json`` and webhook bodies.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.ingest.speakers import Speaker


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    """Normalised: lower case, no surrounding punctuation."""
    punctuated: str
    """As the model wrote it, with case and punctuation."""
    start: float
    end: float
    confidence: float
    speaker: Speaker | None
    language: str = "en"


@dataclass(frozen=True, slots=True)
class Result:
    """A partial (``is_final=False``) or final hypothesis for ``[start, end)``.

    Finals never overlap and never change once sent. ``speech_final`` marks the final
    that closes an utterance (the speaker paused), as in Deepgram.
    """

    start: float
    end: float
    words: tuple[Word, ...]
    is_final: bool
    speech_final: bool
    language: str = "en"

    @classmethod
    def of(cls, words: tuple[Word, ...], *, is_final: bool, speech_final: bool) -> Result:
        """The result of ``words`` (at least one), over their span, in the first's language."""
        first, last = words[0], words[-1]
        return cls(first.start, last.end, words, is_final, speech_final, first.language)

    @property
    def transcript(self) -> str:
        return " ".join(w.punctuated for w in self.words)

    @property
    def confidence(self) -> float:
        if not self.words:
            return 0.0
        return sum(w.confidence for w in self.words) / len(self.words)

    @property
    def speaker(self) -> Speaker | None:
        """The speaker of most of the words (a final is split where the speaker changes)."""
        counts: dict[str, tuple[int, Speaker]] = {}
        for w in self.words:
            if w.speaker is not None:
                n, _ = counts.get(w.speaker.key, (0, w.speaker))
                counts[w.speaker.key] = (n + 1, w.speaker)
        if not counts:
            return None
        return max(counts.values(), key=lambda c: c[0])[1]


@dataclass(frozen=True, slots=True)
class SpeechStarted:
    """Speech began at ``timestamp`` (seconds)."""

    timestamp: float


@dataclass(frozen=True, slots=True)
class UtteranceEnd:
    """The utterance whose last word ended at ``last_word_end`` is over."""

    last_word_end: float


TranscriptEvent = Result | SpeechStarted | UtteranceEnd


def by_speaker(words: tuple[Word, ...]) -> list[tuple[Word, ...]]:
    """Split a final where the speaker, or the language, changes."""
    groups: list[list[Word]] = []
    for w in words:
        if groups and _voice(groups[-1][-1]) == _voice(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    return [tuple(g) for g in groups]


def _voice(w: Word) -> tuple[str | None, str]:
    return (w.speaker.key if w.speaker is not None else None, w.language)
