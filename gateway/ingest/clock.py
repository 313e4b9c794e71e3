"""The session audio clock.

Positions on it are sample indices at the session's native rate, counted from the
first audio sample the session received (audio can start minutes after the bot
connects). Time the bot spent disconnected counts too: the session advances the clock
over gaps, so a position converts to seconds of meeting time, and to wall time by one
anchor taken when the first audio arrived.
"""

from __future__ import annotations


class AudioClock:
    __slots__ = ("origin", "rate")

    def __init__(self, rate: int) -> None:
        self.rate = rate
        #: Wall time (epoch seconds) of sample 0, once audio has started.
        self.origin: float | None = None

    @property
    def started(self) -> bool:
        return self.origin is not None

    def start(self, wall: float, samples: int) -> None:
        """Anchor the clock: the first ``samples`` samples finished arriving at ``wall``."""
        if self.origin is None:
            self.origin = wall - samples / self.rate

    def seconds(self, sample: int) -> float:
        return sample / self.rate

    def sample(self, seconds: float) -> int:
        return round(seconds * self.rate)

    def wall(self, sample: int) -> float | None:
        return None if self.origin is None else self.origin + sample / self.rate

    def at_wall(self, wall: float) -> int:
        """Clock position of a wall time; 0 before audio has started or before sample 0."""
        if self.origin is None:
            return 0
        return max(0, round((wall - self.origin) * self.rate))
