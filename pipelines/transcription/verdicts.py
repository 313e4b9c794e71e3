"""What to keep of a decode, and when a decode is not to be trusted. Pure functions.

Whisper's segments come with their own doubts (no-speech probability, log-probability,
compression ratio); :func:`judge` turns them into a reason to drop a segment, and
:func:`collect` keeps the words of the rest. Three failures of the compact window
(:mod:`.engine`) are seen here, and the engine answers them:

* **Loops** (:func:`looping`): "he was... he was... he was...", or marks that are no
  words ("old-s---------------") displacing the words after them. Decoded again in a
  window 10 s wider, and if that loops too in the standard 30 s one, which do not
  share them.
* **Starting late** (:func:`started_late`): the decode's first word comes after seconds
  of voice it did not write. Under load a final of 39.3-54.4 s of a dialogue began at
  45.2 s ("I'll put it in the shared...") and lost "quick check in on Friday morning
  works for me, and could you share the updated plan with the whole group before
  then?". Decoding the audio before the first word on its own hears it.
* **Stopping short** (:func:`stopped_short`): the decode ends while the voice goes on.
  Over overlapping voices tiny.en sometimes writes one sentence and the end of text
  ("such a polite way to call someone's en", then nothing of "Which is exactly why I
  love this book"); a final of such a decode lost those words. Worse, a partial that
  starts on the tail of a sentence ("me a short report.") can stop there however long
  its window, in both windows: each next partial starts at the same confirmed word and
  stops at the same place, and at 12 meetings six seconds of a dialogue never reached a
  final. Decoding on from the last word hears the rest ("Perfect. Then let's plan a
  quick check in on Friday morning").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .words import ASR_RATE, HypWord, attaches, normalize

# Whisper's own thresholds for rejecting a segment (openai/whisper transcribe defaults).
NO_SPEECH_PROB = 0.6
LOGPROB_FLOOR = -1.0
COMPRESSION_RATIO_MAX = 2.4
# Music: tiny.en answers a few seconds of it with "Thank you." or "So" at a log-probability
# just above Whisper's floor (-0.75 to -1.0), but sure there is no speech (0.87-0.98 in 157
# hallucinated segments of six synthetic bands); speech of the conversation recipes never
# scored above 0.76 in 333 segments. Such a segment is no speech, whatever its words.
NO_SPEECH_SURE = 0.8
NO_SPEECH_SURE_LOGPROB = -0.5
#: A phrase of this many words said twice back to back is a loop (:func:`looping`).
LONG_PHRASE = 5
#: Why a decode in the compact window is tried again in the standard one, besides
#: stopping short.
RETRY = frozenset({"repetition", "low_logprob"})
#: A decode stopped short when this many seconds of voice follow its last word (after
#: :data:`AFTER_WORD` of slack for the word's own tail and a word Whisper holds back).
#: It applies to finals, which no later decode hears again: at 0.8 s, a final that
#: stopped within an overlap lost the "at all" of "that is not much time at all" (0.78 s
#: of voice after its last word); at 0.25 s with 0.3 s of slack, one that stopped at
#: "in the same time." (timed 0.4 s before the voice ended) lost it too. Continuing costs
#: a decode of the last second or so, and finals are few.
SHORT_VOICE = 0.1
AFTER_WORD = 0.2
#: ... and a partial when this many seconds follow: partials are not final, but the
#: window of the next starts where this one's words were confirmed, and a decode that
#: keeps stopping at the same sentence keeps the words after it from ever being heard.
STUCK_VOICE = 2.0
#: A final's decode started late when this many seconds of voice come before its first
#: word (after :data:`BEFORE_WORD` of slack for that word's own onset; a partial's after
#: ``STUCK_VOICE``).
LATE_VOICE = 0.25
BEFORE_WORD = 0.3
#: A decode that stopped short is continued from its last word this many times at most,
#: each time from the first of these many seconds before that word's end that hears a
#: word after it. From 0.2 s back tiny.en can write nothing again where one voice ends
#: over another: "...gets a short slot." then nothing of "not much time at all", which
#: a decode from a second back hears.
CONTINUATIONS = 2
CONTINUE_BACKS = (0.2, 1.0)
CONTINUE_BACK = CONTINUE_BACKS[0]
#: Voice: a 20 ms frame within this many dB of the audio's speech level (its loudest
#: frames, 95th percentile).
VOICED_BELOW_DB = 20.0
#: ... and above this, dBFS: silence has no voice to miss.
VOICE_FLOOR_DB = -55.0
FRAME = 0.02
# Speech runs at about 3 words (4-5 tokens) a second. A decode that needs far more is
# looping, and a loop left to run to Whisper's 448-token limit costs seconds.
TOKENS_PER_SECOND = 10
TOKEN_SLACK = 16


def judge(segment: Any) -> str | None:
    """Why a faster-whisper segment is not speech worth keeping, or ``None``."""
    if segment.compression_ratio > COMPRESSION_RATIO_MAX:
        return "repetition"
    if segment.no_speech_prob > NO_SPEECH_PROB and segment.avg_logprob < LOGPROB_FLOOR:
        return "no_speech"
    if segment.no_speech_prob > NO_SPEECH_SURE and segment.avg_logprob < NO_SPEECH_SURE_LOGPROB:
        return "no_speech"
    if segment.avg_logprob < 1.5 * LOGPROB_FLOOR:
        return "low_logprob"
    return None


def looping(words: list[str]) -> bool:
    """Whether a phrase repeats back to back: 3 times (4 for a single word), or twice
    for a phrase of :data:`LONG_PHRASE` words or more.

    Too short for the compression-ratio check to notice, and what Whisper produces
    when it loops on a fragment ("he was... he was... he was..."), or on the last
    sentence it heard at the end of the audio ("Thanks everyone, have a good day. Bye.
    Thanks everyone, have a good day. Bye. Thanks everyone"). People repeat a word or
    two; a whole sentence said twice back to back is the model's.
    """
    said = [normalize(w) for w in words]
    for n in range(1, len(said) // 2 + 1):
        need = 4 if n == 1 else 3 if n < LONG_PHRASE else 2
        for i in range(len(said) - n * need + 1):
            phrase = said[i : i + n]
            if all(said[i + k * n : i + (k + 1) * n] == phrase for k in range(1, need)):
                return True
    return False


def collect(segments: Iterable[Any], offset: float) -> tuple[list[HypWord], list[str]]:
    """Words of the segments that pass :func:`judge`, shifted by ``offset`` seconds."""
    words: list[HypWord] = []
    rejected: list[str] = []
    for segment in segments:
        reason = judge(segment)
        if reason is not None:
            rejected.append(reason)
            continue
        raw = [w.word.strip() for w in segment.words or ()]
        if looping(raw):
            # Whisper can loop on marks that are no words ("old-s---------------"): they
            # would be dropped below and the loop would go unnoticed, with the words it
            # displaced ("young man") lost.
            rejected.append("repetition")
            continue
        for i, (w, text) in enumerate(zip(segment.words or (), raw, strict=True)):
            if normalize(text):
                attached = i > 0 and attaches(w.word)
                words.append(
                    HypWord(text, offset + w.start, offset + w.end, w.probability, "", attached)
                )
    return words, rejected


def token_limit(audio: npt.NDArray[np.float32]) -> int:
    """The most tokens a decode of 16 kHz ``audio`` may write before it is a loop."""
    return int(TOKENS_PER_SECOND * len(audio) / ASR_RATE) + TOKEN_SLACK


def verdict(
    parts: Sequence[tuple[Sequence[Any], float]], limit: int
) -> tuple[list[HypWord], list[str]]:
    """The words of one decode's segments (given in lists, each with the offset its
    times count from, s) and why segments were dropped; none if it ran out of tokens
    (``limit``) or loops."""
    if sum(len(s.tokens) for segments, _ in parts for s in segments) >= limit - 1:
        return [], ["repetition"]  # ran out of room: a loop, not speech
    words: list[HypWord] = []
    rejected: list[str] = []
    for segments, offset in parts:
        found, why = collect(segments, offset)
        words += found
        rejected += why
    if looping([w.norm for w in words]):
        return [], [*rejected, "repetition"]
    return words, rejected


def voiced(audio: npt.NDArray[np.float32]) -> npt.NDArray[np.bool_]:
    """Which :data:`FRAME` s frames of 16 kHz ``audio`` hold voice."""
    frame = round(FRAME * ASR_RATE)
    n = len(audio) // frame
    if n == 0:
        return np.zeros(0, dtype=bool)
    rms = np.sqrt(np.mean(np.square(audio[: n * frame].reshape(n, frame)), axis=1)) + 1e-9
    db = 20 * np.log10(rms)
    level = float(np.percentile(db, 95))
    return np.asarray((db > level - VOICED_BELOW_DB) & (db > VOICE_FLOOR_DB), dtype=bool)


def stopped_short(
    frames: npt.NDArray[np.bool_],
    offset: float,
    words: Sequence[HypWord],
    voice: float = SHORT_VOICE,
) -> bool:
    """Whether voice goes on for ``voice`` seconds after the last of ``words``, in audio
    whose :func:`voiced` frames are ``frames`` and which starts at ``offset`` seconds."""
    return voice_after(frames, (words[-1].end - offset) if words else 0.0, voice)


def voice_after(frames: npt.NDArray[np.bool_], last: float, voice: float = SHORT_VOICE) -> bool:
    """Whether voice goes on for ``voice`` seconds after a word that ends ``last``
    seconds into audio whose :func:`voiced` frames are ``frames``."""
    first = max(0, int((last + AFTER_WORD) / FRAME))
    return bool(np.count_nonzero(frames[first:]) * FRAME >= voice)


def started_late(
    frames: npt.NDArray[np.bool_],
    offset: float,
    words: Sequence[HypWord],
    voice: float = LATE_VOICE,
) -> bool:
    """Whether ``voice`` seconds of voice come before the first of ``words`` (less
    :data:`BEFORE_WORD` of slack for that word's own onset)."""
    if not words:
        return False
    first = int((words[0].start - offset - BEFORE_WORD) / FRAME)
    return first > 0 and bool(np.count_nonzero(frames[:first]) * FRAME >= voice)
