"""The pipeline contract.

Pipelines build on the gateway, never the other way round: the gateway knows pipelines
only through this module and the import strings in :data:`BUILTINS`. Plugin authors may
import these names from here or from :mod:`pipelines.base`, which re-exports them.

A pipeline consumes one session's audio and events. The gateway owns all concurrency:
each pipeline instance runs on its own task, fed from the session's ring buffer and a
bounded event queue, so a slow pipeline falls behind on its own (its losses counted as
ring overruns and queue drops) and a failing one is stopped alone.

Calls arrive in session-clock order, never concurrently::

    await start(ctx)
    ( await audio(start, samples) | await event(ev) )*
    await stop()

``audio`` receives a read-only view into the ring: valid only during the call, so copy
what must outlive it. ``start`` is the absolute sample index of ``samples[0]`` on the
session audio clock (native rate, counted from the session's first audio sample, gaps
included). Audio comes in blocks of about :attr:`Pipeline.audio_block_ms`; where samples
were skipped (the bot was away, or this pipeline fell so far behind the ring that audio
was overwritten) a :class:`Gap` event says so and audio resumes after it.

A deployment enables pipelines by name. Each name resolves to a
:class:`PipelineFactory`, made once per process with the :class:`Environment` (settings,
metrics registry) and asked for one :class:`Pipeline` per session. Built-in factories are
listed in :data:`BUILTINS`; other packages add theirs under the ``meeting_gateway.pipelines``
entry point group, each entry pointing at a factory class.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry

from .audio.vad import SpeechEnded, SpeechPaused, SpeechStarted
from .config import Settings
from .errors import ConfigError
from .ingest.speakers import SpeakerChange, SpeakerTimeline

if TYPE_CHECKING:
    from .ingest.clock import AudioClock

__all__ = [
    "BUILTINS",
    "ENTRY_POINT_GROUP",
    "Disconnected",
    "Environment",
    "Gap",
    "Pipeline",
    "PipelineEvent",
    "PipelineFactory",
    "ProviderSegment",
    "Relay",
    "RelayKind",
    "RouteHandler",
    "Samples",
    "SessionContext",
    "SpeakerChange",
    "SpeechEnded",
    "SpeechPaused",
    "SpeechStarted",
    "load_factory",
]

Samples = npt.NDArray[np.int16]

ENTRY_POINT_GROUP = "meeting_gateway.pipelines"

#: Built-in pipelines by name, as import strings (imported only when enabled).
BUILTINS: Mapping[str, str] = {
    "recording": "pipelines.recording:RecordingFactory",
    "transcription": "pipelines.transcription:TranscriptionFactory",
}


@dataclass(frozen=True, slots=True)
class Gap:
    """``length`` samples from ``sample`` on carry no audio (they count on the clock)."""

    sample: int
    length: int
    reason: str
    """``"disconnected"`` (the bot was away) or ``"overrun"`` (this pipeline fell behind)."""


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The bot's output socket dropped after ``sample``: no audio follows until it comes
    back (a :class:`Gap` then) or the session ends. Finish what was heard: the bot drops
    what it captures while away, so what was cut off will not be continued."""

    sample: int


@dataclass(frozen=True, slots=True)
class ProviderSegment:
    """A ``transcript.segment`` the vendor's own transcription sent (its v2 transcription
    mode: no audio comes, the bot posts transcripts instead); ``data`` as received."""

    sample: int
    data: Mapping[str, Any]


PipelineEvent = (
    SpeechStarted
    | SpeechPaused
    | SpeechEnded
    | SpeakerChange
    | Gap
    | Disconnected
    | ProviderSegment
)


class SessionContext(Protocol):
    """What a pipeline may see and use of its session."""

    @property
    def key(self) -> str: ...
    @property
    def bot_id(self) -> str | None: ...
    @property
    def sample_rate(self) -> int: ...
    @property
    def directory(self) -> Path:
        """``<data-dir>/sessions/<key>/``, created before ``start``."""
        ...

    @property
    def params(self) -> Mapping[str, str]:
        """The query parameters of the bot's output URL (e.g. a per-session webhook)."""
        ...

    @property
    def clock(self) -> AudioClock: ...
    @property
    def speakers(self) -> SpeakerTimeline: ...
    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...
    @property
    def suspending(self) -> bool:
        """Set before :meth:`Pipeline.stop` when the gateway stops with the meeting still
        on: a new process resumes the session in the same directory, so keep files open
        for appending and send nothing that says the meeting ended."""
        ...

    def annotate(self, name: str, value: str | None) -> None:
        """Show ``name: value`` in ``GET /sessions`` and ``session.json`` (``annotations``),
        e.g. the language being heard; ``None`` removes it. Names and values are short.
        They are journaled: a session a new process resumes starts with them."""
        ...

    @property
    def annotations(self) -> Mapping[str, str]:
        """The notes :meth:`annotate` made, the last process's included (a pipeline of a
        resumed session reads what it had learnt here, e.g. the roster's lag)."""
        ...

    def speak(self, samples: Samples, rate: int) -> str:
        """Queue int16 mono audio at ``rate`` to play into the meeting; returns its id.

        The audio is resampled to the session's rate, paced in real time and can be cut
        by barge-in. Raises :class:`~gateway.speech.playback.PlaybackFull` when too much waits.
        """
        ...

    def say(self, text: str) -> str:
        """Queue ``text`` as synthesized speech; returns the utterance id."""
        ...


class Pipeline(abc.ABC):
    """One session's consumer. Subclasses override what they need."""

    #: How much audio to gather before each :meth:`audio` call.
    audio_block_ms: ClassVar[int] = 100

    async def start(self, ctx: SessionContext) -> None:  # noqa: B027 - optional hook
        """Called once before any audio or event."""

    @abc.abstractmethod
    async def audio(self, start: int, samples: Samples) -> None:
        """Consume samples ``[start, start + len(samples))``; the view dies on return."""

    async def event(self, event: PipelineEvent) -> None:  # noqa: B027 - optional hook
        """Consume a VAD, speaker or gap event, in clock order with the audio."""

    async def stop(self) -> None:  # noqa: B027 - optional hook
        """Called once when the session ends, after all audio and events."""


#: What a relayed transcript message is; ``ready`` marks the end of a replay.
RelayKind = Literal["final", "partial", "event", "end", "ready"]


class Relay(Protocol):
    """Cluster mode: a session's live messages reach subscribers on every node through
    this (:class:`gateway.cluster.relay.TranscriptRelay`) instead of directly."""

    def publish(self, key: str, kind: RelayKind, text: str) -> None:
        """Queue a message of session ``key``; never waits."""
        ...

    def follow(
        self, key: str | None, running: Callable[[], bool] = ...
    ) -> AsyncIterator[tuple[str, RelayKind, str, bool]]:
        """``(key, kind, text, replayed)`` of session ``key`` (None: of every session)
        while ``running()``."""
        ...


@dataclass(frozen=True, slots=True)
class Environment:
    """Process-wide services handed to every factory."""

    settings: Settings
    registry: CollectorRegistry
    relay: Relay | None = None
    """Set in cluster mode: how transcript messages travel between nodes."""


#: A WebSocket route a factory serves: ``handler(connection, key)`` where ``key`` is the
#: session key from ``/bots/{key}/<name>``, or ``None`` for ``/<name>`` (all sessions).
RouteHandler = Callable[[Any, str | None], Awaitable[None]]


class PipelineFactory(abc.ABC):
    """Made once per process; builds a pipeline per session and owns shared state."""

    name: ClassVar[str]

    def __init__(self, env: Environment) -> None:
        self.env = env

    async def startup(self) -> None:  # noqa: B027 - optional hook
        """Load what every session shares (a model); called before the server listens."""

    async def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release shared state; called after every session has stopped."""

    @abc.abstractmethod
    def create(self, ctx: SessionContext) -> Pipeline:
        """A new pipeline for one session."""

    def routes(self) -> Mapping[str, tuple[str, RouteHandler]]:
        """Extra WebSocket endpoints: ``{name: (token_role, handler)}``."""
        return {}

    def resume_position(self, directory: Path, rate: int) -> int:
        """How far (clock samples) this factory's files in ``directory`` reach, for a
        session an earlier process left unfinished; the resumed session's clock goes on
        from the furthest any factory or the journal says. Called after ``startup``."""
        return 0


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_factory(name: str, env: Environment) -> PipelineFactory:
    """Build the factory registered under ``name`` (built-in first, then entry points)."""
    if name in BUILTINS:
        cls = _resolve(BUILTINS[name])
    else:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if not found:
            known = sorted({*BUILTINS, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
            raise ConfigError(f"pipelines: unknown pipeline {name!r}; known: {', '.join(known)}")
        cls = found[0].load()
    if not (isinstance(cls, type) and issubclass(cls, PipelineFactory)):
        raise ConfigError(f"pipelines: {name!r} does not name a PipelineFactory subclass")
    factory: PipelineFactory = cls(env)
    return factory
