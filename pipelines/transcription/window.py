"""A bounded stretch of 16 kHz audio on the session clock, for cutting recognition jobs.

Held as int16 (half the memory of float32) and converted only for the span a job
needs. Appending past the capacity forgets the oldest audio and counts it; the
streaming policy splits utterances long before that happens.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from gateway.audio.ring import mapped_zeros

from .words import ASR_RATE

Samples = npt.NDArray[np.int16]


class Window:
    """A bounded stretch of 16 kHz audio on the session clock."""

    def __init__(self, seconds: float) -> None:
        self._buf: Samples = mapped_zeros(int(seconds * ASR_RATE), np.int16)
        self.base = 0  # 16 kHz index of _buf[0]
        self.size = 0
        self.overflowed = 0

    @property
    def end(self) -> int:
        return self.base + self.size

    def reset(self, at: int) -> None:
        self.base, self.size = at, 0

    def append(self, x: Samples) -> None:
        cap = len(self._buf)
        if len(x) >= cap:
            self.overflowed += self.size + len(x) - cap
            self.base += self.size + len(x) - cap
            self._buf[:] = x[-cap:]
            self.size = cap
            return
        if self.size + len(x) > cap:
            excess = self.size + len(x) - cap
            self.overflowed += excess
            self.trim(self.base + excess)
        self._buf[self.size : self.size + len(x)] = x
        self.size += len(x)

    def trim(self, before: int) -> None:
        """Forget audio before 16 kHz index ``before``."""
        cut = min(max(0, before - self.base), self.size)
        if cut:
            self._buf[: self.size - cut] = self._buf[cut : self.size]
            self.size -= cut
            self.base += cut

    def floats(self, start: int, end: int) -> tuple[npt.NDArray[np.float32], int]:
        """A float copy of ``[start, end)`` clipped to what is held, and where it starts."""
        a = min(max(start, self.base), self.end)
        b = min(max(end, a), self.end)
        out = self._buf[a - self.base : b - self.base].astype(np.float32)
        out *= 1.0 / 32768.0
        return out, a
