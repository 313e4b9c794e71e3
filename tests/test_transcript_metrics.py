"""How the benchmarks score what a transcript subscriber received (pure functions)."""

from __future__ import annotations

from typing import Any

from benchmarks import transcript_metrics as tm
from benchmarks.conversations import Turn

WORDS = ("one", "two", "three", "four", "five", "six")
TURN = Turn("Ann", 1, " ".join(WORDS), 0.0, 6.0, WORDS)


def results(words: list[str], *, final: bool, at: float) -> tuple[float, dict[str, Any]]:
    """A Results message carrying ``words``, word ``i`` at ``[i, i + 0.8)`` s."""
    timed = [
        {"word": w, "start": float(i), "end": i + 0.8, "speaker": 1}
        for i, w in enumerate(words)
        if w
    ]
    message = {
        "type": "Results",
        "is_final": final,
        "speech_final": False,
        "start": 0.0,
        "duration": 6.0,
        "channel": {"alternatives": [{"transcript": " ".join(words), "words": timed}]},
    }
    return at, message


def test_a_word_the_model_heard_differently_is_lost_but_not_without_a_final() -> None:
    said = ["one", "two", "tree", "four", "five", "six"]
    received = [
        results(list(WORDS), final=False, at=3.0),
        results(said, final=True, at=7.0),
    ]
    s = tm.score([TURN], received, lambda t: t)
    assert s["words_matched"] == 5
    # The partial had "three" and no final did: counted lost, yet a final covers it.
    assert s["lost"] == ["three@2.4"]
    assert s["without_final"] == []


def test_a_stretch_no_final_covers_is_without_a_final() -> None:
    # Finals for the first half only: the second half's final never came.
    received = [
        results(list(WORDS), final=False, at=5.0),
        results(["one", "two", "three"], final=True, at=4.0),
    ]
    s = tm.score([TURN], received, lambda t: t)
    summary = tm.summarize([s])
    assert summary["words_without_final"] == 2  # "five" and "six": nothing within 1 s
    assert summary["words_lost"] == 3  # "four" too: a partial carried it
    row = {**summary, "finals_skipped": 0, "subscribers_dropped": 0}
    row.update(word_final_p50=1.0, word_final_p95=1.0, speech_final_p50=0.5)
    assert not tm.load_ok(row)
    row.update(words_without_final=0)
    assert tm.load_ok(row)
    assert not tm.load_ok({**row, "subscribers_dropped": 1})
