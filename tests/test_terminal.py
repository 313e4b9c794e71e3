"""``meeting-gateway watch`` and ``meeting-gateway sessions`` against a real gateway,
as subprocesses, plus the renderer on its own."""

from __future__ import annotations

import asyncio
import sys

from gateway.ingest.speakers import Speaker
from gateway.terminal import CLEAR_LINE, Renderer
from pipelines.transcription.formats import Message, deepgram
from pipelines.transcription.results import Result, Word

from .conftest import GatewayFactory, wait_for
from .test_transcript_outputs import ALICE, Bot, final, partial, start
from .timing import scaled

BOB = Speaker("id:2", 2, "Bob", False)


def test_a_terminal_sees_partials_rewritten_and_finals_kept() -> None:
    r = Renderer(live=True, colour=True, sessions=False)
    shown = r.feed(deepgram(partial(1)))
    assert "\x1b[2mp1\x1b[0m" in shown and "\n" not in shown  # the partial, dimmed
    line = r.feed(deepgram(final(1)))
    assert line.startswith(CLEAR_LINE) and line.endswith("\n")
    assert "00:01" in line and "Alice" in line and "W1x0. W1x1." in line
    # Each speaker keeps one colour.
    assert r.feed(deepgram(final(2))).split("Alice")[0][-8:] == line.split("Alice")[0][-8:]
    assert r.feed(deepgram(final(3, BOB))).split("Bob")[0][-8:] != line.split("Alice")[0][-8:]


def test_a_pipe_gets_plain_finals_only() -> None:
    r = Renderer(live=False, colour=False, sessions=True)
    assert r.feed(deepgram(partial(1))) == ""
    message = deepgram(final(65))
    message["session"] = "m1"
    assert r.feed(message) == "m1  01:05  Alice  W65x0. W65x1.\n"


def test_a_reconnection_replays_nothing_twice_even_when_it_lacks_the_last_finals() -> None:
    # After a kill the next process may not have the last finals the killed one sent:
    # what was printed is known by where it ends, not by how many finals there were.
    r = Renderer(live=False, colour=False, sessions=False)
    printed = [r.feed(deepgram(final(n))) for n in (1, 2, 3)]
    assert all(printed)
    r.reconnected()
    replay = [r.feed(deepgram(final(n))) for n in (1, 2)]  # final 3 never reached disk
    assert replay == ["", ""]
    assert r.feed(deepgram(final(4))) == "00:04  Alice  W4x0. W4x1.\n"
    # A clean restart replays every final: none printed again, the new ones printed.
    r.reconnected()
    assert [r.feed(deepgram(final(n))) for n in (1, 2, 3, 4)] == ["", "", "", ""]
    assert r.feed(deepgram(final(5))).startswith("00:05")


def test_a_session_started_again_under_the_same_key_is_printed_from_its_first_final() -> None:
    # A meeting that ends and a new one under the same key (its clock from 0 again, its
    # own request_id): after a reconnection the new one's finals are new, not a replay.
    r = Renderer(live=False, colour=False, sessions=False)
    first = {"request_id": "11111111-1111-4111-8111-111111111111", "model_info": {}}
    second = {"request_id": "22222222-2222-4222-8222-222222222222", "model_info": {}}
    assert all(r.feed(deepgram(final(n), first)) for n in (1, 2, 3))
    r.reconnected()
    assert r.feed(deepgram(final(1), first)) == ""  # the old run replayed: printed already
    assert r.feed(deepgram(final(1), second)) == "00:01  Alice  W1x0. W1x1.\n"
    assert r.feed(deepgram(final(2), second)).startswith("00:02")


def said(
    at: float, text: str, speaker: Speaker = ALICE, *, final: bool = True, end: bool = False
) -> Message:
    """A ``Results`` message of ``text`` (words 0.3 s apart from ``at``)."""
    words = tuple(
        Word(w.strip(".,?!").lower(), w, at + 0.3 * i, at + 0.3 * i + 0.25, 0.9, speaker)
        for i, w in enumerate(text.split())
    )
    result = Result(at, words[-1].end, words, is_final=final, speech_final=end)
    return deepgram(result)


def test_a_pipe_gets_a_line_per_turn_once_it_ends() -> None:
    # Progressive finals come a few words at a time: a transcript file reads a line per
    # speaker turn, written once the turn ends (speech_final), someone else speaks, or a
    # sentence ends a long enough line.
    r = Renderer(live=False, colour=False, sessions=False)
    assert r.feed(said(1.0, "Good morning,")) == ""
    assert r.feed(said(1.6, "Sarah.")) == ""
    assert r.feed(said(2.0, "Thanks for joining", final=False)) == ""
    assert r.feed(said(2.0, "Thanks for joining")) == ""
    assert r.feed(said(3.0, "on such short notice.", end=True)) == (
        "00:01  Alice  Good morning, Sarah. Thanks for joining on such short notice.\n"
    )
    assert r.feed(said(4.0, "No problem")) == ""
    assert r.feed(said(5.0, "Right,", BOB)) == "00:04  Alice  No problem\n"
    assert r.flush() == "00:05  Bob  Right,\n"
    assert r.flush() == ""
    # A long turn with no pause: a line for each sentence past 60 characters.
    long = "one two three four five six seven eight nine ten eleven twelve."
    assert r.feed(said(10.0, long)) == f"00:10  Alice  {long}\n"
    assert r.feed(said(14.0, "And more")) == ""
    assert r.feed({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 15.0}) == (
        "00:14  Alice  And more\n"
    )


def test_every_session_into_a_pipe_gets_each_session_a_line_per_turn() -> None:
    r = Renderer(live=False, colour=False, sessions=True)

    def of(session: str, message: Message) -> Message:
        return {**message, "session": session}

    assert r.feed(of("m1", said(1.0, "Good morning,"))) == ""
    assert r.feed(of("m2", said(1.2, "Can you hear"))) == ""
    assert (
        r.feed(of("m1", said(1.6, "Sarah.", end=True)))
        == "m1  00:01  Alice  Good morning, Sarah.\n"
    )
    assert r.feed(of("m2", said(2.0, "me?", BOB))) == "m2  00:01  Alice  Can you hear\n"
    end = {"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": 2.5, "session": "m1"}
    assert r.feed(end) == ""  # m1 has no line open; m2's stays open
    assert r.flush() == "m2  00:02  Bob  me?\n"


def test_a_terminal_sees_a_turn_grow_with_its_partial_on_one_row() -> None:
    r = Renderer(live=True, colour=False, sessions=False, width=60)
    assert r.feed(said(1.0, "Good morning,")) == f"{CLEAR_LINE}00:01  Alice  Good morning,"
    row = r.feed(said(1.6, "Sarah. Thanks", final=False))
    assert row == f"{CLEAR_LINE}00:01  Alice  Good morning, Sarah. Thanks"
    # A partial too long for the row shows its newest words: nothing wraps.
    row = r.feed(said(1.6, "Sarah. " + "very " * 20 + "end", final=False))
    assert row.startswith(f"{CLEAR_LINE}00:01  Alice  Good morning, …") and row.endswith("end")
    assert len(row) - len(CLEAR_LINE) == 60 - 1
    # Someone else's partial comes after the line, named: the line stays open for the
    # finals of its speaker, which often come after the next speaker's first partial.
    row = r.feed(said(3.0, "Hello", BOB, final=False))
    assert row == f"{CLEAR_LINE}00:01  Alice  Good morning,  Bob: Hello"
    assert r.feed(said(1.6, "Sarah.")) == f"{CLEAR_LINE}00:01  Alice  Good morning, Sarah."
    # Someone else's final ends it.
    assert r.feed(said(3.0, "Hello", BOB)) == (
        f"{CLEAR_LINE}00:01  Alice  Good morning, Sarah.\n{CLEAR_LINE}00:03  Bob  Hello"
    )
    assert r.flush() == f"{CLEAR_LINE}00:03  Bob  Hello\n"
    # A line that fills the row shows no partial after it, not even a name.
    full = "I have a question about the launch"
    assert r.feed(said(6.0, full)) == f"{CLEAR_LINE}00:06  Alice  {full}"
    assert r.feed(said(9.0, "Sure", BOB, final=False)) == f"{CLEAR_LINE}00:06  Alice  {full}"
    # A final that would wrap starts a new line.
    assert r.feed(said(3.0, "Hello there, I have a question about the launch", BOB)).endswith(
        "launch"
    )
    row = r.feed(said(5.0, "date and the budget", BOB))
    assert row == (
        f"{CLEAR_LINE}00:03  Bob  Hello there, I have a question about the launch\n"
        f"{CLEAR_LINE}00:05  Bob  date and the budget"
    )


async def test_watch_and_sessions_commands(start_gateway: GatewayFactory) -> None:
    running, pub = await start(start_gateway)
    async with Bot(running, "tv"):
        await wait_for(lambda: "tv" in pub.sessions)
        watcher = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "watch",
            "tv",
            "--url",
            running.url(""),
            stdout=asyncio.subprocess.PIPE,
        )
        # The watcher replays the finals so far, then follows live.
        pub.sessions["tv"].publish(final(1))
        await asyncio.sleep(0.5)
        pub.sessions["tv"].publish(partial(2))
        pub.sessions["tv"].publish(final(2, ALICE))
        listing = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "sessions",
            "--url",
            running.http,
            stdout=asyncio.subprocess.PIPE,
        )
        table, _ = await asyncio.wait_for(listing.communicate(), scaled(30))
    # The bot left: the session ends after its linger and the watcher with it.
    out, _ = await asyncio.wait_for(watcher.communicate(), scaled(30))
    assert watcher.returncode == 0
    assert out.decode().splitlines() == [
        "00:01  Alice  W1x0. W1x1.",
        "00:02  Alice  W2x0. W2x1.",
    ]
    header, row = table.decode().splitlines()
    assert header.split() == ["KEY", "STATE", "RATE", "AUDIO", "SPEAKERS", "GAPS", "RECONNECTS"]
    assert row.split()[:3] == ["tv", "live", "16000"]
