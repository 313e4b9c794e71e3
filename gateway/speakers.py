"""Moved to :mod:`gateway.ingest.speakers`; this name stays for pipelines written against it."""

from .ingest.speakers import (
    MAX_SKEW,
    MAX_SPEAKERS,
    Speaker,
    SpeakerChange,
    SpeakerTimeline,
    speaker_json,
)

__all__ = [
    "MAX_SKEW",
    "MAX_SPEAKERS",
    "Speaker",
    "SpeakerChange",
    "SpeakerTimeline",
    "speaker_json",
]
