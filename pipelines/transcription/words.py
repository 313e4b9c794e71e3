"""Recognized words, the rate the recognizer hears at, and how words are written for a
reader: plain data and pure functions, no model.

The sans-I/O streaming policy and the audio window use these without importing the
engine (and with it faster-whisper); :mod:`pipelines.transcription.engine` re-exports
them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
    attached: bool = False
    """Written onto the word before it without a space: Whisper writes "cold-hearted" as
    "cold" and "-hearted", "3.5" as "3" and ".5"."""

    @property
    def norm(self) -> str:
        return normalize(self.text)


def attaches(raw: str) -> bool:
    """Whether a word as the decoder wrote it (with its leading space, if any) goes onto
    the word before it: it starts with a mark rather than a space or a letter. Words of
    scripts written without spaces start with a letter and stay words of their own."""
    return bool(raw) and not raw[0].isspace() and not raw[0].isalnum()


def as_written(words: Sequence[HypWord], after: str = "") -> list[HypWord]:
    """``words`` as a reader sees them, following the word ``after`` (the last final one).

    Each attached word is joined to the one before it ("cold-hearted", "2:30", "50%"),
    from the first's start to the last's end, as sure as the less sure of the two. A word
    that starts a sentence starts with a capital letter: a decode that starts after a
    sentence end, in a turn, writes "the opening is..." after a final "I agree." (and
    see :func:`_cased`).
    """
    out: list[HypWord] = []
    for w in words:
        if w.attached and not out and w.text.startswith("-"):
            # What it goes onto was final already ("so", where an earlier hypothesis did
            # not hear "so-called"): "called" reads better than "-called".
            w = replace(w, text=w.text.lstrip("-") or w.text, attached=False)
        if w.attached and out:
            last = out[-1]
            out[-1] = replace(
                last,
                text=last.text + w.text,
                end=w.end,
                probability=min(last.probability, w.probability),
            )
            continue
        out.append(_cased(w, out[-1].text if out else after))
    return out


#: English words that are no names ("will" is left out: "Thanks, Will"), and that Whisper
#: writes capitalized where one of its segments starts, even after a comma: "Morning
#: everyone, Let's keep this short".
COMMON = frozenset(
    "a an and are as at be but by can could did do does don't for "  # noqa: SIM905
    "from had has have he her his how if in is it it's its let's my of on or our she so "
    "that the their then there they this to was we were what when where which who why "
    "with would you your".split()
)


def _cased(w: HypWord, before: str) -> HypWord:
    """``w`` with a capital if it starts a sentence, without one for a common English
    word after a comma."""
    text = w.text
    if ends_sentence(before) and text[:1].islower():
        return replace(w, text=text[0].upper() + text[1:])
    common = w.language in ("", "en") and w.norm in COMMON and text[:1].isupper()
    if common and before.endswith(",") and text[1:] == text[1:].lower():
        return replace(w, text=text[0].lower() + text[1:])
    return w


#: Words ending with a period that end no sentence: "Mr. John Dashwood" is one phrase.
TITLES = frozenset({"mr.", "mrs.", "ms.", "dr.", "prof.", "st.", "mt.", "jr.", "sr.", "vs."})


def ends_sentence(text: str) -> bool:
    """Whether a word ends a sentence: not "..." (trailing off), nor "a.m.", "e.g." or
    "Mr."."""
    if text.lower() in TITLES or re.fullmatch(r"(?:[^\W\d_]\.){2,}", text):
        return False
    return text.endswith((".", "?", "!")) and not text.endswith("..")


def normalize(text: str) -> str:
    return text.strip().strip(_PUNCTUATION).lower()
