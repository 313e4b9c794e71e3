"""Audio primitives, all sans I/O: the ring buffer, resampling and voice activity."""

from .resample import Resampler
from .ring import Overrun, RingBuffer
from .vad import SpeechEnded, SpeechPaused, SpeechStarted, VoiceActivity

__all__ = [
    "Overrun",
    "Resampler",
    "RingBuffer",
    "SpeechEnded",
    "SpeechPaused",
    "SpeechStarted",
    "VoiceActivity",
]
