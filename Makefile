# One target per task, used the same way on a laptop and by CI (.ci/run).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TESTDATA := /usr/share/pocketsphinx/test/data/librivox/transcription
# apt-get needs root; use sudo when not root.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run install dev testdata lint test test-fast bench-ingest bench-transcription bench-replay bench-speech bench-soak clean

## run: install the gateway and start it with the defaults (recording + transcription on :8080)
run: install
	$(BIN)/meeting-gateway serve

install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

dev: $(VENV)/.dev
$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(VENV)/.installed $@

## testdata: real human speech with exact transcripts (Debian's pocketsphinx-testdata),
## espeak-ng voices (conversations, languages), a real browser for the live page, and
## redis-server and haproxy for the cluster tests (deploy/haproxy.cfg)
testdata: $(TESTDATA) /usr/bin/espeak-ng /usr/bin/chromium /usr/bin/redis-server /usr/sbin/haproxy
$(TESTDATA) /usr/bin/espeak-ng /usr/bin/chromium /usr/bin/redis-server /usr/sbin/haproxy &:
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq pocketsphinx-testdata espeak-ng chromium redis-server haproxy

## lint: formatting, lint rules and strict typing
lint: dev
	$(BIN)/ruff format --check gateway pipelines tests benchmarks
	$(BIN)/ruff check gateway pipelines tests benchmarks
	$(BIN)/mypy

## test: install everything the tests need, check, and run the whole suite
test: dev testdata lint
	$(BIN)/pytest

## test-fast: the suite without the tests that run the Whisper model or the piper voice
test-fast: dev testdata
	$(BIN)/pytest -m "not model and not tts"

bench-ingest: dev
	$(BIN)/python benchmarks/ingest.py

bench-transcription: dev testdata
	$(BIN)/python benchmarks/transcription.py

bench-replay: dev testdata
	$(BIN)/python benchmarks/replay.py

bench-speech: dev
	$(BIN)/python benchmarks/speech.py

bench-soak: dev testdata
	$(BIN)/python benchmarks/soak.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
