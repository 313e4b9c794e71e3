"""Streaming sample-rate conversion with soxr.

One :class:`Resampler` per consumer and stream: soxr keeps filter state across calls, so
chunk boundaries leave no clicks and the output is the same however the input is cut.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import soxr

Samples = npt.NDArray[np.int16]


class Resampler:
    __slots__ = ("_stream", "consumed", "in_rate", "out_rate", "produced")

    def __init__(self, in_rate: int, out_rate: int, quality: str = "HQ") -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality=quality)
        )
        self.consumed = 0
        self.produced = 0

    @property
    def delay(self) -> float:
        """Output samples the filter holds back (its latency), at ``out_rate``."""
        return 0.0 if self._stream is None else float(self._stream.delay())

    def process(self, samples: Samples, last: bool = False) -> Samples:
        """Resample the next chunk. ``last=True`` flushes the filter's tail (once)."""
        self.consumed += len(samples)
        out = samples if self._stream is None else self._stream.resample_chunk(samples, last)
        self.produced += len(out)
        return out
