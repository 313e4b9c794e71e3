"""A compact decode's failures answered (:mod:`.verdicts` tells them): decoded again in
wider windows, continued where it stopped short, its head decoded where it started late,
and decoded without the meeting's terms where they left Whisper writing nothing.

The engine hands over one lane's ``decode(audio, offset, prompt, margin, language)``
(:meth:`~.engine.Engine._decode` on that lane's model); nothing here holds a model or a
lock. Blocking, in the lane's thread.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .compact import retries
from .verdicts import (
    CONTINUATIONS,
    CONTINUE_BACK,
    CONTINUE_BACKS,
    LATE_VOICE,
    RETRY,
    SHORT_VOICE,
    STUCK_VOICE,
    started_late,
    stopped_short,
    voiced,
)
from .words import ASR_RATE, HypWord

Audio = npt.NDArray[np.float32]
Decoded = tuple[list[HypWord], list[str], Any]
Decode = Callable[[Audio, float, str | None, int | None, str | None], Decoded]


def settle(
    decode: Decode,
    audio: Audio,
    offset: float,
    prompt: str | None,
    language: str | None,
    whole: bool,
    decoded: Decoded,
    margin: int,
) -> Decoded:
    """``decoded`` (the first decode of ``audio``) with its failures answered.

    ``whole`` (a final: words not heard now are lost) looks for them after
    :data:`~.verdicts.SHORT_VOICE` and :data:`~.verdicts.LATE_VOICE` s of voice, a
    partial after :data:`~.verdicts.STUCK_VOICE` s. ``margin`` is the compact window's
    (:func:`~.compact.margin_for`), for the decodes that go back over the audio.
    """
    words, rejected, info = decoded
    voice = SHORT_VOICE if whole else STUCK_VOICE
    frames = voiced(audio)
    # The compact window occasionally loops, or rejects the first segment and with
    # it the rest, where a wider one, or the standard one, does not.
    for wider in retries(len(audio), ASR_RATE):
        looped = RETRY.intersection(rejected)
        if not looped and (words or not stopped_short(frames, offset, words, voice)):
            break
        if prompt is not None and not words and not looped:
            # Given a meeting's terms, Whisper now and then ends the text at once over
            # speech it writes without them ("Great work, everyone. Jokwyn, please send
            # the migration plan..." in every window, the standard one too): the terms
            # are a hint, never a reason to lose words. Decoded without them, in the
            # compact window first, which is cheaper than the wider ones with them.
            first = decode(audio, offset, None, margin, language)
            return settle(decode, audio, offset, None, language, whole, first, margin)
        words, rejected, info = decode(audio, offset, prompt, wider, language)
    for _ in range(CONTINUATIONS):
        if not words or not stopped_short(frames, offset, words, voice):
            break
        more = _continue(decode, audio, offset, words[-1].end, prompt, language, margin)
        if not more:
            break
        words.extend(more)
    if started_late(frames, offset, words, LATE_VOICE if whole else STUCK_VOICE):
        words[:0] = _head(decode, audio, offset, words, prompt, language, margin)
    return words, rejected, info


def _continue(
    decode: Decode,
    audio: Audio,
    offset: float,
    after: float,
    prompt: str | None,
    language: str | None,
    margin: int,
) -> list[HypWord]:
    """The words after ``after`` (session clock): ``audio`` decoded again from a little
    before it, not to cut the first word, or further back if that hears none."""
    for back in CONTINUE_BACKS:
        start = max(0.0, after - offset - back)
        rest = audio[round(start * ASR_RATE) :]
        words = _again(decode, rest, offset + start, prompt, language, margin)
        if more := [w for w in words if w.start >= after - 0.02]:
            return more
    return []


def _head(
    decode: Decode,
    audio: Audio,
    offset: float,
    after: Sequence[HypWord],
    prompt: str | None,
    language: str | None,
    margin: int,
) -> list[HypWord]:
    """The words before ``after`` (a decode's words, session clock): the audio up to a
    little after the first of them decoded on its own, so the last word heard is not
    cut."""
    before = after[0].start
    end = round((before - offset + CONTINUE_BACK) * ASR_RATE)
    words = _again(decode, audio[:end], offset, prompt, language, margin)
    head = [w for w in words if w.end <= before + 0.02]
    if head and head[-1].norm == after[0].norm:
        head.pop()  # the first word of the decode, heard twice at the join
    return head


def _again(
    decode: Decode,
    audio: Audio,
    offset: float,
    prompt: str | None,
    language: str | None,
    margin: int,
) -> list[HypWord]:
    """The words of a decode that goes back over part of the audio, in the compact
    window, or in the wider ones where that one loops: in a 200-frame window the head
    of a final of the dialogue (39.3-45.4 s) looped, and a sentence was lost."""
    words, rejected, _ = decode(audio, offset, prompt, margin, language)
    for wider in retries(len(audio), ASR_RATE):
        if words or not RETRY.intersection(rejected):
            break
        words, rejected, _ = decode(audio, offset, prompt, wider, language)
    return words
