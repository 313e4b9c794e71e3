"""One session's live transcription: audio in, speaker-attributed results out.

Audio is resampled to 16 kHz into a bounded window that holds the open segment plus a
second of lead-in. The ingest VAD's events drive the :class:`StreamingPolicy`; its
requests are cut from the window, copied, and queued on the shared :class:`Scheduler`.
A final that needs audio past the VAD's end (the trailing pad) waits until that audio
has arrived, or until a gap or the end of the session cuts it short. At a pause the
final its end would bring is recognized already (:mod:`.early`).

Finals are published strictly in request order, whatever order recognition finishes in;
partials go out once recognized and are dropped once their segment was finalized.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections import deque
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gateway.audio.resample import Resampler
from gateway.ingest.speakers import Speaker
from gateway.keywords import Vocabulary
from gateway.pipeline import (
    Disconnected,
    Gap,
    Pipeline,
    PipelineEvent,
    ProviderSegment,
    SessionContext,
    SpeakerChange,
    SpeechEnded,
    SpeechPaused,
    SpeechStarted,
)

from . import results
from .drafts import Draft, Request
from .early import QUIET_SLACK, EarlyFinal
from .engine import Engine, Hypothesis
from .finals import FinalWords
from .language import LanguageChoice
from .policy import StreamingPolicy
from .provider import segment_result
from .recognizer import Recognizer
from .turns import Turns
from .window import Window
from .words import ASR_RATE, HypWord, as_written

if TYPE_CHECKING:
    from prometheus_client import Histogram

    from .metrics import TranscriptionMetrics
    from .outputs import SessionOutputs, TranscriptOutputs

Samples = npt.NDArray[np.int16]

#: Lead-in kept while nobody speaks: the VAD reports a start after the fact.
LEAD_IN = 1.0
#: The annotation that shows the roster's lag (seconds) and keeps it across a restart.
LAG_NOTE = "roster_lag"
#: With ``language=auto``, a final waits up to this much audio for the language to settle
#: (:mod:`.language`): "Guten Morgen." alone is heard as Thai or English as often as German.
LANGUAGE_WAIT = 8.0


@dataclasses.dataclass(eq=False)
class _Pending:
    request: Request | None
    draft: Draft | None = None
    queued: float = dataclasses.field(default_factory=time.time)


class TranscriptionPipeline(Pipeline):
    audio_block_ms = 100

    def __init__(
        self,
        engine: Engine,
        recognizer: Recognizer,
        outputs: TranscriptOutputs,
        metrics: TranscriptionMetrics,
        *,
        partial_interval: float,
        max_utterance: float,
        bot_speech: str,
        language: str = "en",
        vocabulary: Vocabulary | None = None,
    ) -> None:
        self._engine = engine
        self._default_language = language
        self._vocabulary = vocabulary or Vocabulary()  # the deployment's terms to expect
        self._recognizer = recognizer
        self._hub = outputs
        self._metrics = metrics
        self._bot_speech = bot_speech
        self._policy = StreamingPolicy(partial_interval, max_utterance)
        self._window = Window(max_utterance + partial_interval + LEAD_IN + 2.0 + LANGUAGE_WAIT)
        self._waiting: list[Request] = []
        self._finals: deque[_Pending] = deque()
        # Recognitions not yet handled by :meth:`_recognized`. ``stop`` waits on ``_idle``,
        # which only that callback sets: a future the scheduler resolved inside ``submit``
        # (a superseded partial) is done before its callback has run, and awaiting a done
        # future does not yield, so waiting on the futures themselves could spin forever.
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._first_partial: set[int] = set()
        self._words_in_utterance: dict[int, float] = {}
        self._turns = Turns()  # the roster lag, and who said each word
        self._final_words = FinalWords()
        self._said = ""  # the last final word
        self._hold: asyncio.TimerHandle | None = None
        self._early = EarlyFinal(metrics.early_finals)

    async def start(self, ctx: SessionContext) -> None:
        self._ctx = ctx
        asked = ctx.params.get("language") or self._default_language
        self._language = LanguageChoice.checked(asked, self._engine)
        self._annotated = self._language.current
        ctx.annotate("language", self._annotated)
        self._vocabulary = self._vocabulary.joined(ctx.params)  # roster names: _recognize
        if self._vocabulary.left_out:
            ctx.log.warning("%d terms past the bounds not expected", self._vocabulary.left_out)
        with contextlib.suppress(KeyError, ValueError):  # learnt before a restart
            self._turns.lag.resume(float(ctx.annotations[LAG_NOTE]))
        self._rate = ctx.sample_rate
        self._resampler = Resampler(ctx.sample_rate, ASR_RATE)
        self._out: SessionOutputs = self._hub.open(ctx)

    # -- input --------------------------------------------------------------------------

    async def audio(self, start: int, samples: Samples) -> None:
        self._window.append(self._resampler.process(samples))
        self._policy.lanes_busy(self._recognizer.busy())
        # _pump flushes: a final held for a late roster goes once this audio brings it.
        self._pump(self._policy.advance(self._window.end / ASR_RATE))

    async def event(self, event: PipelineEvent) -> None:
        if isinstance(event, SpeechStarted):
            t = event.sample / self._rate
            self._policy.speech_started(t)
            self._out.publish(results.SpeechStarted(round(t, 3)))
            wall = self._ctx.clock.wall(event.sample)
            self._turns.voice_started(t, wall, event.quiet / self._rate)
        elif isinstance(event, SpeakerChange) and not event.speaker.is_bot:
            self._turns.lag.roster_changed(event.time, event.speaker.key, event.speaking)
            if event.speaking:
                self._language.speaker(event.speaker.key)
        elif isinstance(event, SpeechPaused):
            self._paused(event.sample / self._rate)
        elif isinstance(event, SpeechEnded):
            self._pump(self._policy.speech_ended(event.sample / self._rate))
        elif isinstance(event, Disconnected):  # what was heard is all: finalize it now
            self._restart(event.sample)
        elif isinstance(event, Gap):
            self._restart(event.sample + event.length)
            self._turns.resumed((event.sample + event.length) / self._rate)
        elif isinstance(event, ProviderSegment):  # the vendor transcribed it already
            result = segment_result(event.data, self._language.current)
            if result is not None:
                self._out.publish(result)
                self._metrics.results.labels("final" if result.is_final else "partial").inc()

    async def stop(self) -> None:
        try:
            self._cut()
            await self._idle.wait()
            self._flush(hold=False)  # no roster comes any more: publish what waits
        finally:
            self._early.drop()
            if self._hold is not None:
                self._hold.cancel()
            self._recognizer.forget(self._ctx.key)
            await self._out.close()

    def _restart(self, sample: int) -> None:
        """Finish everything heard, and take the next audio as from ``sample`` on."""
        self._cut()
        self._resampler = Resampler(self._rate, ASR_RATE)
        self._window.reset(round(sample * ASR_RATE / self._rate))

    def _cut(self) -> None:
        """The audio stream breaks here: end speech and send what waits for more audio."""
        self._window.append(self._resampler.process(np.zeros(0, np.int16), last=True))
        now = self._window.end / ASR_RATE
        self._pump(self._policy.speech_ended(now))
        waiting, self._waiting = self._waiting, []
        for request in waiting:
            self._submit(dataclasses.replace(request, end=min(request.end, now)))

    # -- requests -----------------------------------------------------------------------

    def _pump(self, actions: list[Request | Draft]) -> None:
        for action in actions:
            if isinstance(action, Draft):
                self._finals.append(_Pending(None, action))
            else:
                self._waiting.append(action)
        ready = self._window.end / ASR_RATE
        still = []
        unsure = not self._language.settled
        for request in self._waiting:
            if request.end <= ready and not (
                unsure and request.kind == "final" and ready - request.end < LANGUAGE_WAIT
            ):
                self._submit(request)
            else:
                still.append(request)
        self._waiting = still
        self._flush()
        keep = self._window.end - int(LEAD_IN * ASR_RATE)
        if self._policy.speaking:
            keep = min(keep, int(self._policy.segment_start * ASR_RATE))
        for request in self._waiting:
            keep = min(keep, int(request.start * ASR_RATE))
        self._window.trim(keep)

    def _paused(self, t: float) -> None:
        """The voice paused at ``t``: recognize the final it would need if this is the end
        (:mod:`.early`), unless that audio is not in or the language is unsure."""
        request = self._policy.ending(t)
        ready = self._window.end / ASR_RATE
        if request is not None and self._language.settled and request.end - QUIET_SLACK <= ready:
            request = dataclasses.replace(request, end=min(request.end, ready))
            language = self._language.for_request()
            self._early.started(request, language, self._recognize(request, language))

    def _recognize(
        self, request: Request, language: str | None
    ) -> asyncio.Future[Hypothesis | None]:
        audio, at = self._window.floats(
            round(request.start * ASR_RATE), round(request.end * ASR_RATE)
        )
        kind, offset = request.kind, at / ASR_RATE
        if self._vocabulary.roster:  # whoever the rosters listed by now, speaking or not
            self._vocabulary.people(self._ctx.speakers.names)
        urgent, prompt = kind == "partial" and request.first, self._vocabulary.prompt
        return self._recognizer.recognize(
            self._ctx.key, kind, audio, offset, language, urgent=urgent, prompt=prompt
        )

    def _submit(self, request: Request) -> None:
        pending = _Pending(request)
        language, future = self._language.for_request(), None
        if request.kind == "final":
            self._finals.append(pending)
            future = self._early.take(request, language)
        if future is None:
            future = self._recognize(request, language)
        self._inflight += 1
        self._idle.clear()
        future.add_done_callback(functools.partial(self._recognized, pending))

    def _recognized(self, pending: _Pending, future: asyncio.Future[Hypothesis | None]) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()
        request = pending.request
        assert request is not None
        hypothesis = None
        if not future.cancelled():
            if future.exception() is not None:
                self._ctx.log.warning("recognition failed: %r", future.exception())
            else:
                hypothesis = future.result()
        if hypothesis is None:
            self._policy.skipped(request)
            words: tuple[HypWord, ...] = ()
            sure = True
        else:
            h = hypothesis
            self._metrics.recognized(request.kind, h.audio_seconds, h.compute_seconds, h.rejected)
            self._language.heard(h.language, h.language_probability, h.audio_seconds)
            words = tuple(dataclasses.replace(w, language=h.language) for w in h.words)
            sure = self._language.trusts(h.language)
        if request.kind == "final":
            if hypothesis is None:
                # Never lose what was confirmed, even if recognition could not run.
                kept = request.confirmed[request.released :]
                pending.draft = Draft(kept, True, request.speech_final, request)
            else:
                pending.draft = self._policy.recognized(request, words)[0]
            self._flush()
        elif hypothesis is not None:
            for draft in self._policy.recognized(request, words, sure=sure):
                if draft.is_final:
                    # Words final now go after any final still being recognized.
                    self._finals.append(_Pending(None, draft))
                else:
                    self._publish(draft)
            self._flush()

    # -- output -------------------------------------------------------------------------

    def _flush(self, hold: bool = True) -> None:
        """Publish the finals that are ready, in order; a late roster holds them back."""
        while self._finals and self._finals[0].draft is not None:
            draft = self._finals[0].draft
            wait = self._roster_wait(draft, self._finals[0].queued) if hold else 0.0
            if wait > 0:
                if self._hold is None:
                    loop = asyncio.get_running_loop()
                    self._hold = loop.call_later(wait, self._held)
                return
            self._finals.popleft()
            self._publish(draft)

    def _held(self) -> None:
        self._hold = None
        self._flush()

    def _roster_wait(self, draft: Draft, queued: float) -> float:
        """Seconds until the roster can have marked who said ``draft``'s last word."""
        if not draft.words:
            return 0.0
        w = draft.words[-1]
        word = (w.text, w.start, w.end)
        named = not self._ctx.speakers.roster_size or self._turns.named(word, self._lookup)
        heard = self._wall(self._window.end / ASR_RATE)
        return self._turns.hold(self._wall(w.end), time.time(), queued, heard, named)

    def _wall(self, seconds: float) -> float | None:
        return self._ctx.clock.wall(round(seconds * self._rate))

    def _publish(self, draft: Draft) -> None:
        request = draft.request
        if draft.is_final:
            self._turns.finalized(((w.text, w.start, w.end) for w in draft.words), self._wall)
            if self._turns.lag.settled:  # for /sessions, and the next process after a restart
                self._ctx.annotate(LAG_NOTE, f"{self._turns.lag.seconds:.1f}")
        words = self._attribute(draft.words, draft.is_final)
        if draft.is_final:
            words = self._final_words.admit(words)
            self._said = words[-1].punctuated if words else self._said
        utterance = request.utterance if request is not None else self._policy.utterance
        if not draft.is_final:
            if words:
                self._out.publish(results.Result.of(words, is_final=False, speech_final=False))
                self._metrics.results.labels("partial").inc()
                if request is not None and utterance not in self._first_partial:
                    self._first_partial.add(utterance)
                    self._observe(self._metrics.first_partial_latency, request.speech_start)
            return
        groups = results.by_speaker(words)
        if not groups and draft.speech_final and utterance in self._words_in_utterance:
            # Every word was final already: the endpoint still gets its speech_final.
            end = self._words_in_utterance[utterance]
            lang = self._annotated
            self._out.publish(results.Result(end, end, (), True, True, lang))
        for i, group in enumerate(groups):
            speech_final = draft.speech_final and i == len(groups) - 1
            self._out.publish(results.Result.of(group, is_final=True, speech_final=speech_final))
            self._metrics.results.labels("final").inc()
        if words:
            self._words_in_utterance[utterance] = words[-1].end
            for word in words:
                self._observe(self._metrics.word_final_latency, word.end)
            if words[-1].language != self._annotated:  # /sessions: the language heard
                self._annotated = words[-1].language
                self._ctx.annotate("language", self._annotated)
        if draft.speech_final and request is not None:
            if request.speech_end is not None:
                self._observe(self._metrics.final_latency, request.speech_end)
            if (last_end := self._words_in_utterance.pop(utterance, None)) is not None:
                self._out.publish(results.UtteranceEnd(round(last_end, 3)))
            self._first_partial.discard(utterance)

    def _observe(self, histogram: Histogram, seconds: float) -> None:
        if (wall := self._ctx.clock.wall(round(seconds * self._rate))) is not None:
            histogram.observe(max(0.0, time.time() - wall))

    def _attribute(self, words: tuple[HypWord, ...], final: bool) -> tuple[results.Word, ...]:
        words = tuple(as_written(words, self._said))  # "cold" "-hearted" is one word
        out = []
        spans = ((w.text, w.start, w.end) for w in words)
        speakers = self._turns.speakers(spans, self._lookup, final=final)
        for w, speaker in zip(words, speakers, strict=True):
            if speaker is not None and speaker.is_bot and self._bot_speech == "drop":
                self._metrics.bot_words_dropped.inc()
                continue
            lang, at = w.language or self._language.current, (round(w.start, 3), round(w.end, 3))
            out.append(results.Word(w.norm, w.text, *at, round(w.probability, 4), speaker, lang))
        return tuple(out)

    def _lookup(
        self, start: float, end: float, lag: float, prefer: Speaker | None
    ) -> Speaker | None:
        a, b = round(start * self._rate), round(end * self._rate)
        return self._ctx.speakers.attribute(a, b, lag=lag, prefer=prefer)
