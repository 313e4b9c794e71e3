"""A meeting's terms to expect (gateway.keywords): read and bounded, refused before the
upgrade when too many, and written as given by the real model where tiny.en alone
spells them as they sound ("Jokwyn", "Shubon", "graph on alerts")."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import numpy as np
import pytest
import soxr
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from benchmarks.conversations import piper_speech
from gateway import keywords
from gateway.config import Settings
from gateway.errors import BadRequest, ConfigError
from gateway.keywords import MAX_CHARS, MAX_NAMES, MAX_TERM_CHARS, MAX_TERMS, Vocabulary
from gateway.routes import parse_route
from gateway.simulator import SimulatedBot
from pipelines.transcription import jobs
from pipelines.transcription.engine import Request
from pipelines.transcription.scoring import words as norm_words

from .conftest import GatewayFactory, refusals, refused_with
from .test_listen import SECRET, stream_with_sdk
from .timing import scaled

RATE = 16000
#: What the meeting's people say, and the terms tiny.en does not write as given alone.
LINE = "Thanks Joaquin, I will ask Siobhan to check the Grafana alerts."
TERMS = ("Joaquin", "Siobhan", "Grafana")


# -- reading and bounding terms (sans-I/O) ----------------------------------------------


def test_terms_are_split_at_commas_with_deepgram_boosts_dropped() -> None:
    assert keywords.split(" Siobhan ,Postgres:2, customer   service,, Grafana:-1.5, a:b") == [
        "Siobhan",
        "Postgres",
        "customer service",
        "Grafana",
        "a:b",
    ]
    assert keywords.split("") == []


def test_checked_terms_drop_repeats_and_refuse_what_does_not_fit() -> None:
    assert keywords.checked(["Postgres", "postgres", "Figma"], "keywords") == ("Postgres", "Figma")
    for bad in (["x" * (MAX_TERM_CHARS + 1)], ["tab\there"], ["new\nline"]):
        with pytest.raises(ValueError, match=r"keywords: .* is not a term"):
            keywords.checked(bad, "keywords")
    with pytest.raises(ValueError, match=f"{MAX_TERMS + 1} terms"):
        keywords.checked([f"term{i}" for i in range(MAX_TERMS + 1)], "keywords")
    with pytest.raises(ValueError, match=f"{MAX_CHARS} characters"):
        keywords.checked(["y" * 60 + str(i) for i in range(9)], "keywords")
    assert keywords.prompt([]) is None
    assert keywords.prompt(["Siobhan", "Postgres"]) == "Siobhan, Postgres."


@given(st.lists(st.text(min_size=0, max_size=80), max_size=80))
def test_checked_terms_are_unique_and_within_the_bounds_or_refused(terms: list[str]) -> None:
    refused = ""
    try:
        kept = keywords.checked(terms, "keywords")
    except ValueError as exc:
        kept, refused = (), str(exc)
    if refused:
        assert refused.startswith("keywords: ")
        return
    assert len({t.casefold() for t in kept}) == len(kept) <= MAX_TERMS
    assert all(t.isprintable() and len(t) <= MAX_TERM_CHARS for t in kept)
    assert len(keywords.prompt(kept) or "") <= MAX_CHARS


def test_a_vocabulary_adds_the_sessions_terms_then_the_rosters_names() -> None:
    deployment = Vocabulary(("Postgres",), roster=True)
    meeting = deployment.joined({"keywords": "Grafana,postgres"})
    assert meeting.terms == ("Postgres", "Grafana") and deployment.terms == ("Postgres",)
    assert meeting.left_out == 0
    assert meeting.people(["Siobhan Kelly", "Joaquin", "Siobhan Kelly"])
    assert not meeting.people(["Joaquin"])  # nobody new
    assert meeting.prompt == "Postgres, Grafana, Siobhan Kelly, Joaquin."
    # Without roster keywords, names are not terms.
    assert not Vocabulary(("Postgres",)).people(["Siobhan"])
    # A roster adds at most MAX_NAMES, a session's terms past the bounds are counted.
    crowd = Vocabulary(roster=True)
    crowd.people(f"Person {i}" for i in range(3 * MAX_NAMES))
    assert len(crowd.terms) == MAX_NAMES
    full = Vocabulary([f"t{i}" for i in range(MAX_TERMS - 1)]).joined({"keywords": "a,b,c"})
    assert (len(full.terms), full.left_out) == (MAX_TERMS, 2)


def test_repeated_keywords_and_keyterms_are_one_list_and_too_many_a_bad_request() -> None:
    route = parse_route("/v1/listen?keyterm=Siobhan&keywords=Postgres:2&keyterm=customer+service")
    assert route.params["keywords"] == "Siobhan,Postgres,customer service"
    assert parse_route("/bots/k?keywords=Figma,Grafana").params["keywords"] == "Figma,Grafana"
    assert "keywords" not in parse_route("/bots/k?language=en").params
    many = "&".join(f"keyterm=t{i}" for i in range(MAX_TERMS + 1))
    with pytest.raises(BadRequest) as info:
        parse_route(f"/v1/listen?{many}")
    assert info.value.status == 400


def test_deployment_keywords_are_checked_at_start_up() -> None:
    assert Settings(keywords="Postgres, Grafana").validate().keywords == "Postgres, Grafana"
    with pytest.raises(ConfigError, match=r"keywords=.*\(flag --keywords, env GATEWAY_KEYWORDS\)"):
        Settings(keywords="x" * (MAX_TERM_CHARS + 1)).validate()


def test_a_jobs_terms_cross_the_wire_and_a_job_of_an_earlier_release_has_none() -> None:
    audio = np.zeros(1600, np.float32)
    spec = jobs.JobSpec("j", "n", "s", "partial", audio, 1.0, "en", 1.7e9, False, "Siobhan.")
    fields = jobs.encode_job(spec)
    assert jobs.decode_job(fields).prompt == "Siobhan."
    del fields["prompt"]
    assert jobs.decode_job(fields).prompt == ""


# -- the real model -----------------------------------------------------------------------


def speech(text: str = LINE, rate: int = RATE) -> np.ndarray:
    """``text`` in the piper voice at ``rate`` as int16, with 1.5 s of silence after."""
    audio, native = piper_speech(text)
    pcm = soxr.resample(audio, native, rate)
    pcm = np.clip(pcm * 32768, -32768, 32767).astype(np.int16)
    return np.concatenate([pcm, np.zeros(round(1.5 * rate), np.int16)])


def said(words: list[str]) -> set[str]:
    return set(norm_words(" ".join(words)))


def expected(words: list[str]) -> set[str]:
    return {t.casefold() for t in TERMS} & said(words)


@pytest.mark.model
def test_the_model_writes_the_terms_it_is_told_to_expect(whisper_model: Any) -> None:
    audio = (speech() / 32768).astype(np.float32)
    prompt = keywords.prompt(TERMS)
    plain = [w.text for w in whisper_model.transcribe(audio, 0.0).words]
    told = [w.text for w in whisper_model.transcribe(audio, 0.0, prompt).words]
    assert len(expected(plain)) < len(expected(told)) == len(TERMS), (plain, told)
    # Batched with another session's job of the same terms, as the lanes run them.
    requests = [Request(audio, 0.0, prompt=prompt), Request(audio[: 3 * RATE], 0.0, prompt=prompt)]
    first = whisper_model.transcribe_many(requests)[0]
    assert expected([w.text for w in first.words]) == {t.casefold() for t in TERMS}
    # Terms are not speech: silence and noise still write nothing.
    rng = np.random.default_rng(7)
    for quiet in (np.zeros(4 * RATE, np.float32), rng.normal(0, 0.05, 4 * RATE).astype("f4")):
        assert whisper_model.transcribe(quiet, 0.0, prompt).words == ()


class CountingDecoder:
    """A loaded CTranslate2 model that counts its ``generate`` calls (decoder passes)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.passes = inner, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        self.passes += 1
        return self.inner.generate(*args, **kwargs)


@pytest.mark.model
def test_a_prompted_decode_is_one_pass_over_its_window(whisper_model: Any) -> None:
    # Given a prompt, Whisper ends this text without a closing timestamp, and
    # faster-whisper's own loop would decode the 1.5 s of silence after it again.
    audio = (speech() / 32768).astype(np.float32)
    model = whisper_model.models[0]
    decoder = model.model = CountingDecoder(model.model)
    try:
        heard = whisper_model.transcribe(audio, 0.0, keywords.prompt(TERMS))
    finally:
        model.model = decoder.inner
    assert expected([w.text for w in heard.words]) == {t.casefold() for t in TERMS}, heard
    assert decoder.passes == 1
    assert heard.words[-1].end < len(audio) / RATE - 1.0


async def meeting(gw: Any, key: str, query: str = "", **bot: Any) -> list[str]:
    """The words of every final a subscriber saw of a meeting ``key`` in which a bot
    (at ``/bots/{key}{query}``) streams :func:`speech`."""
    finals: list[str] = []
    async with connect(gw.url(f"/bots/{key}/transcripts")) as sub:
        await SimulatedBot(gw.url(f"/bots/{key}{query}"), speech(), RATE, **bot).run()
        with contextlib.suppress(Exception):
            while True:
                message = json.loads(await asyncio.wait_for(sub.recv(), scaled(30)))
                if message["type"] == "Results" and message["is_final"]:
                    alternative = message["channel"]["alternatives"][0]
                    finals += [w["word"] for w in alternative["words"]]
    return finals


@pytest.mark.model
async def test_a_bot_urls_keywords_and_the_rosters_names_reach_its_transcript(
    start_gateway: GatewayFactory,
) -> None:
    gw = await start_gateway(pipelines="transcription", roster_keywords=True)
    plain = await meeting(gw, "plain")
    told = await meeting(gw, "told", "?keywords=Joaquin,Siobhan,Grafana")
    # The roster lists the people listening as well as the one speaking: their names,
    # also of those who join while nobody starts or stops speaking.
    speaker = {"name": "Priyanka", "id": 3, "isSpeaking": True}
    people = [
        {"name": "Joaquin Ruiz", "id": 1, "isSpeaking": False},
        {"name": "Siobhan Kelly", "id": 2, "isSpeaking": False},
        speaker,
    ]
    rosters = [{"at": 0.0, "roster": [speaker]}, {"at": 0.2, "roster": people}]
    named = await meeting(gw, "named", "?keywords=Grafana", roster=rosters)
    assert len(expected(plain)) < len(expected(told)) == len(TERMS), (plain, told)
    assert expected(named) == {t.casefold() for t in TERMS}, named
    # A bot URL with more terms than a meeting takes is refused before the upgrade.
    many = ",".join(f"t{i}" for i in range(MAX_TERMS + 1))
    assert (await refused_with(gw.url(f"/bots/crowd?keywords={many}")))[0] == 400
    assert refusals(gw, "bad_request") == 1


@pytest.mark.model
async def test_deepgram_clients_keyterms_and_keywords_are_expected(
    start_gateway: GatewayFactory,
) -> None:
    running = await start_gateway(pipelines="transcription", secret=SECRET)
    messages = await stream_with_sdk(
        running, speech(), keyterm=["Joaquin", "Siobhan"], keywords="Grafana:2"
    )
    finals = [m for m in messages if m["type"] == "Results" and m["is_final"]]
    words = [w["word"] for m in finals for w in m["channel"]["alternatives"][0]["words"]]
    assert expected(words) == {t.casefold() for t in TERMS}, words
    status, _ = await refused_with(
        running.url(f"/v1/listen?token={SECRET}&keyterm={'x' * (MAX_TERM_CHARS + 1)}")
    )
    assert status == 400
