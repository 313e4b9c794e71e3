"""The compact window: Whisper's encoder run on the audio and a margin, not on 30 s.

faster-whisper pads every window to Whisper's 30 s, so the encoder costs ~0.4 s on one
core even for a one-second partial. CTranslate2's encoder takes shorter inputs: padding
only to the audio plus ``WINDOW_MARGIN`` frames (then whole seconds) ran ~5x faster on
the LibriVox utterances with no loss of accuracy and the same silence and noise
rejection. The window is chosen per call, in the calling thread (:func:`padding`), so
other users of faster-whisper in the process keep the standard 30 s window.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

#: Frames (10 ms) of padding after the audio in a partial's compact window. The
#: encoder's time grows with the window (about 5.5 ms a job per 100 frames on one AMD EPYC
#: core), and a 4 s partial's window was 7 s with 300. On the replay of every recipe (five
#: timings) 200 made 851 errors against 853 with 300 everywhere, for 7 % less compute
#: (398.7 against 429.4 s); 100 made 469 errors against 432 on an earlier policy, and 600
#: and 1000 about as many as 300 (429, 427). None of 100-300 wrote anything on 40 cuts of
#: 1-8 s of silence, noise, typing, music or babble.
WINDOW_MARGIN = 200
#: A final's, and every decode of a multilingual model. Words a final does not hear
#: are lost, and finals are a few percent of the recognitions: with 200 the finals of an
#: overlap in the meeting read "un this walk" and "I learned this month" where 300
#: reads "love this walk" and "why I love this book". 200 was measured on tiny.en; with
#: the base model, German detected from the audio gave WER 0.435 against 0.348.
FINAL_MARGIN = 300
#: A compact decode that loops or is rejected is tried again first with this margin
#: (about 10 s): on the conversations it hears what the standard window hears in 4 of
#: 4 such partials, for about 100 ms against 400 ms. Only if that fails too does the
#: standard window run. These retries were 2 % of the recognitions at 12 meetings but
#: 15 % of the lanes' time.
RETRY_MARGIN = 1000
#: Whisper's standard window, in frames.
FULL_WINDOW = 3000

_local = threading.local()


def install_compact_window() -> bool:
    """Let :func:`padding` size faster-whisper's window; whether it can (once per process)."""
    try:
        import faster_whisper.transcribe as fw
    except ImportError:
        return False
    original = getattr(fw, "pad_or_trim", None)
    if original is None or getattr(original, "compact_window", False):
        return original is not None

    def pad_or_trim(array: Any, length: int = FULL_WINDOW, *, axis: int = -1) -> Any:
        extra = getattr(_local, "margin", None)
        if extra is not None and length == FULL_WINDOW:
            frames = array.shape[axis]
            length = min(FULL_WINDOW, -(-(frames + extra) // 100) * 100)
        return original(array, length, axis=axis)

    pad_or_trim.compact_window = True  # type: ignore[attr-defined]
    fw.pad_or_trim = pad_or_trim
    return True


def margin_for(whole: bool, multilingual: bool) -> int:
    """The compact window's margin for a final (``whole``) or a partial, of a
    multilingual model or an English-only one."""
    return FINAL_MARGIN if whole or multilingual else WINDOW_MARGIN


@contextlib.contextmanager
def padding(frames: int | None) -> Iterator[None]:
    """Decodes in this thread, inside the block, pad the audio with ``frames`` (``None``:
    the standard 30 s window)."""
    _local.margin = frames
    try:
        yield
    finally:
        _local.margin = None


def retries(samples: int, rate: int) -> tuple[int | None, ...]:
    """The windows a failed compact decode of this audio is tried again in, in order:
    ``RETRY_MARGIN`` while that is still shorter than the standard window, then the
    standard one (``None``)."""
    if samples * 100 // rate + RETRY_MARGIN < FULL_WINDOW:
        return (RETRY_MARGIN, None)
    return (None,)
