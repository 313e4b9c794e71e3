"""Word error rate, for the tests and the benchmark that hold transcripts to account."""

from __future__ import annotations

import re


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (hyphenated words split), as references are;
    letters of every script count (``días``, ``über``)."""
    return re.sub(r"[^\w' ]+|_", " ", text.lower().replace("-", " ")).split()


def wer(reference: list[str], hypothesis: list[str]) -> float:
    """Word error rate: word-level Levenshtein distance over the reference length."""
    prev = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        cur = [i]
        for j, h in enumerate(hypothesis, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1] / max(1, len(reference))
