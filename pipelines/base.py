"""The pipeline contract, re-exported from :mod:`gateway.pipeline`, where it lives.

The gateway never imports ``pipelines``; pipelines build on the gateway. Plugin authors
may import these names from either module: third-party pipelines written against
``pipelines.base`` keep working.
"""

from gateway.pipeline import (
    BUILTINS,
    ENTRY_POINT_GROUP,
    Disconnected,
    Environment,
    Gap,
    Pipeline,
    PipelineEvent,
    PipelineFactory,
    RouteHandler,
    Samples,
    SessionContext,
    SpeakerChange,
    SpeechEnded,
    SpeechPaused,
    SpeechStarted,
    load_factory,
)

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "Disconnected",
    "Environment",
    "Gap",
    "Pipeline",
    "PipelineEvent",
    "PipelineFactory",
    "RouteHandler",
    "Samples",
    "SessionContext",
    "SpeakerChange",
    "SpeechEnded",
    "SpeechPaused",
    "SpeechStarted",
    "load_factory",
]
