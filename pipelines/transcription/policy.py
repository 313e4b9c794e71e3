"""The streaming policy: when to ask for recognition, and what each answer means.

Sans-I/O: it sees speech boundaries and hypotheses, in seconds on the session clock,
and answers with :class:`Request` objects (recognize this span of audio) and
:class:`Draft` results. It never touches audio, threads or the event loop.

The rules:

- Speech is gated by the ingest VAD. An utterance's audio runs from ``PAD`` before the
  VAD's start to ``PAD`` after its end (never reaching back over the previous one).
- While a person speaks, a partial is requested every ``partial_interval`` seconds of
  audio (the first once ``first_partial`` seconds are in). Each partial re-recognizes the
  open segment from its start, or, once words are confirmed, at least ``PARTIAL_SPAN``
  seconds back from its end (``LONG_SPAN`` while the recognition lanes have time to
  spare: :meth:`StreamingPolicy.lanes_busy`), and a second further back after each
  partial in a row that wrote nothing of the confirmed words it heard.
- Words are *confirmed* by agreement: the longest common prefix of the latest
  hypothesis and the newest one of audio ending ``AGREE_SPAN`` or more earlier (after
  the words already confirmed) is confirmed, and a confirmed word is never changed or
  dropped afterwards (LocalAgreement-2, with partials every half second compared a
  second apart). Words heard surely (``QUICK_PROBABILITY``) with ``QUICK_MARGIN`` of
  audio after them need only agree with the previous hypothesis. Words within
  ``CONFIRM_MARGIN`` of the end of the audio heard wait for more context, and
  hypotheses of less than ``CONFIRM_CONTEXT`` seconds of audio confirm nothing. A word
  with ``FORCE_AGE`` seconds of audio after it is confirmed, agreement or not, which
  bounds how late any word becomes final; such words go as most of the last ``VOTE``
  hypotheses read them (:func:`~.sequences.majority`), the latest one on a tie. Words
  after a silence of the newest hypothesis in which an older one wrote a phrase
  (:func:`~.sequences.gap_in`) wait, for up to ``GAP_TRIES`` partials in a row: once
  they are confirmed, the phrase could never be.
- Confirmed words are *final* at once (``is_final``, not ``speech_final``), without
  waiting for the speaker to pause, split at sentence ends and at pauses of ``SPLIT_PAUSE``.
  Partials show only the words not final yet. In a conversation the VAD rarely ends,
  so this is what keeps finals a second or two behind the voice.
- The utterance's end brings a ``speech_final``: the words not yet final, followed by
  the final hypothesis' words after the confirmed ones, matched by word sequence, else
  by time. It recognizes only the audio from shortly before the last confirmed words
  (``RECHECK_CONTEXT``), not the whole segment again; the confirmed words re-heard there
  anchor the new ones and are never repeated.
- A segment reaching ``max_utterance`` is split after its last confirmed word: the
  confirmed words not yet final become a final at once, and the next segment starts
  ``RECHECK_CONTEXT`` before their end, holding the confirmed words there as already
  final: they give Whisper its left context and anchor the words after them, so nothing
  is duplicated, lost or misheard for starting mid-phrase. With no confirmed word to
  split at (none, or only those carried into the segment), the whole segment is
  finalized as it is.

Every word reaches exactly one final: a segment's confirmed words are counted as they
are released, and each final carries only words after the last one released.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .drafts import Draft, Request
from .sequences import agreement, gap_in, majority, skipped_head, split_sentences, tail_after
from .words import HypWord

#: Audio kept before the VAD's start and after its end: soft onsets and trailing
#: consonants fall just outside what webrtcvad calls voiced.
PAD = 0.2
#: Shorter speech is not worth a recognition (webrtcvad blips, clicks).
MIN_SPEECH = 0.2
#: Words ending this close to the end of the audio heard are not confirmed yet: with
#: little right context Whisper still revises them, even twice in a row.
CONFIRM_MARGIN = 0.5
#: A final re-hears at least this much already-confirmed speech before the words still
#: open, instead of the whole segment: Whisper needs some left context, and the
#: re-heard words anchor the new ones to the confirmed (:func:`tail_after`).
RECHECK_CONTEXT = 1.0
#: A partial hears at least this much audio (or the whole segment, if shorter), and
#: starts where a final would when that leaves more.
PARTIAL_SPAN = 4.0
#: A word heard with this much audio after it is confirmed without agreement: words
#: are final at most about this long, plus a partial interval, after they were said.
#: On the replay 1.7 s rather than 2.0 s takes p95 from 2.3-2.7 s to 2.1-2.45 s for
#: about 1 % more errors (449 against 444 over the four recipes). Waiting longer for a
#: word no earlier hypothesis heard the same gained no accuracy and cost 0.2 s at p95.
FORCE_AGE = 1.7
#: Hypotheses of less audio than this are shown but take no part in agreement: on a
#: second or two, tiny.en agrees with itself on wrong words ("How do you marry" for
#: "Had he married") and only more context corrects them.
CONFIRM_CONTEXT = 2.5
#: Words are confirmed by two hypotheses that agree and are this much audio apart (or
#: more): hypotheses of nearly the same audio share their mistakes ("and is" for
#: "prudently in his" in both of two hypotheses 0.5 s apart), ones a second apart less so.
AGREE_SPAN = 0.9
#: Words with this much audio after them in the newest hypothesis, and heard with at
#: least ``QUICK_PROBABILITY``, are confirmed by agreement with a hypothesis only
#: ``QUICK_SPAN`` older (the previous partial): with right context and confidence,
#: consecutive hypotheses rarely share a mistake. On the replay this takes the median
#: word 0.1-0.2 s sooner to its final at the same WER; without the probability floor,
#: read speech gets "old, I suppose" for "ill disposed" from two partials in a row.
QUICK_MARGIN = 0.6
QUICK_SPAN = 0.4
QUICK_PROBABILITY = 0.7

#: With recognition to spare, partials hear up to this much: Whisper mishears less with
#: more context before a word. On the replay (load 1, ten timings) 8 s rather than 4 s
#: took the errors over the four recipes from 874 to 825, most of it on the
#: conversations; a partial of 8 s costs about twice one of 4 s.
LONG_SPAN = 8.0
#: The lanes' recent share of time busy (:class:`~.scheduler.LaneUse`) over which partials go
#: back to ``PARTIAL_SPAN``, and under which they hear ``LONG_SPAN`` again: under load every
#: partial is as cheap as before; the gap keeps the span from changing at every partial.
BUSY = 0.7
SPARE = 0.4
#: Partials in a row that wrote none of the confirmed words in their audio
#: (:func:`~.sequences.skipped_head`) confirm nothing; the next is taken as going on
#: from them: a voice Whisper keeps skipping holds words back a second and a half.
SKIP_TRIES = 2
#: Words forced at ``FORCE_AGE`` go as most of the last this many hypotheses read them
#: (of those that heard them with ``CONFIRM_MARGIN`` after them; the newest on a tie).
#: tiny.en's readings of words it is unsure of flip between partials ("I finished",
#: "today I finished"), and the newest was wrong for a fifth of the stand-up's forced
#: words. On the replay: 312 errors against 321 over three conversations; counting only
#: older readings with 0.8 or 1 s after the words, 319 and 324.
VOTE = 3
#: Partials in a row whose words after a silence are held back because an older
#: hypothesis wrote words in it (:func:`~.sequences.gap_in`); the next confirms them.
GAP_TRIES = 2


class StreamingPolicy:
    """One session's streaming state. Feed it in clock order; act on what it returns.

    After :meth:`speech_started`, call :meth:`advance` whenever more audio is available
    and submit each returned request. Report every request's outcome exactly once, with
    :meth:`recognized` or :meth:`skipped`; finals must be reported in request order.
    """

    def __init__(
        self, partial_interval: float, max_utterance: float, first_partial: float = 0.5
    ) -> None:
        self.partial_interval = partial_interval
        self.max_utterance = max_utterance
        self.first_partial = min(first_partial, partial_interval)
        self.span = PARTIAL_SPAN
        """Audio a partial hears at least: see :meth:`lanes_busy`."""
        self._ids = 0
        self.utterance = 0
        self.segment = 0
        self.speaking = False
        self._speech_start = 0.0
        self._seg_start = 0.0
        self._floor = 0.0  # no request reaches back before this (the last final's end)
        self._confirmed: list[HypWord] = []
        self._released = 0  # confirmed words of the segment already final
        self._previous: list[HypWord] = []  # last partial's words after the confirmed
        self._skips = 0  # partials in a row that skipped the confirmed words
        self._gaps = 0  # partials in a row held back at words older ones wrote
        # The utterance's hypotheses (segment, heard until, words); gap_in reads all of them.
        self._heard: deque[tuple[int, float, tuple[HypWord, ...]]] = deque(maxlen=8)
        self._partial_pending = False
        self._shown = False
        self._cadence = 0.0  # when the last partial was due
        self.emitted_words = 0

    def _request(
        self, kind: str, end: float, *, speech_final: bool, speech_end: float | None = None
    ) -> Request:
        self._ids += 1
        return Request(
            self._ids,
            kind,
            self.utterance,
            self.segment,
            self._resume_at() if kind == "final" else self._partial_start(end),
            end,
            tuple(self._confirmed),
            self._released,
            speech_final,
            self._speech_start,
            speech_end,
            not self._shown,
        )

    def _new_segment(self, start: float) -> None:
        self.segment += 1
        self._seg_start = max(start, self._floor)
        self._confirmed = []
        self._released = 0
        self._previous = []
        self._skips = 0
        self._gaps = 0
        self._partial_pending = False
        self._shown = False
        self._cadence = self._seg_start

    def _resume_at(self, context: float = RECHECK_CONTEXT) -> float:
        """Where a final's audio starts: at a word boundary ``context`` seconds or more
        before the end of the confirmed words (the segment's start if none)."""
        words = self._confirmed
        i = len(words) - 1
        while i > 0 and words[i].start > words[-1].end - context:
            i -= 1
        if i <= 0:
            return self._seg_start
        return max(self._seg_start, (words[i - 1].end + words[i].start) / 2)

    def _partial_start(self, end: float) -> float:
        """Where a partial ending at ``end`` starts (see ``PARTIAL_SPAN`` and ``span``),
        reaching a further ``RECHECK_CONTEXT`` back after each partial in a row that
        skipped the confirmed words."""
        context = RECHECK_CONTEXT * (1 + self._skips)
        return max(self._seg_start, min(self._resume_at(context), end - self.span))

    def lanes_busy(self, share: float) -> None:
        """The recognition lanes were busy ``share`` (0-1) of the last few seconds:
        partials hear ``LONG_SPAN`` while there is recognition to spare."""
        if share >= BUSY:
            self.span = PARTIAL_SPAN
        elif share <= SPARE:
            self.span = max(PARTIAL_SPAN, LONG_SPAN)

    def speech_started(self, t: float) -> None:
        """The VAD heard speech begin at ``t``."""
        if self.speaking:
            return
        self.speaking = True
        self.utterance += 1
        self._speech_start = t
        self._heard.clear()
        self._new_segment(t - PAD)
        self._cadence = t  # the first partial waits for speech, not the pad

    def ending(self, t: float) -> Request | None:
        """The final :meth:`speech_ended` would ask for if speech ended at ``t``, without
        ending it: recognized at a pause, it is ready if the pause becomes the end."""
        if self.speaking and (t - self._speech_start >= MIN_SPEECH or self._confirmed):
            return self._request("final", t + PAD, speech_final=True, speech_end=t)
        return None

    def speech_ended(self, t: float) -> list[Request | Draft]:
        """The VAD heard speech end at ``t``; returns the final request, if any."""
        if not self.speaking:
            return []
        final = self.ending(t)
        self.speaking = False
        self._floor = max(self._floor, t + PAD)
        self._partial_pending = False
        return [final] if final is not None else []

    def advance(self, t: float) -> list[Request | Draft]:
        """Audio is available up to ``t``: partials due, or a split at the maximum length."""
        if not self.speaking:
            return []
        out: list[Request | Draft] = []
        if t - self._seg_start >= self.max_utterance:
            out.extend(self._split(t))
        # Until a partial has shown words, ask again at the short first interval.
        interval = self.partial_interval if self._shown else self.first_partial
        due = self._cadence + interval
        if not self._partial_pending and t >= due - 1e-6:
            self._partial_pending = True
            # Keep the cadence whatever the blocks (100 ms at 24 kHz leaves the resampler
            # as 92 or 122 ms: counting from the block that crossed the interval spaced
            # partials 0.58 s apart); one that waited for the last starts half an interval on.
            self._cadence = max(due, t - interval / 2)
            out.append(self._request("partial", t, speech_final=False))
        return out

    def _split(self, t: float) -> list[Request | Draft]:
        out: list[Request | Draft] = [*self._release(None)]
        resume = self._resume_at()
        if resume > self._seg_start:
            # The next segment starts on the last confirmed words, already final: left
            # context and an anchor for the words after them, where audio cut right before
            # a word loses or mishears its start ("and is" for "prudently in his").
            carried = [w for w in self._confirmed if w.start >= resume]
            self._floor = resume
            self._new_segment(resume)
            self._confirmed = carried
            self._released = len(carried)
            self._shown = True
            return out
        # Nothing confirmed to resume at past the segment's start: the rest of it is
        # finalized as it is (starting the next at the last partial's words lost some).
        out.append(self._request("final", t, speech_final=False))
        self._floor = t
        self._new_segment(t)
        return out

    def _release(self, request: Request | None) -> list[Draft]:
        """Every confirmed word not yet final, as finals split at sentence ends and pauses."""
        words = self._confirmed[self._released :]
        self._released = len(self._confirmed)
        self.emitted_words += len(words)
        return [Draft(tuple(w), True, False, request) for w in split_sentences(words)]

    def _segment_heard(self) -> list[tuple[float, tuple[HypWord, ...]]]:
        return [(end, words) for seg, end, words in self._heard if seg == self.segment]

    def _earlier(self, end: float, span: float) -> list[HypWord]:
        """What the newest hypothesis of audio ending ``span`` or more before ``end``
        heard after the confirmed words (nothing if there is none)."""
        for heard_until, words in reversed(self._segment_heard()):
            if heard_until <= end - span + 1e-6:
                return tail_after(self._confirmed, words)
        return []

    def _agreed(
        self, tail: list[HypWord], end: float, span: float, margin: float, sure: float = 0.0
    ) -> int:
        """How many of ``tail``'s first words a hypothesis ``span`` older agrees with,
        up to the last one ending ``margin`` or more before ``end`` and before the first
        one heard with a probability under ``sure``."""
        agreed = agreement(self._earlier(end, span), tail)
        unsure = next((i for i, w in enumerate(tail[:agreed]) if w.probability < sure), agreed)
        agreed = min(agreed, unsure)
        while agreed and tail[agreed - 1].end > end - margin:
            agreed -= 1
        return agreed

    def skipped(self, request: Request) -> None:
        """The scheduler dropped a partial request (finals are never skipped)."""
        if request.kind == "partial" and self._current(request):
            self._partial_pending = False

    def _current(self, request: Request) -> bool:
        at = (request.utterance, request.segment)
        return self.speaking and at == (self.utterance, self.segment)

    def recognized(
        self, request: Request, words: Sequence[HypWord], *, sure: bool = True
    ) -> list[Draft]:
        """The words recognized for ``request``; returns what to publish, finals first.

        ``sure`` False: a partial decoded in a language only guessed; it is shown but
        confirms nothing, as a hypothesis of too little audio, and so does one that
        skipped the confirmed words (:func:`~.sequences.skipped_head`)."""
        if request.kind == "final":
            tail = tail_after(request.confirmed, words)
            final = (*request.confirmed[request.released :], *tail)
            self.emitted_words += len(final)
            return [Draft(final, is_final=True, speech_final=request.speech_final, request=request)]
        if not self._current(request):  # its segment was finalized meanwhile
            if self.speaking and request.utterance == self.utterance and sure:
                self._heard.append((request.segment, request.end, tuple(words)))
            return []
        self._partial_pending = False
        tail = tail_after(self._confirmed, words)
        # Whisper skips the same words again from the same start ("... for us?" before
        # another voice reads on, unwritten until a split 9 s later). More context before
        # them gets them written, where the segment has it.
        skipped = skipped_head(self._confirmed, words, request.start)
        self._skips = self._skips + 1 if skipped else 0
        if self._skips > SKIP_TRIES:
            tail, skipped = list(words), False
        sure = sure and not skipped
        if request.end - self._seg_start < CONFIRM_CONTEXT or not sure:
            shown = (*self._confirmed[self._released :], *tail)
            self._shown = self._shown or bool(shown)
            return [Draft(shown, False, False, request)] if shown else []
        agreed = max(
            self._agreed(tail, request.end, AGREE_SPAN, CONFIRM_MARGIN),
            self._agreed(tail, request.end, QUICK_SPAN, QUICK_MARGIN, QUICK_PROBABILITY),
        )
        self._heard.append((self.segment, request.end, tuple(words)))
        # Disagreeing hypotheses must not hold words back long: a word with FORCE_AGE of audio
        # after it is as good as one more hypothesis makes it. Its marks ("-hearted") go with it.
        forced = agreed
        while forced < len(tail) and tail[forced].end <= request.end - FORCE_AGE:
            forced += 1
        if forced > agreed:  # unless the hypotheses before it read them otherwise
            head, enough = [*self._confirmed, *tail[:agreed]], tail[forced - 1].end + CONFIRM_MARGIN
            older = [h for end, h in self._segment_heard()[-VOTE:-1] if end >= enough]
            if (chosen := majority(head, tail[agreed:forced], older)) is not None:
                tail = [*tail[:agreed], *chosen, *tail_after([*head, *chosen], words)]
                forced = agreed + len(chosen)
        # Nothing past a phrase this hypothesis left out is confirmed, for a few partials.
        held = len(tail)
        if self._gaps < GAP_TRIES:
            after = self._confirmed[-1].end if self._confirmed else self._seg_start
            older_all = [(end, h) for _, end, h in list(self._heard)[:-1]]
            held = gap_in(tail, after, older_all, CONFIRM_MARGIN)
        self._gaps = self._gaps + 1 if held < forced else 0
        agreed = min(forced, held)
        while 0 < agreed < len(tail) and tail[agreed].attached:
            agreed -= 1
        self._confirmed.extend(tail[:agreed])
        self._previous = tail[agreed:]
        out = self._release(request) if agreed else []
        shown = (*self._confirmed[self._released :], *self._previous)
        if agreed or shown:
            self._shown = True
        if shown:
            out.append(Draft(shown, is_final=False, speech_final=False, request=request))
        return out

    @property
    def segment_start(self) -> float:
        """Where the open segment's audio begins; earlier audio is no longer needed."""
        return self._seg_start

    @property
    def confirmed(self) -> tuple[HypWord, ...]:
        return tuple(self._confirmed)
