"""The command line: settings, bot-config, and a real `serve` process drained by SIGTERM."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from gateway import logs, tokens
from gateway.__main__ import build_parser, main
from gateway.config import Settings
from gateway.errors import ConfigError
from gateway.simulator import SimulatedBot, read_wav

from .conftest import Utterance, ended_metadata, read_recording, session_dir
from .timing import scaled


class TestSettings:
    def test_environment_then_flags(self) -> None:
        args = build_parser().parse_args(["serve", "--port", "9000"])
        env = {"GATEWAY_PORT": "7000", "GATEWAY_DATA_DIR": "/tmp/x", "GATEWAY_COMPRESSION": "yes"}
        settings = Settings.from_sources(args, env)
        assert settings.port == 9000
        assert settings.data_dir == Path("/tmp/x")
        assert settings.compression is True

    @pytest.mark.parametrize(
        ("env", "named"),
        [
            ({"GATEWAY_PORT": "eighty"}, "port='eighty'"),
            ({"GATEWAY_PORT": "70000"}, "port=70000"),
            ({"GATEWAY_DEFAULT_RATE": "11025"}, "default_rate=11025"),
            ({"GATEWAY_VAD_FRAME_MS": "25"}, "vad_frame_ms=25"),
            ({"GATEWAY_LINGER": "-1"}, "linger=-1.0"),
            ({"GATEWAY_BARGE_IN": "shout"}, "barge_in='shout'"),
            ({"GATEWAY_PIPELINES": " , "}, "pipelines=' , '"),
        ],
    )
    def test_bad_values_are_named(self, env: dict[str, str], named: str) -> None:
        with pytest.raises(ConfigError, match=re.escape(named)):
            Settings.from_sources(None, env)

    def test_serve_reports_a_bad_setting_and_exits_2(
        self, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("GATEWAY_MAX_MESSAGE_BYTES", "0")
        assert main(["serve"]) == 2
        err = capsys.readouterr().err
        assert "max_message_bytes=0" in err
        assert "GATEWAY_MAX_MESSAGE_BYTES" in err


class TestBotConfig:
    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
        assert main(["bot-config", *argv]) == 0
        config: dict[str, object] = json.loads(capsys.readouterr().out)
        return config

    def test_v1_and_v2_objects_with_signed_urls(self, capsys: pytest.CaptureFixture[str]) -> None:
        secret = "top-secret"
        config = self.run(
            capsys, "--public-url", "wss://gw.example", "--secret", secret, "--rate", "16000"
        )
        key = config["key"]
        assert isinstance(key, str)
        v2 = config["v2"]["streaming_config"]  # type: ignore[index]
        v1 = config["v1"]["streaming"]  # type: ignore[index]
        assert config["v2"]["streaming_enabled"] is True  # type: ignore[index]
        assert v2["audio_frequency"] == 16000
        assert v1["audio_frequency"] == "16khz"
        assert v1["output"] == v2["output_url"]
        assert v1["input"] == v2["input_url"]
        out, inp = urlsplit(v2["output_url"]), urlsplit(v2["input_url"])
        assert (out.scheme, out.netloc, out.path) == ("wss", "gw.example", f"/bots/{key}")
        assert inp.path == f"/bots/{key}/input"
        assert parse_qs(out.query)["rate"] == ["16000"]
        tokens.verify(secret, parse_qs(out.query)["token"][0], "output", key)
        tokens.verify(secret, parse_qs(inp.query)["token"][0], "input", key)
        with pytest.raises(tokens.AuthError):
            tokens.verify(secret, parse_qs(inp.query)["token"][0], "output", key)
        # The session's row in GET /sessions, readable with the token it carries.
        sessions = urlsplit(config["sessions_url"])  # type: ignore[arg-type]
        assert (sessions.scheme, sessions.netloc, sessions.path) == (
            "https",
            "gw.example",
            "/sessions",
        )
        tokens.verify(secret, parse_qs(sessions.query)["token"][0], "read", key)

    def test_dual_socket_and_v2_only_rates(self, capsys: pytest.CaptureFixture[str]) -> None:
        config = self.run(capsys, "--public-url", "ws://h:1", "--dual", "--rate", "48000")
        v2 = config["v2"]["streaming_config"]  # type: ignore[index]
        assert v2["input_url"] == v2["output_url"]
        assert "token=" not in v2["output_url"]  # open gateway: no secret, no token
        assert "v1" not in config  # API v1 only knows 16 kHz and 24 kHz

    def test_a_meetings_language_and_keywords_ride_on_its_output_url(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        config = self.run(capsys, "--keywords", "Siobhan, Postgres:2,siobhan", "--language", "auto")
        v2 = config["v2"]["streaming_config"]  # type: ignore[index]
        query = parse_qs(urlsplit(v2["output_url"]).query)
        assert (query["keywords"], query["language"]) == (["Siobhan,Postgres"], ["auto"])
        assert "keywords" not in v2["input_url"]
        assert main(["bot-config", "--keywords", "x" * 65]) == 2
        assert "--keywords" in capsys.readouterr().err
        assert main(["bot-config", "--language", "klingon"]) == 2

    def test_fresh_key_each_time(self, capsys: pytest.CaptureFixture[str]) -> None:
        assert self.run(capsys)["key"] != self.run(capsys)["key"]


async def test_sigterm_drains_and_flushes_the_recording(
    tmp_path: Path, librivox: list[Utterance]
) -> None:
    env = {
        **os.environ,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": "0",
        "GATEWAY_DATA_DIR": str(tmp_path),
        "GATEWAY_PIPELINES": "recording",
        "GATEWAY_LINGER": "600",
        "GATEWAY_RESUME": "false",  # a stop ends every meeting (tests/test_resume.py: on)
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", env=env, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stderr is not None
    port = None
    while port is None:
        line = (await asyncio.wait_for(proc.stderr.readline(), scaled(60))).decode()
        assert line, "gateway exited before listening"
        if m := re.search(r"listening on [\d.]+:(\d+)", line):
            port = int(m.group(1))
    samples, rate = read_wav(librivox[4].path, 24000)
    bot = SimulatedBot(f"ws://127.0.0.1:{port}/bots/term", samples, rate, speed=10.0)
    await bot.run()
    # The bot is gone but the session lingers (600 s): only the drain can end it.
    assert ended_metadata(session_dir(tmp_path, "term")) is None
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), scaled(30)) == 0
    await proc.stderr.read()
    meta = ended_metadata(session_dir(tmp_path, "term"))
    assert meta is not None
    pcm, _ = read_recording(session_dir(tmp_path, "term"))
    assert pcm == samples.tobytes()


@pytest.mark.parametrize(("level", "library_info"), [("INFO", False), ("DEBUG", True)])
def test_libraries_that_log_every_request_show_only_warnings(
    level: str, library_info: bool
) -> None:
    root = logging.getLogger()
    handlers, root_level = root.handlers[:], root.level
    levels = {name: logging.getLogger(name).level for name in logs.QUIET}
    try:
        logs.setup(level, "text")
        for name in ("websockets", "faster_whisper"):
            library = logging.getLogger(name)
            assert library.isEnabledFor(logging.INFO) is library_info
            assert library.isEnabledFor(logging.WARNING)
        assert logging.getLogger("gateway.session").isEnabledFor(logging.INFO)
    finally:
        root.handlers[:] = handlers
        root.setLevel(root_level)
        for name, was in levels.items():
            logging.getLogger(name).setLevel(was)
