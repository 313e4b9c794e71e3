"""Where transcription results go: live subscribers, files on disk, the webhook.

One :class:`TranscriptOutputs` per process serves the subscriber endpoints
(:mod:`~pipelines.transcription.subscribers`) and owns the webhook sender
(:mod:`~pipelines.transcription.webhook`); each session's transcription gets a
:class:`SessionOutputs` from :meth:`TranscriptOutputs.open`. Publishing is synchronous
and never waits. Every message is a Deepgram-style JSON object
(:mod:`~pipelines.transcription.formats`) carrying ``"session": key``.

Files in the session directory:

``transcript.jsonl``
    Every final ``Results`` message, exactly as subscribers receive it, appended and
    flushed as it is published, so a crash of the process loses none already written.
``transcript.json``
    Written atomically when the session is finalized, in the Meeting BaaS ``complete``
    shape ``{"transcript": [segments], "speakers": [names]}``, beside
    ``transcript.v2.json`` (the vendor's v2 shape) and ``transcript.vtt`` (WebVTT
    captions of ``audio.wav``, each cue naming its speaker). At start-up, a session
    left without them by a crash gets them rebuilt from its ``transcript.jsonl``.
``webhook_undelivered.jsonl``
    Webhook bodies that could not be delivered.

Webhook bodies are ``{"id", "event", "session", "bot_id", "sequence", "sent_at",
"data"}``: ``event`` is ``transcript.final`` (``data`` is the final ``Results``
message) or ``transcript.complete`` (``data`` is the ``transcript.json`` object);
``sequence`` counts the session's finals, so a receiver can order bodies that retries
delivered out of order. They go to ``webhook_url`` and, when
``allow_session_webhooks`` is set, to the bot URL's ``?webhook=`` too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import Counter

from gateway.pipeline import Environment, RouteHandler, SessionContext
from gateway.storage import journal
from gateway.storage.files import FileStatus, disk_watch, write_atomically
from gateway.storage.held import HeldAppender
from gateway.storage.offload import blocking

from .formats import deepgram, meeting_baas, metadata, webvtt
from .provider import v2_transcript
from .relayed import RelayedHub
from .results import Result, TranscriptEvent
from .subscribers import Channel, SubscriberHub
from .webhook import WebhookSender

logger = logging.getLogger("pipelines.transcription.outputs")

JSONL = "transcript.jsonl"
TRANSCRIPT = "transcript.json"
TRANSCRIPT_V2 = "transcript.v2.json"
CAPTIONS = "transcript.vtt"
#: Finals per session kept in memory for late subscribers; older ones are read from disk.
MEMORY = 1000
#: Longest wait at shutdown for webhook bodies still being delivered.
SHUTDOWN_WAIT = 10.0


class TranscriptOutputs:
    """The process-wide outputs. Call :meth:`startup` before serving, :meth:`shutdown` last."""

    def __init__(self, env: Environment, *, memory: int = MEMORY) -> None:
        self.env = env
        s = env.settings
        hub = SubscriberHub if env.relay is None else functools.partial(RelayedHub, env.relay)
        self.hub = hub(
            env.registry, capacity=s.subscriber_queue, memory=memory, max_lag=s.subscriber_max_lag
        )
        self.webhooks = WebhookSender(
            env.registry,
            s.webhook_secret or s.secret,
            capacity=s.webhook_queue,
            attempts=s.webhook_attempts,
        )
        r = env.registry
        self.finals = Counter(
            "gateway_transcript_finals_written", "Finals appended to transcript.jsonl", registry=r
        )
        self.write_errors = Counter(
            "gateway_transcript_write_errors",
            "Failures writing transcript.jsonl or transcript.json",
            registry=r,
        )
        self.disk = disk_watch(r)

    async def startup(self) -> None:
        s = self.env.settings
        if s.allow_session_webhooks and s.open:
            logger.warning(
                "per-session webhooks are allowed and no secret is set: anyone who can reach "
                "the gateway can make it POST transcripts to any address"
            )
        recovered = await blocking(recover, s.data_dir / "sessions", s.resume)
        for directory in recovered:
            logger.warning("wrote %s for %s, which ended without one", TRANSCRIPT, directory)
        self.webhooks.start()

    async def shutdown(self) -> None:
        """After every session closed: wait (bounded) for webhook bodies; keep the rest."""
        await self.webhooks.close(SHUTDOWN_WAIT)
        await self.hub.shutdown()

    def routes(self) -> Mapping[str, tuple[str, RouteHandler]]:
        return {"transcripts": ("read", self.hub.serve)}

    def open(self, ctx: SessionContext) -> SessionOutputs:
        """A session's transcription started; publish its results through the return.

        ``ctx.directory`` must exist. The caller must :meth:`SessionOutputs.close` it.
        """
        jsonl = ctx.directory / JSONL
        channel = self.hub.open(ctx.key, jsonl, _count_finals(jsonl))
        return SessionOutputs(self, ctx, channel, self._webhook_urls(ctx))

    def _webhook_urls(self, ctx: SessionContext) -> list[str]:
        s = self.env.settings
        urls = [s.webhook_url] if s.webhook_url else []
        asked = ctx.params.get("webhook")
        if asked:
            if not s.allow_session_webhooks:
                ctx.log.warning("ignoring ?webhook=: per-session webhooks are not allowed")
            elif not asked.startswith(("http://", "https://")):
                ctx.log.warning("ignoring ?webhook=: not an http(s) URL")
            elif asked not in urls:
                urls.append(asked)
        return urls


class SessionOutputs:
    """One session's outputs. Call :meth:`publish` per event, :meth:`close` once at the end."""

    def __init__(
        self, outputs: TranscriptOutputs, ctx: SessionContext, channel: Channel, urls: list[str]
    ) -> None:
        self._outputs = outputs
        self._ctx = ctx
        self._channel = channel
        self._urls = urls
        self._sequence = channel.finals  # a resumed session's finals go on from the file
        self._meta = metadata(str(uuid.uuid4()), outputs.env.settings.model)
        self._closed = False
        # A disk that refuses a final holds it (at most MEMORY, the finals late subscribers
        # get from memory anyway) and retries with a back-off; see gateway.storage.files.
        dropped = outputs.disk.metrics.dropped_lines.labels("transcript")
        self._jsonl = HeldAppender(
            FileStatus(
                outputs.disk, ctx.directory, JSONL, "transcript", ctx.log, outputs.write_errors.inc
            ),
            max_lines=MEMORY,
            on_drop=dropped.inc,
        )

    def publish(self, event: TranscriptEvent) -> None:
        """Send ``event`` everywhere it goes. Never blocks; safe with no subscribers.

        Finals must come in clock order and never overlap (see :class:`Result`).
        Events published after :meth:`close` are ignored.
        """
        if self._closed:
            return
        message = deepgram(event, self._meta)
        message["session"] = self._ctx.key
        message["bot_id"] = self._ctx.bot_id
        text = json.dumps(message, ensure_ascii=False, separators=(",", ":"))
        final = isinstance(event, Result) and event.is_final
        partial = isinstance(event, Result) and not event.is_final
        if final:
            self._sequence += 1
            self._webhook("transcript.final", message)
            # Late subscribers replay finals from the file too, so only one that made it
            # there counts as a final for them; live subscribers get it either way.
            final = self._append(text)
        self._outputs.hub.publish(self._channel, text, final=final, partial=partial)

    def _append(self, text: str) -> bool:
        # Written unbuffered per final: a crash of the process must not lose what was said.
        # A full disk must not stop live captions: the line waits (counted, logged once)
        # and is written in order when the disk takes it again.
        self._jsonl.append((text + "\n").encode())
        self._outputs.finals.inc()
        return True

    def _webhook(self, kind: str, data: dict[str, Any]) -> None:
        for url in self._urls:
            body = {
                "id": str(uuid.uuid4()),
                "event": kind,
                "session": self._ctx.key,
                "bot_id": self._ctx.bot_id,
                "sequence": self._sequence,
                "sent_at": round(time.time(), 3),
                "data": data,
            }
            self._outputs.webhooks.submit(url, body, self._ctx.directory)

    async def close(self) -> None:
        """The session is finalized: write ``transcript.json``, send the final webhook."""
        if self._closed:
            return
        self._closed = True
        self._jsonl.finish()  # a last try at finals the disk refused so far
        if self._ctx.suspending:
            # The meeting goes on in the next process, which appends to the same file.
            self._jsonl.close()
            self._outputs.hub.close(self._channel, ended=False)
            return
        try:
            speakers = [s.name for s in self._ctx.speakers.speakers]
            # Wall-clock times: the bot's own capture start when its handshake said,
            # else when the session's first audio arrived.
            started = getattr(self._ctx, "start_time", None) or self._ctx.clock.origin
            transcript = await blocking(
                _write_transcript, self._jsonl, self._ctx.directory, speakers, started
            )
            self._webhook("transcript.complete", transcript)
        except OSError as exc:
            self._outputs.write_errors.inc()
            self._outputs.disk.metrics.errors.labels("transcript").inc()
            self._ctx.log.error("could not write %s: %s", TRANSCRIPT, exc)
        finally:
            self._jsonl.close()
            self._outputs.hub.close(self._channel)


def _count_finals(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0


def _write_atomically(path: Path, text: str) -> None:
    # On failure the temporary file is removed and the OSError raised.
    write_atomically(path, text.encode())


def _write_transcript(
    jsonl: HeldAppender, directory: Path, speakers: list[str], started: float | None
) -> dict[str, Any]:
    jsonl.sync()
    return _build_transcript(directory, speakers, started)


def _build_transcript(
    directory: Path, speakers: list[str], started: float | None = None
) -> dict[str, Any]:
    """``transcript.json`` (Meeting BaaS v1 ``complete`` shape, with ``started_at`` and
    each segment's ``wall_start`` when the session's wall-clock start is known) and
    ``transcript.v2.json`` (the vendor's v2 stored shape) and ``transcript.vtt``
    (captions for the recording) from ``transcript.jsonl``."""
    finals = []
    with open(directory / JSONL, encoding="utf-8") as f:
        for line in f:
            # A crash can leave the last line cut short; every complete one counts.
            with contextlib.suppress(ValueError):
                finals.append(json.loads(line))
    transcript = meeting_baas(finals, speakers)
    if started is not None:
        transcript["started_at"] = round(started, 3)
        for segment in transcript["transcript"]:
            segment["wall_start"] = round(started + segment["start_time"], 3)
    v2 = v2_transcript(transcript["transcript"])
    _write_atomically(directory / TRANSCRIPT_V2, json.dumps(v2, indent=1) + "\n")
    _write_atomically(directory / CAPTIONS, webvtt(transcript["transcript"]))
    _write_atomically(directory / TRANSCRIPT, json.dumps(transcript, indent=1) + "\n")
    return transcript


def recover(root: Path, resume: bool = False) -> list[Path]:
    """Write ``transcript.json`` for every session under ``root`` that a crash left without.

    Blocking; call before any session starts. Speaker names come from the recording's
    ``speakers.jsonl`` when there is one. With ``resume``, sessions the gateway resumes
    (their journal did not end) are left to finish their meeting first. Returns the
    session directories recovered.
    """
    recovered = []
    for jsonl in sorted(root.glob(f"*/{JSONL}")):
        directory = jsonl.parent
        if (directory / TRANSCRIPT).exists() or (resume and journal.unfinished_in(directory)):
            continue
        try:
            _build_transcript(directory, _roster_names(directory / "speakers.jsonl"))
        except OSError:
            logger.exception("could not recover the transcript of %s", directory)
            continue
        recovered.append(directory)
    return recovered


def _roster_names(path: Path) -> list[str]:
    names: dict[str, None] = {}
    with contextlib.suppress(OSError), open(path, encoding="utf-8") as f:
        for line in f:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                names[str(json.loads(line)["speaker"])] = None
    return list(names)
