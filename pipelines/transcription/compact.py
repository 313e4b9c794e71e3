"""The compact window: Whisper's encoder run on the audio and a margin, not on 30 s.

faster-whisper pads every window to Whisper's 30 s, so the encoder costs ~0.4 s on one
core even for a one-second partial. CTranslate2's encoder takes shorter inputs: padding
only to the audio plus ``WINDOW_MARGIN`` frames (then whole seconds) ran ~5x faster on
the LibriVox utterances with no loss of accuracy and the same silence and noise
rejection (margins under ~3 s let "you" through on noise). The window is chosen per
call, in the calling thread (:func:`padding`), so other users of faster-whisper in the
process keep the standard 30 s window.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

#: Frames (10 ms) of padding after the audio in the compact window. On the replay a
#: margin of 100 made 469 errors against 432 with 300; 600 and 1000 about as many (429, 427).
WINDOW_MARGIN = 300
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
