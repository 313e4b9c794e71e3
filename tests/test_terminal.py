"""``meeting-gateway watch`` and ``meeting-gateway sessions`` against a real gateway,
as subprocesses, plus the renderer on its own."""

from __future__ import annotations

import asyncio
import sys

from gateway.ingest.speakers import Speaker
from gateway.terminal import CLEAR_LINE, Renderer
from pipelines.transcription.formats import deepgram

from .conftest import GatewayFactory, wait_for
from .test_transcript_outputs import ALICE, Bot, final, partial, start
from .timing import scaled

BOB = Speaker("id:2", 2, "Bob", False)


def test_a_terminal_sees_partials_rewritten_and_finals_kept() -> None:
    r = Renderer(live=True, colour=True, sessions=False)
    shown = r.feed(deepgram(partial(1)))
    assert shown.startswith("\x1b[2m") and "p1" in shown and "\n" not in shown
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
