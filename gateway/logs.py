"""Logging set-up: stdlib logging, one line per record, text or JSON.

Session loggers prefix every message with ``[key]`` (see
:class:`SessionLog`), so one grep follows a meeting through connects,
reconnects and the end. Nothing is logged per audio frame.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


#: Libraries that log per request or per recognition at INFO: only their warnings show,
#: unless the level is DEBUG.
QUIET = ("websockets", "faster_whisper")


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs every HTTP request and close at INFO (each /metrics scrape, each
    # health check); the gateway logs connects and disconnects itself, with the session.
    # faster-whisper logs every recognition at INFO ("Processing audio with duration"):
    # two a second for each meeting where someone speaks, 7,000 lines an hour.
    quiet = logging.getLevelName(level) != logging.DEBUG
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.NOTSET)


class SessionLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every line with the session key."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"[{self.extra['session'] if self.extra else '-'}] {msg}", kwargs
