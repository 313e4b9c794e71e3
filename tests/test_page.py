"""The live page in a real browser: Debian's Chromium, driven by Playwright.

A simulated bot streams real speech with a roster into a gateway running the real
model; the page, opened before the bot joins, shows the session, its speaker and their
words as they are recognized, without a reload. A screenshot of the page is kept in
``$GATEWAY_TEST_ARTEFACTS`` (default: the test's temporary directory)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway import tokens
from gateway.simulator import SimulatedBot, read_wav

from .backoff_bot import BackoffBot
from .conftest import GatewayFactory, Utterance, ended_metadata, session_dir, wait_for
from .timing import scaled

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
RATE = 16000


@contextlib.asynccontextmanager
async def chromium_page() -> AsyncIterator[tuple[Any, list[str]]]:
    """A page in Debian's Chromium, and the script errors it raises."""
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            await browser.close()


def test_the_page_and_its_assets_are_served_offline(tmp_path: Path) -> None:
    """Every asset the page loads comes from the gateway: no CDN, no build step."""
    page = (Path(__file__).parent.parent / "gateway" / "page" / "index.html").read_text()
    script = (Path(__file__).parent.parent / "gateway" / "page" / "app.js").read_text()
    for text in (page, script):
        assert "http://" not in text and "https://" not in text
        assert "innerHTML" not in text  # untrusted names and words go through textContent


@pytest.mark.model
async def test_a_bots_speaker_and_words_appear_live_in_a_real_browser(
    start_gateway: GatewayFactory, librivox: list[Utterance], tmp_path: Path
) -> None:
    running = await start_gateway(pipelines="transcription", linger=30)
    first = librivox[0]
    audio, _ = read_wav(first.path, RATE)
    audio = np.concatenate([audio, np.zeros(RATE, dtype=np.int16)])
    alice = [{"name": "Alice", "id": 3, "isSpeaking": True, "deviceId": "d", "isSelf": False}]
    bot = SimulatedBot(
        url=running.url("/bots/page-demo"),
        samples=audio,
        rate=RATE,
        speed=1.0,
        roster=[{"at": 0.0, "roster": alice}],
    )
    artefacts = Path(os.environ.get("GATEWAY_TEST_ARTEFACTS", tmp_path))
    await asyncio.to_thread(artefacts.mkdir, parents=True, exist_ok=True)
    async with chromium_page() as (page, errors):
        config = await page.request.get(running.http + "/page/config.json")
        assert await config.json() == {"open": True}
        await page.goto(running.http + "/")
        await page.wait_for_selector("#no-sessions", state="visible")
        playing = asyncio.create_task(bot.run())
        # The session appears, is selected, and its speaker shows as speaking.
        await page.wait_for_selector("#sessions tr[data-key=page-demo]", timeout=scaled(20_000))
        await page.wait_for_function(
            "document.getElementById('speaking').textContent.includes('Alice')",
            timeout=scaled(20_000),
        )
        # Words appear as they are recognized, attributed to the roster speaker.
        await page.wait_for_selector("#transcript p", timeout=scaled(60_000))
        await playing
        await page.wait_for_function(
            "document.querySelectorAll('#timeline .bar').length > 0", timeout=scaled(10_000)
        )
        names = await page.locator("#transcript .who").all_text_contents()
        text = " ".join(await page.locator("#transcript .text").all_text_contents())
        await page.screenshot(path=str(artefacts / "live-page.png"), full_page=True)
        assert errors == []
    assert set(names) == {"Alice"}
    heard = {w.strip(".,?!").lower() for w in text.split()}
    reference = {w.lower() for w in first.text.split()}
    assert len(heard & reference) >= 0.6 * len(reference), (text, first.text)


async def test_with_a_secret_the_page_lists_sessions_only_for_its_read_token(
    start_gateway: GatewayFactory,
) -> None:
    """The page sends its read token with every listing; without one it says what it needs."""
    secret = "page-secret"
    running = await start_gateway(secret=secret, linger=30)
    bob = [{"name": "Bob", "id": 1, "isSpeaking": True}]
    bot = SimulatedBot(
        url=running.url(f"/bots/guarded?token={tokens.mint(secret, 'output', 'guarded', 60)}"),
        samples=np.zeros(3 * RATE, dtype=np.int16),
        rate=RATE,
        speed=1.0,
        roster=[{"at": 0.0, "roster": bob}],
    )
    playing = asyncio.create_task(bot.run())
    async with chromium_page() as (page, errors):
        await page.goto(running.http + "/")
        await page.wait_for_function(
            "document.getElementById('status').textContent.includes('read token')",
            timeout=scaled(10_000),
        )
        assert await page.locator("#sessions tr[data-key]").count() == 0
        read = tokens.mint(secret, "read", "*", 60)
        await page.goto(f"{running.http}/#token={read}")
        await page.reload()  # a new fragment alone does not load the page again
        await page.wait_for_selector("#sessions tr[data-key=guarded]", timeout=scaled(10_000))
        await page.wait_for_function(
            "document.getElementById('speaking').textContent.includes('Bob')",
            timeout=scaled(10_000),
        )
        await page.wait_for_function(
            "document.querySelectorAll('#timeline .bar').length > 0", timeout=scaled(10_000)
        )
        # The session's files are links that carry the read token a link needs.
        link = page.locator("#files a", has_text="audio.wav")
        await link.wait_for(timeout=scaled(10_000))
        href = await link.get_attribute("href")
        assert href == f"/sessions/guarded/files/audio.wav?token={read}"
        wav = await page.request.get(running.http + href)
        assert wav.ok and (await wav.body())[:4] == b"RIFF"
        # The recording plays in the page: the browser's player reads it through the
        # gateway (with Range requests) and knows its length.
        await page.wait_for_function(
            "(() => { const a = document.getElementById('recording');"
            " return !a.hidden && a.readyState >= 1 && a.duration > 0; })()",
            timeout=scaled(10_000),
        )
        assert errors == []
    await playing


@pytest.mark.model
async def test_the_page_goes_on_through_a_gateway_restart_showing_each_final_once(
    start_gateway: GatewayFactory, librivox: list[Utterance]
) -> None:
    # A meeting the gateway is restarted in the middle of, on the same port and data
    # directory; the bot comes back with its backoff, the page is never reloaded.
    first = await start_gateway(pipelines="transcription", linger=30)
    pause = np.zeros(RATE // 2, dtype=np.int16)
    audio = np.concatenate([p for u in librivox[:3] for p in (read_wav(u.path, RATE)[0], pause)])
    key = "restart-demo"
    bot = BackoffBot(first.url(f"/bots/{key}"), audio, RATE)
    async with chromium_page() as (page, errors):
        await page.goto(first.http + "/")
        meeting = asyncio.create_task(bot.run())
        await page.wait_for_selector("#transcript p", timeout=scaled(60_000))
        await first.gateway.stop()
        shown = await page.locator("#transcript .text").all_text_contents()
        await page.wait_for_function(
            "document.getElementById('partial').textContent.includes('reconnecting')",
            timeout=scaled(10_000),
        )
        # What was shown stays while the gateway is away.
        assert await page.locator("#transcript .text").all_text_contents() == shown
        second = await start_gateway(pipelines="transcription", linger=5, port=first.port)
        await meeting
        directory = session_dir(second.data_dir, key)
        await wait_for(lambda: ended_metadata(directory), within=60)
        lines = (directory / "transcript.jsonl").read_text().splitlines()
        finals = [json.loads(line)["channel"]["alternatives"][0] for line in lines]
        expected = " ".join(a["transcript"] for a in finals if a["words"])
        await page.wait_for_function(
            "(expected) => Array.from(document.querySelectorAll('#transcript .text'))"
            ".map((e) => e.textContent).join(' ') === expected",
            arg=expected,
            timeout=scaled(20_000),
        )
        assert errors == []
    # Both processes' words, each shown once (the page's text is the finals' text).
    assert bot.opens == 2 and len(expected.split()) > len(" ".join(shown).split())
