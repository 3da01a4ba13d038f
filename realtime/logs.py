"""Structured logs: one JSON object per line on stderr."""
from __future__ import annotations

import json
import logging
import re
import sys
import time

# Credentials that a line may quote although the server never logs them
# itself: aiohttp logs a request it cannot parse with the offending request
# line or header (`GET /ws?token=… HTTP/1.1` with a stray byte, an
# `Authorization: Bearer …` header line), and a library's exception may
# repeat a URL. Every line is passed through these (docs/security.md).
_SECRETS = re.compile(
    r"eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"         # anything shaped like a JWT
    r"|(?<=token=)[^&\s\"'\\]+"                                     # a query's token=…
    r"|(?<=[Bb]earer )[^\s\"'\\,]+")                                 # Authorization: Bearer …


def redact(line: str) -> str:
    return _SECRETS.sub("<redacted>", line) if ("ey" in line or "earer" in line or "token=" in line) else line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "fields", None)
        if extra:
            d.update(extra)
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(d, ensure_ascii=False, default=str))


class RateLimit(logging.Filter):
    """Client libraries log every failed retry (aiokafka: ten a second while a
    broker is down), and aiohttp logs every request it cannot parse, with a
    traceback, as fast as anyone sends them. Keep one line per logger per
    `interval` seconds."""

    def __init__(self, prefixes=("aiokafka", "redis", "aiohttp.server"), interval: float = 5.0):
        super().__init__()
        self.prefixes = prefixes
        self.interval = interval
        self.last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.prefixes):
            return True
        now = time.monotonic()
        if now - self.last.get(record.name, 0.0) < self.interval:
            return False
        self.last[record.name] = now
        return True


def setup(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    h.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
