"""The README is the front door: its settings and endpoints must be the real ones."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from gateway.config import ENV_PREFIX, Settings

from .timing import ENV as TIMEOUT_FACTOR

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    real = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    # The test suite's own variable (tests/timing.py) is no gateway setting.
    # Variables of the test suite, not settings of the gateway.
    suite = {TIMEOUT_FACTOR, "GATEWAY_TEST_ARTEFACTS"}
    documented = set(re.findall(r"\bGATEWAY_[A-Z_]+[A-Z]\b", README)) - suite
    assert real - documented == set(), "settings missing from the README"
    assert documented - real == set(), "README names settings that do not exist"


def test_flags_in_the_settings_table_match() -> None:
    for env, flag in re.findall(r"\| `(GATEWAY_[A-Z_]+)` \| `(--[a-z-]+)` \|", README):
        assert flag == "--" + env.removeprefix(ENV_PREFIX).lower().replace("_", "-")


def test_the_two_setup_commands_exist() -> None:
    makefile = (Path(__file__).parent.parent / "Makefile").read_text()
    assert "make run" in README
    assert "make test" in README
    assert re.search(r"^run:", makefile, re.M)
    assert re.search(r"^test:", makefile, re.M)
    ci = (Path(__file__).parent.parent / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_metric_is_documented() -> None:
    from prometheus_client import CollectorRegistry

    from gateway.server import Gateway

    settings = Settings(pipelines="recording,transcription").validate()
    gateway = Gateway(settings, CollectorRegistry())  # builds every metric; loads no model
    names = {family.name for family in gateway.metrics.registry.collect()}
    assert names
    missing = sorted(name for name in names if name not in README)
    assert missing == [], "metrics missing from the README"
