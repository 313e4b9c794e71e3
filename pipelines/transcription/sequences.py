"""Word sequences compared and cut: the pure functions the streaming policy is made of.

:func:`tail_after` finds where a new hypothesis continues the words already confirmed,
:func:`skipped_head` tells when it cannot be known (the decode skipped them),
:func:`agreement` how far two hypotheses agree, :func:`gap_in` where a hypothesis left
out words older ones wrote, :func:`majority` which reading of words they disagree on
most of them share, and :func:`split_sentences` where words released together become
separate finals.
"""

from __future__ import annotations

from collections.abc import Sequence
from difflib import SequenceMatcher

from .finals import REPEAT_GUARD
from .words import HypWord, ends_sentence

#: Sequence matching trusts a match only if it lies within this many seconds of the
#: confirmed word's own time; otherwise the split falls back to timestamps.
MATCH_SLACK = 1.0
#: Words released together are split into separate finals where one word ends a
#: sentence or where this much silence separates two words.
SPLIT_PAUSE = 0.3
#: Word times of two decodes of the same audio differ by about this much, seconds.
SKIP_SLACK = 0.05
#: Words an older hypothesis wrote count as left out of a silence if they lie within it,
#: give or take this much (times of words next to a phrase left out drift further).
GAP_SLACK = 0.2


def tail_after(confirmed: Sequence[HypWord], hypothesis: Sequence[HypWord]) -> list[HypWord]:
    """The words of ``hypothesis`` that come after the ``confirmed`` ones.

    The confirmed words are found in the hypothesis by word sequence; when the
    hypothesis no longer ends them the same way, by time (words centred after the last
    confirmed word's end).
    """
    if not confirmed:
        return list(hypothesis)
    anchor = _anchor(confirmed, hypothesis)
    if anchor is not None:
        return list(hypothesis[anchor:])
    last = confirmed[-1]
    c = [w.norm for w in confirmed]
    tail = [w for w in hypothesis if (w.start + w.end) / 2 > last.end]
    # Timestamps of re-heard audio drift: words already confirmed can come back shifted
    # past the last one. Confirmed words repeated at the head of the tail are that.
    for k in range(min(len(c), len(tail)), REPEAT_GUARD - 1, -1):
        if [w.norm for w in tail[:k]] == c[-k:]:
            return tail[k:]
    return tail


def _anchor(confirmed: Sequence[HypWord], hypothesis: Sequence[HypWord]) -> int | None:
    """Where ``hypothesis`` goes on after the ``confirmed`` words, found by word
    sequence: the index after its match of the last confirmed word, or ``None``."""
    c = [w.norm for w in confirmed]
    h = [w.norm for w in hypothesis]
    blocks = [
        b for b in SequenceMatcher(None, c, h, autojunk=False).get_matching_blocks() if b.size
    ]
    if blocks:
        b = blocks[-1]
        if b.a + b.size == len(c):
            matched = hypothesis[b.b + b.size - 1]
            if abs(matched.end - confirmed[-1].end) <= MATCH_SLACK:
                return b.b + b.size
    return None


def skipped_head(confirmed: Sequence[HypWord], hypothesis: Sequence[HypWord], since: float) -> bool:
    """Whether ``hypothesis``, a decode of audio from ``since`` seconds, skipped the
    confirmed words in it: it does not go on from them by word sequence, it wrote no
    word before the last one, and its first word spans that one's end.

    Such a decode times the first word it writes from where the skipped ones began
    ("as" of "the same. As far as" as 52.64-53.00 s, over "same." at 52.52-52.86 s), so
    neither that word's time nor what else it skipped tells where it follows the
    confirmed words: taken by time, "as" was lost; taken as the next word, "what" was
    confirmed with "Ravi" before it lost. With no other confirmed word in the audio,
    the first word is the last confirmed one heard anew ("prudently" for "and").
    """
    if len(confirmed) < 2 or not hypothesis or confirmed[-2].start < since:
        return False
    first, last = hypothesis[0], confirmed[-1]
    if not first.start < last.end - SKIP_SLACK < first.end or first.norm == last.norm:
        return False
    # Checked last: the sequence match is the costly part, and rarely needed.
    return _anchor(confirmed, hypothesis) is None


def gap_in(
    tail: Sequence[HypWord],
    after: float,
    older: Sequence[tuple[float, Sequence[HypWord]]],
    margin: float,
    least: int = 2,
) -> int:
    """The index of the first word of ``tail`` (a hypothesis' words after the confirmed
    ones, which end at ``after``) before which it left out ``least`` or more words in a
    row that one of the ``older`` hypotheses, ``(heard until, words)``, wrote in the
    silence it has there; ``len(tail)`` if there is none.

    Only words an older hypothesis heard with ``margin`` of audio after them count.
    Whisper leaves out a phrase at times ("then let's plan a quick check" of a sentence
    another voice talks over), and two decodes of nearly the same audio can both leave
    it out: agreeing on the words after it, they would confirm them, and the phrase
    could never be final.
    """
    keys = [w.norm for w in tail]
    first = len(tail)
    for until, words in older:
        heard = [w for w in words if (w.start + w.end) / 2 > after]
        matcher = SequenceMatcher(None, [w.norm for w in heard], keys, autojunk=False)
        for op, i1, i2, j1, _j2 in matcher.get_opcodes():
            if op not in ("delete", "replace") or j1 >= first:
                continue
            lo = (tail[j1 - 1].end if j1 else after) - GAP_SLACK
            hi = min(tail[j1].start + GAP_SLACK, until - margin)
            if sum(lo <= w.start and w.end <= hi for w in heard[i1:i2]) >= least:
                first = j1
    return first


def split_sentences(words: Sequence[HypWord]) -> list[list[HypWord]]:
    """``words`` cut after each sentence end and at each pause of ``SPLIT_PAUSE``, never
    before an attached word."""
    out: list[list[HypWord]] = []
    for w in words:
        if out:
            last = out[-1][-1]
            joined = not ends_sentence(last.text) and w.start - last.end < SPLIT_PAUSE
            if joined or w.attached:
                out[-1].append(w)
                continue
        out.append([w])
    return out


def agreement(a: Sequence[HypWord], b: Sequence[HypWord]) -> int:
    """Length of the common prefix of two word sequences, compared normalized, that ends
    where both end a written word: "so" of "so-called" agrees with neither "so called"
    nor "so-called" (the first would leave "-called" to start the next final)."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x.norm != y.norm or x.attached != y.attached:
            break
        n += 1
    while n and any(n < len(s) and s[n].attached for s in (a, b)):
        n -= 1
    return n


def majority(
    head: Sequence[HypWord], first: Sequence[HypWord], older: Sequence[Sequence[HypWord]]
) -> list[HypWord] | None:
    """Another reading of the words ``first`` (the newest hypothesis' words after the
    words ``head``) if more of the hypotheses ``older`` give it than give ``first``'s
    own, counting ``first``; ``None`` if none does. A reading that left out words ``first``
    wrote (:func:`gap_in`) is not counted.

    Each older hypothesis is read from the words after ``head`` to the end of ``first``'s
    last one, and compared as :func:`agreement` compares. The words a reading shares with
    ``first`` keep ``first``'s times: the newest hypothesis heard them with the most
    audio after them.
    """

    def key(s: Sequence[HypWord]) -> tuple[tuple[str, bool], ...]:
        return tuple((w.norm, w.attached) for w in s)

    until = first[-1].end
    after = head[-1].end if head else float("-inf")
    readings = [[w for w in tail_after(head, h) if (w.start + w.end) / 2 <= until] for h in older]
    # One that leaves out a phrase ``first`` wrote is no other reading of the same words.
    readings = [r for r in readings if gap_in(r, after, [(until, first)], 0.0) == len(r)]
    counts: dict[tuple[tuple[str, bool], ...], int] = {}
    for s in (first, *readings):
        counts[key(s)] = counts.get(key(s), 0) + 1
    best = max(readings, key=lambda s: counts[key(s)], default=first)
    if counts[key(best)] <= counts[key(first)]:
        return None
    out = list(best)
    matcher = SequenceMatcher(None, key(best), key(first), autojunk=False)
    for m in matcher.get_matching_blocks():
        out[m.a : m.a + m.size] = first[m.b : m.b + m.size]
    return out
