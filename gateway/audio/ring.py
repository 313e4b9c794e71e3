"""A preallocated ring of int16 samples addressed by absolute sample index.

The writer appends with exactly one copy per message (two slice assignments when the
write wraps). Readers keep their own absolute cursor and ask for ``[start, stop)``; they
get read-only views into the ring, valid only until the writer has written
``capacity`` more samples. A reader that asks for samples already overwritten gets
:class:`Overrun` instead of corrupted audio, so it can count the loss and skip ahead.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import numpy.typing as npt

Samples = npt.NDArray[np.int16]


def mapped_zeros(n: int, dtype: type[np.generic]) -> npt.NDArray[Any]:
    """A zeroed array on an anonymous memory mapping of its own.

    Per-session buffers of a megabyte or so must go back to the system when the session
    ends. From the heap they may not: glibc raises its mmap threshold to the size of the
    largest block freed (up to 32 MiB), after which such buffers come from the heap,
    and a heap fragmented by thousands of sessions keeps its pages. A mapping is
    unmapped when the last array over it is freed; its pages are touched, and so made
    resident, only as audio is written, so an idle session costs no resident memory.
    """
    size = max(1, n) * np.dtype(dtype).itemsize
    return np.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=n)


class Overrun(Exception):
    """The requested samples were overwritten before the reader got to them."""

    def __init__(self, start: int, oldest: int) -> None:
        super().__init__(f"samples from {start} overwritten; oldest kept is {oldest}")
        self.start = start
        self.oldest = oldest

    @property
    def lost(self) -> int:
        return self.oldest - self.start


class RingBuffer:
    __slots__ = ("_buf", "_view", "capacity", "written")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, not {capacity}")
        self.capacity = capacity
        self._buf: Samples = mapped_zeros(capacity, np.int16)
        self._view: Samples = self._buf.view()
        self._view.flags.writeable = False
        #: Absolute index one past the newest sample: the total ever written.
        self.written = 0

    @property
    def oldest(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self.written - self.capacity)

    def write(self, samples: Samples) -> None:
        n = len(samples)
        if n >= self.capacity:
            # Only the newest ``capacity`` samples can be kept; place them where they
            # would have landed so indices stay consistent.
            samples = samples[n - self.capacity :]
            self.written += n - self.capacity
            n = self.capacity
        pos = self.written % self.capacity
        first = min(n, self.capacity - pos)
        self._buf[pos : pos + first] = samples[:first]
        if first < n:
            self._buf[: n - first] = samples[first:]
        self.written += n

    def advance(self, n: int) -> None:
        """Move the write position ``n`` samples on without writing (a gap).

        Readers must not read the skipped range; the session tells them to skip it.
        """
        if n < 0:
            raise ValueError(f"cannot advance by {n}")
        self.written += n

    def read(self, start: int, stop: int) -> list[Samples]:
        """Read-only views of ``[start, stop)``: one, or two where the range wraps."""
        if stop > self.written or start > stop:
            raise ValueError(f"range [{start}, {stop}) outside [0, {self.written})")
        if start < self.oldest:
            raise Overrun(start, self.oldest)
        if start == stop:
            return []
        a = start % self.capacity
        b = a + (stop - start)
        if b <= self.capacity:
            return [self._view[a:b]]
        return [self._view[a:], self._view[: b - self.capacity]]
