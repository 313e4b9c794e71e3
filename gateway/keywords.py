"""Words a meeting's transcript should expect: people's names, products, jargon. Sans-I/O.

Whisper writes a word it does not know the way it sounds: "Thanks you on" for "Thanks
Siobhan", "JOKEN said the Postker's migration" for "Joaquin said the Postgres
migration". Given those words in its prompt it writes them as given. A meeting's terms
come from three places, in this order:

- ``GATEWAY_KEYWORDS``: every meeting of the deployment (product names, say);
- the bot's URL, ``?keywords=Siobhan,Postgres``; on ``/v1/listen`` Deepgram's
  ``keywords=term:boost`` and ``keyterm=phrase``, each repeated per term (the boost is
  read and ignored: Whisper's prompt has no weights);
- with ``GATEWAY_ROSTER_KEYWORDS``, the names of the people on the meeting's roster
  (listening or speaking), the first :data:`MAX_NAMES` of them.

Every term must be printable and at most :data:`MAX_TERM_CHARS` long; a meeting takes at
most :data:`MAX_TERMS` terms and :data:`MAX_CHARS` characters of them in all, well within
the 223 prompt tokens Whisper keeps. A prompt is not free: on a 4 s window tiny.en took
69 ms with three terms against 50 ms without (it also writes a little more), and 76 ms
with twenty, so terms make a meeting's recognitions about a third dearer whatever their
number (``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

#: Terms a meeting takes, from every source together.
MAX_TERMS = 50
#: Characters of one term.
MAX_TERM_CHARS = 64
#: Characters of all of a meeting's terms, as the prompt spells them (about 120 tokens).
MAX_CHARS = 500
#: Names a meeting's roster adds: a webinar's hundreds would fill the prompt.
MAX_NAMES = 16

#: Deepgram's ``keywords=term:boost``: the boost, a number after the last colon.
_BOOST = re.compile(r":\s*-?\d+(\.\d+)?\s*$")


def split(text: str) -> list[str]:
    """The terms of a comma-separated list, spaces collapsed, Deepgram boosts dropped."""
    terms = []
    for item in text.split(","):
        term = " ".join(_BOOST.sub("", item).split())
        if term:
            terms.append(term)
    return terms


def checked(terms: Iterable[str], source: str) -> tuple[str, ...]:
    """``terms`` without repeats (case aside), in order; :class:`ValueError` naming
    ``source`` and the term for one that is not printable or too long, or too many."""
    out: dict[str, str] = {}
    for term in terms:
        if not _valid(term):
            raise ValueError(
                f"{source}: {term[:MAX_TERM_CHARS]!r} is not a term"
                f" (printable, at most {MAX_TERM_CHARS} characters)"
            )
        out.setdefault(term.casefold(), term)
    kept = tuple(out.values())
    if not _within(kept):
        raise ValueError(
            f"{source}: {len(kept)} terms; at most {MAX_TERMS} and {MAX_CHARS} characters in all"
        )
    return kept


def parse(text: str, source: str) -> tuple[str, ...]:
    """:func:`split`, then :func:`checked`."""
    return checked(split(text), source)


def _valid(term: str) -> bool:
    return term.isprintable() and len(term) <= MAX_TERM_CHARS


def _within(terms: tuple[str, ...]) -> bool:
    return len(terms) <= MAX_TERMS and len(prompt(terms) or "") <= MAX_CHARS


def prompt(terms: Iterable[str]) -> str | None:
    """What the recognizer is prompted with for ``terms``: None for none."""
    terms = list(terms)
    return ", ".join(terms) + "." if terms else None


class Vocabulary:
    """A meeting's terms: the deployment's, the session's (:meth:`joined`), then with
    ``roster`` the first :data:`MAX_NAMES` names of people on its roster
    (:meth:`people`). Terms past the bounds are left out; the session's are counted in
    :attr:`left_out`."""

    __slots__ = ("_names", "_prompt", "_terms", "left_out", "roster")

    def __init__(self, terms: Iterable[str] = (), roster: bool = False) -> None:
        self._terms = {t.casefold(): t for t in terms}
        self._prompt = prompt(self._terms.values())
        self._names = 0
        self.roster = roster
        self.left_out = 0

    @property
    def terms(self) -> tuple[str, ...]:
        return tuple(self._terms.values())

    @property
    def prompt(self) -> str | None:
        return self._prompt

    def joined(self, params: Mapping[str, str]) -> Vocabulary:
        """A copy with a session's terms: its ``keywords`` parameter, as :func:`split`
        reads it."""
        out = Vocabulary(self.terms, self.roster)
        for term in split(params.get("keywords", "")):
            if out._add(term) is False:
                out.left_out += 1
        return out

    def people(self, names: Iterable[str]) -> bool:
        """With ``roster``, the names of the people on the roster; whether any was new."""
        grew = False
        for name in names if self.roster else ():
            if self._names >= MAX_NAMES:
                break
            if self._add(name):
                self._names += 1
                grew = True
        return grew

    def _add(self, term: str) -> bool | None:
        """Add ``term`` if it is new: True if it was added, None if it is there already
        (or blank), False if it is past the bounds."""
        term = " ".join(term.split())
        if not term or term.casefold() in self._terms:
            return None
        grown = (*self._terms.values(), term)
        if not (_valid(term) and _within(grown)):
            return False
        self._terms[term.casefold()] = term
        self._prompt = prompt(grown)
        return True
