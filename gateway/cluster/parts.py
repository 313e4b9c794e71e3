"""Sessions that move between nodes that do not share a data directory.

Each node that serves a session appends a ``part`` line to its journal (node, directory,
first sample). The journal and the finals are also kept in Redis
(:class:`~.relay.TranscriptRelay`). When a node takes over a session whose last part's
files it cannot see (its journal there is missing, or is an older part of this node's
own), it starts a new part: a fresh directory whose ``journal.jsonl`` is the journal from
Redis and whose ``transcript.jsonl`` holds the finals so far. The session then resumes
there exactly as from a shared directory: same clock (the outage a gap), speakers,
transcript numbering and subscribers.

Each part's ``audio.wav`` is on the session clock, silent (a hole, no disk space) before
its node took over, so mixing the parts' files sample by sample gives the whole
recording (``sox -m -v 1 a.wav -v 1 b.wav meeting.wav``); ``session.json`` lists the
parts in order under ``parts``. The last part's ``transcript.json`` covers the whole
meeting.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..storage import journal

logger = logging.getLogger("gateway.cluster")


def needs_part(lines: list[str], key: str, root: Path) -> bool:
    """Whether the session the Redis ``lines`` describe must continue in a new part here:
    it is unfinished and its last part's journal is not in this node's data directory
    (``root``, where its session directories are)."""
    state = journal.fold(key, Path(), lines)
    if not state.rate or state.ended or not state.parts:
        return False
    last = Path(state.parts[-1]["directory"])
    if last.parent.resolve() != root.resolve():
        return True  # another node's data directory (it may be mounted here too)
    here = journal.unfinished_in(last)
    # The same journal (a shared directory): it knows every part the Redis copy knows.
    return here is None or len(here.parts) < len(state.parts)


def write_part(directory: Path, lines: list[str], finals: list[str]) -> None:
    """Start a part in ``directory`` (new) from the Redis copies. Blocking."""
    directory.mkdir(parents=True)
    for name, rows in ((journal.NAME, lines), ("transcript.jsonl", finals)):
        path = directory / name
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(row.rstrip("\n") + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())
