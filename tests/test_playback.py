"""Speech into the meeting over real sockets, checked from the bot's side."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.ingest.speakers import SpeakerChange
from gateway.pipeline import Pipeline, PipelineFactory, Samples, SessionContext
from gateway.session import Session
from gateway.simulator import read_wav
from gateway.speech.bargein import BargeIn
from gateway.speech.pacing import Pacer
from gateway.speech.playback import Player

from .conftest import GatewayFactory, RunningGateway, Utterance, wait_for
from .playout import PlayoutBot, playout

TERMINAL = {"finished", "interrupted", "cancelled", "failed"}


def tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(round(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


async def live_session(running: RunningGateway, key: str) -> tuple[Session, Player]:
    session: Session = await wait_for(
        lambda: (s := running.gateway.sessions.get(key)) is not None and s.player is not None and s
    )
    assert session.player is not None
    return session, session.player


def record_events(player: Player) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    player.subscribe(events.append)
    return events


def ended(events: list[dict[str, Any]], uid: str) -> dict[str, Any] | None:
    return next((e for e in events if e["id"] == uid and e["type"] in TERMINAL), None)


def metric(running: RunningGateway, name: str, **labels: str) -> float:
    return running.gateway.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("rate", [16000, 24000, 48000])
async def test_paced_at_the_session_rate_on_the_dual_socket(
    start_gateway: GatewayFactory, rate: int
) -> None:
    running = await start_gateway()
    bot = PlayoutBot(running.url("/bots/dual"), rate)
    await bot.start()
    try:
        session, player = await live_session(running, "dual")
        events = record_events(player)
        # A tone made at 16 kHz: the gateway must resample it to the session's rate.
        uid = session.speak(tone(440.0, 2.0, 16000), 16000)
        await wait_for(lambda: ended(events, uid))
        await wait_for(lambda: len(bot.received) >= 2 * rate)
    finally:
        await bot.close()

    assert ended(events, uid)["type"] == "finished"  # type: ignore[index]
    assert bot.texts == 0
    binary = [a for a in bot.arrivals if not a.text]
    frame = rate * 20 // 1000
    assert all(a.size % 2 == 0 for a in binary)
    assert all(a.size == 2 * frame for a in binary[:-1])
    assert len(bot.received) == 2 * rate  # soxr's flush keeps the duration exact
    spectrum = np.abs(np.fft.rfft(bot.received.astype(np.float64)))
    assert abs(np.argmax(spectrum) * rate / len(bot.received) - 440.0) < 2.0

    # Frame n leaves at t0 + n * 20 ms - lead: check every arrival against that.
    lead = running.gateway.settings.playback_lead_ms / 1000
    t0 = binary[0].at
    late = [a.at - (t0 + max(0.0, i * 0.020 - lead)) for i, a in enumerate(binary)]
    assert max(abs(x) for x in late) < 0.060, max(late, key=abs)
    assert abs(late[-1]) < 0.030  # no drift over the utterance
    played = playout(bot.arrivals, rate)
    assert played.max_queued <= lead + 0.020 + 0.010
    assert played.underruns == 0


async def test_exact_samples_and_an_utterance_queue(start_gateway: GatewayFactory) -> None:
    running = await start_gateway()
    bot = PlayoutBot(running.url("/bots/q"), 24000)
    await bot.start()
    rng = np.random.default_rng(7)
    parts = [rng.integers(-9000, 9000, n, dtype=np.int16) for n in (4801, 12000, 7)]
    try:
        session, player = await live_session(running, "q")
        events = record_events(player)
        ids = [session.speak(p, 24000) for p in parts]
        await wait_for(lambda: all(ended(events, i) for i in ids))
        await wait_for(lambda: len(bot.received) >= sum(map(len, parts)))
    finally:
        await bot.close()
    assert bot.received.tobytes() == np.concatenate(parts).tobytes()
    assert [e["type"] for e in events if e["id"] == ids[0]] == ["queued", "started", "finished"]
    starts = [
        next(e["time"] for e in events if e["id"] == i and e["type"] == "started") for i in ids
    ]
    assert starts == sorted(starts)
    # Back to back: the second utterance continues the stream, no restart of the lead.
    assert playout(bot.arrivals, 24000).underruns == 0
    assert metric(running, "gateway_speech_frames_sent_total") == len(bot.arrivals)


async def test_separate_input_resumes_after_a_reconnect(start_gateway: GatewayFactory) -> None:
    running = await start_gateway()
    rate = 16000
    bot = PlayoutBot(running.url("/bots/sep"), rate, input_url=running.url("/bots/sep/input"))
    await bot.start()
    source = np.random.default_rng(3).integers(-9000, 9000, 3 * rate, dtype=np.int16)
    try:
        session, player = await live_session(running, "sep")
        events = record_events(player)
        await wait_for(lambda: session.input is not None)
        uid = session.speak(source, rate)
        await wait_for(lambda: len(bot.received) >= rate)
        await bot.drop_input()
        await wait_for(lambda: session.input is None)
        before = len(bot.received)
        dropped_at = time.monotonic()
        await bot.connect_input()
        await wait_for(lambda: ended(events, uid))
        # "finished" means the last frame was written; wait for the bot to have read it.
        tail = source[-rate // 50 :].tobytes()
        await wait_for(lambda: bot.received[-rate // 50 :].tobytes() == tail)
    finally:
        await bot.close()
    assert ended(events, uid)["type"] == "finished"  # type: ignore[index]
    assert bot.output_messages == 0  # never to the output socket of a two-socket bot
    received = bot.received
    assert received[:before].tobytes() == source[:before].tobytes()
    # Whatever was in flight when the TCP connection died is lost with it; the rest of
    # the utterance comes on the new socket, in order, and ends exactly at the end.
    after = received[before:]
    assert after.tobytes() == source[len(source) - len(after) :].tobytes()
    assert len(source) - len(received) <= rate * 0.1
    assert all(a.at > dropped_at for a in bot.arrivals[-len(after) // 320 :])


async def test_drop_policy_ends_the_cut_utterance(start_gateway: GatewayFactory) -> None:
    running = await start_gateway(on_input_drop="drop")
    rate = 16000
    bot = PlayoutBot(running.url("/bots/drop"), rate, input_url=running.url("/bots/drop/input"))
    await bot.start()
    try:
        session, player = await live_session(running, "drop")
        events = record_events(player)
        await wait_for(lambda: session.input is not None)
        cut = session.speak(tone(300, 3.0, rate), rate)
        nxt = session.speak(tone(500, 0.5, rate), rate)
        await wait_for(lambda: len(bot.received) >= rate // 2)
        await bot.drop_input()
        await wait_for(lambda: ended(events, cut))
        before = len(bot.received)
        await bot.connect_input()
        await wait_for(lambda: ended(events, nxt))
        await wait_for(lambda: len(bot.received) >= before + rate // 2)
    finally:
        await bot.close()
    assert ended(events, cut)["reason"] == "input_dropped"  # type: ignore[index]
    assert ended(events, nxt)["type"] == "finished"  # type: ignore[index]
    assert len(bot.received) == before + rate // 2


async def test_person_talking_stops_the_bot_quickly(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    running = await start_gateway()
    rate = 16000
    voice, _ = read_wav(librivox[0].path, rate)
    person, _ = read_wav(librivox[1].path, rate)
    long_voice = np.concatenate([voice, voice])
    bot = PlayoutBot(running.url("/bots/barge"), rate, mix=person, mix_at=1.5)
    await bot.start()
    try:
        session, player = await live_session(running, "barge")
        events = record_events(player)
        uid = session.speak(long_voice, rate)
        end = await wait_for(lambda: ended(events, uid))
        await wait_for(lambda: bot.mix_started is not None)
    finally:
        await bot.close()
    assert end["type"] == "interrupted"
    assert end["reason"] == "barge_in"
    assert len(bot.received) < len(long_voice) / 2
    stop = end["stop_requested"]
    # What the gateway had not sent when it heard the person is never sent: the bot
    # stops at most the lead plus a frame later.
    assert end["played_until"] - stop <= 0.150
    last = max(a.at for a in bot.arrivals)
    assert last - (stop - time.time() + time.monotonic()) <= 0.050
    assert metric(running, "gateway_speech_barge_ins_total", policy="stop") == 1


async def test_own_voice_in_the_mix_does_not_stop_the_bot(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    running = await start_gateway(bot_name="Notetaker")
    rate = 16000
    voice, _ = read_wav(librivox[2].path, rate)
    bot = PlayoutBot(running.url("/bots/echo"), rate, echo_delay=0.15)
    await bot.start()
    try:
        session, player = await live_session(running, "echo")
        await bot.roster([{"name": "Alice", "id": 1, "isSpeaking": False}])
        events = record_events(player)
        uid = session.speak(voice, rate)
        await wait_for(lambda: player.playing)
        await bot.roster(
            [
                {"name": "Alice", "id": 1, "isSpeaking": False},
                {"name": "Notetaker", "id": 2, "isSpeaking": True},
            ]
        )
        end = await wait_for(lambda: ended(events, uid), within=20)
        # "finished" means the last frame was sent; let it arrive before hanging up.
        await wait_for(lambda: len(bot.received) >= len(voice))
    finally:
        await bot.close()
    assert end["type"] == "finished"
    assert len(bot.received) == len(voice)
    # The echo was heard as speech (counted when the session flushes at its end).
    await wait_for(lambda: metric(running, "gateway_vad_speech_seconds_total") > 1.0)
    assert metric(running, "gateway_speech_barge_ins_total", policy="stop") == 0


async def test_roster_person_speaking_stops_the_bot(start_gateway: GatewayFactory) -> None:
    running = await start_gateway(barge_in="stop")
    bot = PlayoutBot(running.url("/bots/roster"), 24000)
    await bot.start()
    try:
        session, player = await live_session(running, "roster")
        events = record_events(player)
        uid = session.speak(tone(200, 5.0, 24000), 24000)
        await wait_for(lambda: player.playing)
        await bot.roster([{"name": "Bob", "id": 3, "isSpeaking": True}])
        end = await wait_for(lambda: ended(events, uid))
    finally:
        await bot.close()
    assert end["type"] == "interrupted"
    assert end["reason"] == "barge_in"


async def test_duck_policy_lowers_the_rest(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    running = await start_gateway(barge_in="duck")
    rate = 16000
    person, _ = read_wav(librivox[1].path, rate)
    bot = PlayoutBot(running.url("/bots/duck"), rate, mix=person, mix_at=2.0)
    await bot.start()
    try:
        session, player = await live_session(running, "duck")
        events = record_events(player)
        uid = session.speak(tone(200, 4.0, rate), rate)
        end = await wait_for(lambda: ended(events, uid))
    finally:
        await bot.close()
    assert end["type"] == "finished"
    levels = np.abs(bot.received.astype(np.int32)).reshape(-1, 320).max(axis=1)
    assert levels.max() >= 7900
    assert levels.min() <= 2100  # -12 dB while the person talked


# -- the sans-I/O parts -------------------------------------------------------------------


@given(
    frames=st.lists(st.integers(1, 2000), min_size=1, max_size=200),
    lateness=st.lists(st.floats(0, 0.015), min_size=1, max_size=200),
)
def test_pacer_schedule_is_exact_however_late_each_send(
    frames: list[int], lateness: list[float]
) -> None:
    rate, lead = 24000, 0.1
    pacer = Pacer(rate, lead)
    assert pacer.resume(100.0) is False
    t0, now, sent = 100.0, 100.0, 0
    for i, n in enumerate(frames):
        # The schedule depends on the sample count only, never on when sends happened.
        due = pacer.due()
        assert due == pytest.approx(max(t0, t0 + sent / rate - lead))
        now = max(now, due) + lateness[i % len(lateness)]
        dry = now >= t0 + sent / rate
        assert pacer.resume(now) is (dry and sent > 0)
        if dry:  # the bot has nothing left: a new stream starts now
            t0, sent = now, 0
        pacer.sent(n)
        sent += n
        # Sent on time or late, the bot never holds more than the lead plus one frame.
        assert pacer.queued(now) <= lead + n / rate + 1e-9


def test_pacer_new_stream_after_the_bot_ran_dry() -> None:
    pacer = Pacer(16000, 0.1)
    pacer.resume(10.0)
    pacer.sent(16000)  # one second
    assert pacer.resume(10.5) is False
    assert pacer.playout_end == pytest.approx(11.0)
    assert pacer.resume(11.2) is True
    assert pacer.due() == 11.2
    assert pacer.position == 0
    pacer.stop()
    assert pacer.resume(12.0) is False
    assert pacer.queued(12.0) == 0.0


def test_barge_in_tells_echo_from_a_person() -> None:
    policy = BargeIn(echo_window=1.0)
    policy.onset(50.0)
    assert policy.own_voice(50.2)  # the bot's speech coming back
    assert policy.own_voice(50.96)
    assert not policy.own_voice(51.5)  # a start the bot's voice does not explain
    assert not policy.own_voice(49.0)
    # The roster says a person is talking: nothing is put down to echo.
    assert policy.roster_change("id:1", is_bot=False, speaking=True) is True
    assert policy.roster_change("id:1", is_bot=False, speaking=True) is False
    assert not policy.own_voice(50.2)
    assert policy.roster_change("id:1", is_bot=False, speaking=False) is False
    assert policy.own_voice(50.2)
    assert policy.roster_change("id:2", is_bot=True, speaking=True) is False


@given(st.lists(st.floats(0, 1000), max_size=50), st.floats(0, 1000))
def test_barge_in_echo_only_near_an_onset(onsets: list[float], start: float) -> None:
    policy = BargeIn(echo_window=1.0)
    for at in sorted(onsets):
        policy.onset(at)
    recent = [o for o in sorted(onsets) if o >= max(onsets, default=0) - 10.0]
    expected = any(o - 0.05 <= start <= o + 1.0 for o in recent)
    assert policy.own_voice(start) is expected


class Greeter(Pipeline):
    """Speaks through the pipeline contract when it starts; keeps the events it gets."""

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.said: str | None = None

    async def start(self, ctx: SessionContext) -> None:
        self.said = ctx.speak(tone(330, 1.0, 8000), 8000)

    async def audio(self, start: int, samples: Samples) -> None:
        pass

    async def event(self, event: Any) -> None:
        self.events.append(event)


async def test_a_pipeline_speaks_and_hears_when_the_bot_speaks(
    start_gateway: GatewayFactory,
) -> None:
    made: list[Greeter] = []

    class GreeterFactory(PipelineFactory):
        name = "greeter"

        def create(self, ctx: SessionContext) -> Pipeline:
            made.append(Greeter())
            return made[-1]

    running = await start_gateway(factories={"greeter": GreeterFactory}, bot_name="Notetaker")
    bot = PlayoutBot(running.url("/bots/greet"), 24000)
    await bot.start()
    try:
        await wait_for(lambda: made and made[0].said)
        await wait_for(lambda: len(bot.received) >= 24000)
        await wait_for(lambda: len([e for e in made[0].events if type(e) is SpeakerChange]) == 2)
    finally:
        await bot.close()
    assert len(bot.received) == 24000  # 1 s at 8 kHz, resampled to the session's rate
    on, off = (e for e in made[0].events if type(e) is SpeakerChange)
    assert on.speaker.is_bot and off.speaker.is_bot
    assert on.speaker.name == "Notetaker"
    assert (on.speaking, off.speaking) == (True, False)
    # On the session clock, the bot is heard for about the second it played.
    assert 0.9 < (off.sample - on.sample) / 24000 < 1.2
