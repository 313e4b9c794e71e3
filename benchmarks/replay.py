"""The streaming policy replayed on a conversation, with the real model on a virtual clock.

Live runs move by about ±0.03 WER and ±0.3 s of latency between runs of the same code:
when each partial runs depends on the machine's load, and each partial's span changes
what Whisper hears. The replay removes that noise. It drives the sans-I/O
:class:`~pipelines.transcription.policy.StreamingPolicy` as the pipeline does (the
ingest VAD's events, audio in 100 ms blocks, requests waiting for their audio, the end's
final recognized at a pause, finals published in request order through
:class:`~pipelines.transcription.finals.FinalWords`) with ``--lanes`` recognition lanes
(default 1, as every replay figure in ``RESULTS.md`` before ``--lanes`` existed; the
gateway has one per core) whose calls take ``(overhead + rtf * seconds of audio) *
load``, not the measured time. The same arguments give the same transcript every time;
``--loads`` and ``--phases`` replay the conversation under different timings to find
what only some show (a lost word).

It scores as :mod:`benchmarks.transcript_metrics` does live runs, on the virtual clock.
With ``--lags``, each run is replayed again with the roster the bot would send that many
seconds late (negative: early), words attributed and finals held as the pipeline does.
``--offset``, ``--seconds`` and ``--lead`` cut the conversation as the live benchmark cuts
its meetings (:func:`benchmarks.transcription.meeting_audio`), to replay one of them.
It prints one JSON document on stdout, a line per run on stderr::

    .venv/bin/python benchmarks/replay.py --cache ~/.cache/meeting-gateway/conversations
    .venv/bin/python benchmarks/replay.py --conversations dialogue --loads 1,2,4
    .venv/bin/python benchmarks/replay.py --conversations meeting --lags 0,1,2,-0.5
    .venv/bin/python benchmarks/replay.py --conversations meeting --offset 0.854 --seconds 60
    .venv/bin/python benchmarks/replay.py --conversations standup --noise typing:20 --vad silero
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import json
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import transcript_metrics as tm
from benchmarks.conversations import build, offline_wers
from benchmarks.noise import mix
from benchmarks.noise import parse as parse_noise
from benchmarks.transcription import meeting_audio
from gateway import keywords
from gateway.audio.vad import SpeechEnded, SpeechPaused, SpeechStarted, VoiceActivity
from gateway.config import Settings
from gateway.ingest.clock import AudioClock
from gateway.ingest.protocol import Roster, parse_roster
from gateway.ingest.speakers import SpeakerTimeline
from gateway.keywords import Vocabulary
from pipelines.transcription import formats, policy, results
from pipelines.transcription.drafts import Draft, Request
from pipelines.transcription.early import serves
from pipelines.transcription.engine import Engine, shared_engine
from pipelines.transcription.finals import FinalWords
from pipelines.transcription.policy import StreamingPolicy
from pipelines.transcription.scheduler import LaneUse
from pipelines.transcription.scoring import words as norm_words
from pipelines.transcription.turns import Turns
from pipelines.transcription.words import ASR_RATE, HypWord, as_written

BLOCK = 0.1  # the pipeline's audio block
OVERHEAD = 0.05  # seconds per recognition call, besides the audio (tiny.en, one core)
RTF = 0.06  # seconds of compute per second of audio heard (tiny.en int8, one core)
LANES = 1


@dataclass
class Replay:
    """One replay: the conversation's 16 kHz audio through one policy and its lanes."""

    engine: Engine
    samples: np.ndarray[Any, Any]
    partial_interval: float = Settings().partial_interval
    max_utterance: float = Settings().max_utterance
    load: float = 1.0
    phase: float = 0.0
    heard: dict[tuple[int, int, bool, str | None], tuple[HypWord, ...]] = field(
        default_factory=dict
    )
    roster: list[dict[str, Any]] | None = None
    """A roster script (:meth:`~benchmarks.conversations.Conversation.roster_script`):
    attribute words as the pipeline does; without one, words have no speaker."""
    overhead: float = OVERHEAD
    rtf: float = RTF
    """A recognition's modelled cost: ``(overhead + rtf * seconds of audio) * load``."""
    lanes: int = LANES
    vad: str = Settings().vad
    """The voice activity model (``--vad``)."""
    vocabulary: Vocabulary = field(default_factory=Vocabulary)
    """The terms recognitions expect (``--keywords``), and with ``--roster-keywords`` the
    names of the people on the roster, from the change that brings them on, as the
    pipeline adds them."""

    def __post_init__(self) -> None:
        self.policy = StreamingPolicy(self.partial_interval, self.max_utterance)
        self.vad_events = VoiceActivity.configured(ASR_RATE, Settings(vad=self.vad))
        self.guard = FinalWords()
        self.audio = (self.samples / 32768).astype(np.float32)
        self.waiting: list[Request] = []
        self.queue: list[Request] = []  # submitted, not started
        self.running: list[tuple[float, int, Request]] = []  # (done at, id, request)
        self.finals: deque[list[Any]] = deque()  # [request, draft], in publish order
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.now = 0.0
        self.fed = 0  # samples the VAD has heard
        self.turns = Turns()
        clock = AudioClock(ASR_RATE)
        clock.start(0.0, 0)  # the virtual clock is the wall clock: sample 0 at 0 s
        self.timeline = SpeakerTimeline(clock)
        self.rosters: deque[tuple[float, Roster]] = deque()
        for event in sorted(self.roster or [], key=lambda e: float(e["at"])):
            roster = parse_roster(event["roster"])
            assert isinstance(roster, Roster), roster
            self.rosters.append((float(event["at"]), roster))
        self.held: float | None = None  # when the first final stops waiting for the roster
        self.use = LaneUse(self.lanes)  # their recent share busy sets the partials' span
        # The end's final recognized at a pause (transcription.early), and its words.
        self.early: Request | None = None
        self.early_words: tuple[HypWord, ...] | None = None
        self.adopted: dict[int, Request] = {}
        self.early_used = self.early_wasted = 0
        self.spoke = False  # a final of the current utterance carried words
        self.said = ""  # the last final word
        # The engine's seconds over the recognitions this run made (not found in
        # ``heard``), and the seconds of audio they heard.
        self.compute = self.audio_heard = 0.0

    # -- the lanes ----------------------------------------------------------------------

    def _recognize(self, request: Request) -> tuple[HypWord, ...]:
        a, b = round(request.start * ASR_RATE), round(request.end * ASR_RATE)
        whole = request.kind != "partial"
        self.vocabulary.people(self.timeline.names)  # as the pipeline: at each recognition
        prompt = self.vocabulary.prompt
        key = (max(0, a), b, whole, prompt)
        if key not in self.heard:
            start = key[0]
            hyp = self.engine.transcribe(self.audio[start:b], start / ASR_RATE, prompt, whole=whole)
            self.heard[key] = hyp.words
            self.compute += hyp.compute_seconds
            self.audio_heard += hyp.audio_seconds
        return self.heard[key]

    def _start_next(self) -> None:
        while len(self.running) < self.lanes and self.queue:
            finals = [r for r in self.queue if r.kind != "partial"]
            request = finals[0] if finals else self.queue[-1]
            for r in self.queue:  # a newer partial of the session supersedes the older
                if r is not request and r.kind == "partial":
                    self.policy.skipped(r)
            self.queue = [r for r in self.queue if r.kind != "partial" and r is not request]
            seconds = (self.overhead + self.rtf * (request.end - request.start)) * self.load
            heapq.heappush(self.running, (self.now + seconds, request.id, request))
            self.use.began(request.id, self.now)

    def _paused(self, t: float) -> None:
        self._drop_early()
        if (ending := self.policy.ending(t)) is not None:
            self.early = dataclasses.replace(ending, kind="early")  # run as a final
            self.queue.append(self.early)
            self._start_next()

    def _drop_early(self) -> None:
        if self.early is not None:
            self.early_wasted += 1
            self.queue = [r for r in self.queue if r is not self.early]
        self.early, self.early_words = None, None

    def _submit(self, request: Request) -> None:
        if request.kind == "final":
            self.finals.append([request, None])
            early, words = self.early, self.early_words
            if early is not None and serves(early, request):
                self.early_used += 1  # the pause was the end: the final takes it over
                self.early, self.early_words = None, None
                if words is None:
                    self.adopted[early.id] = request
                else:
                    self._finish(request, words)
                return
            self._drop_early()
        self.queue.append(request)
        self._start_next()

    def _done(self, request: Request) -> None:
        self.use.ended(request.id, self.now)
        words = self._recognize(request)
        if request.kind != "early":
            self._finish(request, words)
        elif request is self.early:
            self.early_words = words
        elif request.id in self.adopted:
            self._finish(self.adopted.pop(request.id), words)
        self._start_next()  # (an early final dropped while running is ignored)

    def _finish(self, request: Request, words: tuple[HypWord, ...]) -> None:
        drafts = self.policy.recognized(request, words)
        if request.kind == "final":
            for entry in self.finals:
                if entry[0] is request:
                    entry[1] = drafts[0]
        else:
            for draft in drafts:
                if draft.is_final:
                    self.finals.append([None, draft])
                else:
                    self._publish(draft)
        self._flush()

    # -- the pipeline's bookkeeping -------------------------------------------------------

    def _pump(self, actions: list[Request | Draft]) -> None:
        for action in actions:
            if isinstance(action, Draft):
                self.finals.append([None, action])
            else:
                self.waiting.append(action)
        ready = [r for r in self.waiting if r.end <= self.now + 1e-9]
        self.waiting = [r for r in self.waiting if r.end > self.now + 1e-9]
        for request in ready:
            self._submit(request)
        self._flush()

    def _flush(self, hold: bool = True) -> None:
        while self.finals and self.finals[0][1] is not None:
            draft = self.finals[0][1]
            if hold and self.roster is not None and draft.words:
                w = draft.words[-1]
                named = self.turns.named((w.text, w.start, w.end), self._lookup)
                wait = self.turns.hold(w.end, self.now, named=named)
                if wait > 0:
                    if self.held is None:
                        self.held = self.now + wait
                    return
            self._publish(self.finals.popleft()[1])

    def _lookup(self, start: float, end: float, lag: float, prefer: Any) -> Any:
        a, b = round(start * ASR_RATE), round(end * ASR_RATE)
        return self.timeline.attribute(a, b, lag=lag, prefer=prefer)

    def _publish(self, draft: Draft) -> None:
        if draft.is_final:
            self.turns.finalized(((w.text, w.start, w.end) for w in draft.words), float)
        written = as_written(draft.words, self.said)
        speakers: list[Any] = [None] * len(written)
        if self.roster is not None:
            spans = ((w.text, w.start, w.end) for w in written)
            speakers = self.turns.speakers(spans, self._lookup, final=draft.is_final)
        words = tuple(
            results.Word(w.norm, w.text, round(w.start, 3), round(w.end, 3), w.probability, who)
            for w, who in zip(written, speakers, strict=True)
        )
        if draft.is_final:
            words = self.guard.admit(words)
            self.said = words[-1].punctuated if words else self.said
            # As the pipeline: a final with no words is sent only as the endpoint of an
            # utterance that had some (its words all final already), never for noise.
            if not words and not (draft.speech_final and self.spoke):
                return
            self.spoke = bool(words) and not draft.speech_final
        elif not words:
            return
        start, end = (words[0].start, words[-1].end) if words else (self.now, self.now)
        result = results.Result(start, end, words, draft.is_final, draft.speech_final)
        self.received.append((self.now, formats.deepgram(result)))

    # -- the clock ------------------------------------------------------------------------

    def _until(self, t: float) -> None:
        """Everything due by ``t`` in time order: recognitions done, rosters, held finals."""
        while True:
            due = [
                (when, kind)
                for when, kind in (
                    (self.running[0][0] if self.running else None, 0),
                    (self.rosters[0][0] if self.rosters else None, 1),
                    (self.held, 2),
                )
                if when is not None and when <= t
            ]
            if not due:
                return
            when, kind = min(due)
            self.now = max(self.now, when)
            if kind == 0:
                self._done(heapq.heappop(self.running)[2])
            elif kind == 1:
                at, roster = self.rosters.popleft()
                for change in self.timeline.update(roster, at):
                    if not change.speaker.is_bot:
                        self.turns.lag.roster_changed(
                            change.time, change.speaker.key, change.speaking
                        )
            else:
                self.held = None
                self._flush()

    def run(self) -> list[tuple[float, dict[str, Any]]]:
        block = round(BLOCK * ASR_RATE)
        first = round(self.phase * ASR_RATE) or block
        edges = itertools.chain(range(first, len(self.samples), block), [len(self.samples)])
        for edge in edges:
            arrival = edge / ASR_RATE
            self._until(arrival)
            self.now = arrival
            fed, self.fed = self.samples[self.fed : edge], edge
            for event in self.vad_events.feed(fed):
                if isinstance(event, SpeechStarted):
                    self.policy.speech_started(event.sample / ASR_RATE)
                    t = event.sample / ASR_RATE
                    self.turns.voice_started(t, t, event.quiet / ASR_RATE)
                elif isinstance(event, SpeechPaused):
                    self._paused(event.sample / ASR_RATE)
                elif isinstance(event, SpeechEnded):
                    self._pump(self.policy.speech_ended(event.sample / ASR_RATE))
            self.policy.lanes_busy(self.use.share(arrival))
            self._pump(self.policy.advance(arrival))
        # The bot hangs up: what was heard is final (the pipeline's cut).
        self._pump(self.policy.speech_ended(self.now))
        for request in self.waiting:
            self._submit(request)
        self.waiting = []
        while self.running:
            self._until(self.running[0][0])
        self._flush(hold=False)  # the session ends: no roster comes any more
        return self.received


def _row(scores: list[Any], offline: tuple[float, float], attributed: bool) -> dict[str, Any]:
    """Scores pooled, against the two offline references: windows cut at pauses
    (``recognize``) and faster-whisper's own loop over the whole audio."""
    row = tm.summarize(scores)
    if not attributed:
        for key in ("attribution", "unattributed", "confusions", "errors_at_turn_edges"):
            row.pop(key, None)
    return row | tm.against_offline(row["streaming_wer"], *offline)


def term_recall(reference: list[str], said: list[str], terms: list[str]) -> dict[str, Any]:
    """How many times the reference says one of ``terms``, and how many of those the
    transcript writes (each term's count, at most the reference's)."""
    wanted = Counter(w for t in terms for w in norm_words(t))
    ref = Counter(w for w in reference if w in wanted)
    got = Counter(w for w in said if w in wanted)
    written = sum(min(n, got[w]) for w, n in ref.items())
    return {"terms_said": sum(ref.values()), "terms_written": written}


def cost(replays: list[Replay]) -> dict[str, Any]:
    """What the recognitions the replays made cost the engine: seconds, and seconds per
    second of audio they heard (the real cost, beside the modelled clock's)."""
    seconds = sum(r.compute for r in replays)
    heard = sum(r.audio_heard for r in replays)
    return {
        "compute_seconds": round(seconds, 2),
        "compute_rtf": round(seconds / max(heard, 1e-9), 4),
    }


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = shared_engine(Settings(model=args.model))
    terms = list(keywords.parse(args.keywords, "--keywords"))
    out: dict[str, Any] = {
        "policy": args.policy,
        "keywords": terms,
        "roster_keywords": args.roster_keywords,
        "lanes": args.lanes,
        "vad": args.vad,
        "noise": args.noise,
        "runs": [],
        "pooled": [],
    }
    lags: list[float | None] = list(args.lags) or [None]
    for name in args.conversations.split(","):
        conv = build(name, args.cache, ASR_RATE)
        if args.offset or args.seconds or args.lead:  # as a meeting of the live benchmark
            conv = meeting_audio(conv, args.seconds, args.offset, args.lead)
        if noise := parse_noise(args.noise):
            conv = mix(conv, *noise)
        reference = conv.text()
        heard: dict[tuple[int, int, bool, str | None], tuple[HypWord, ...]] = {}
        # Offline hears the whole meeting: every name on its roster from the start.
        everyone = Vocabulary(terms, args.roster_keywords)
        everyone.people(p for p, _ in conv.speakers)
        offline = offline_wers(conv, engine, everyone.prompt)
        # Whether or not they were given: how many of them each run writes as said.
        expected = [*terms, *(person for person, _ in conv.speakers), *args.score_terms]
        for lag in lags:
            scores, replays = [], []
            for load, phase in itertools.product(args.loads, args.phases):
                replay = Replay(
                    engine,
                    conv.at_rate(ASR_RATE),
                    args.partial_interval,
                    args.max_utterance,
                    load,
                    phase,
                    heard,
                    None if lag is None else conv.roster_script(lag),
                    args.overhead,
                    args.rtf,
                    args.lanes,
                    args.vad,
                    Vocabulary(terms, args.roster_keywords),
                )
                scores.append(tm.score(conv.turns, replay.run(), lambda t: t))
                row = {"conversation": name, "load": load, "phase": phase, "policy": args.policy}
                if lag is not None:
                    row |= {"lag": lag, "lag_learnt": round(replay.turns.lag.seconds, 3)}
                row |= _row(scores[-1:], offline, lag is not None)
                row |= {"early_finals": {"used": replay.early_used, "wasted": replay.early_wasted}}
                row |= cost([replay])
                replays.append(replay)
                row |= term_recall(reference, scores[-1]["said"], expected)
                out["runs"].append(row)
                print(json.dumps(row), file=sys.stderr)
            # Every timing's words together: the figure to compare policies by.
            lagged = {} if lag is None else {"lag": lag}
            pooled = {"conversation": name, "runs": len(scores), **lagged}
            pooled |= _row(scores, offline, lag is not None) | cost(replays)
            pooled |= term_recall(reference * len(scores), tm.pool(scores)["said"], expected)
            out["pooled"].append(pooled)
            print("pooled", json.dumps(pooled), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", default="dialogue,monologue,meeting,standup,read")
    parser.add_argument("--loads", type=_floats, default=[1.0])
    parser.add_argument("--phases", type=_floats, default=[0.0, 0.02, 0.04, 0.06, 0.08])
    lags = "roster timings to attribute words at, seconds late (negative: early)"
    parser.add_argument("--lags", type=_floats, default=[], help=lags)
    defaults = Settings()
    parser.add_argument("--partial-interval", type=float, default=defaults.partial_interval)
    parser.add_argument("--max-utterance", type=float, default=defaults.max_utterance)
    parser.add_argument(
        "--cache", type=Path, default=Path.home() / ".cache/meeting-gateway/conversations"
    )
    parser.add_argument("--offset", type=float, default=0.0, help="start this fraction in")
    parser.add_argument("--seconds", type=float, default=0.0, help="loop to this length")
    parser.add_argument("--lead", type=float, default=0.0, help="seconds of silence first")
    parser.add_argument("--model", default=Settings().model)
    parser.add_argument("--lanes", type=int, default=LANES, help="recognition lanes")
    parser.add_argument("--vad", default=defaults.vad, help="voice activity model")
    parser.add_argument("--noise", default="", help="background noise, KIND:SNR (typing:20)")
    parser.add_argument("--overhead", type=float, default=OVERHEAD, help="seconds per call")
    parser.add_argument("--rtf", type=float, default=RTF, help="seconds per second of audio")
    parser.add_argument("--keywords", default="", help="terms to expect, comma-separated")
    parser.add_argument(
        "--roster-keywords", action="store_true", help="expect the names the roster marks"
    )
    parser.add_argument(
        "--score-terms",
        type=lambda text: keywords.split(text),
        default=[],
        help="terms to count as written or not, besides the keywords and the speakers' names",
    )
    parser.add_argument(
        "--policy",
        default="",
        help="override the policy's constants to try a tuning, e.g. FORCE_AGE=1.5,PAD=0.3",
    )
    args = parser.parse_args(argv)
    overrides = {}
    for item in filter(None, args.policy.split(",")):
        name, _, value = item.partition("=")
        if not isinstance(getattr(policy, name, None), float):
            parser.error(f"--policy: {name} is not a tunable constant of the policy")
        overrides[name] = float(value)
    saved = {name: getattr(policy, name) for name in overrides}
    vars(policy).update(overrides)
    try:
        out = run(args)
    finally:
        vars(policy).update(saved)  # called in-process (the tests), the policy is as it was
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
