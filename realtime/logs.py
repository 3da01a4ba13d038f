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
    r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"   # shaped like a JWT
    r"|(?<=token=)[^&\s\"']+"                               # a query's token=…, escapes and all
    r"|(?i:(?<=bearer))\s+[^\s\"',]+")                      # Authorization: Bearer …


def redact(line: str) -> str:
    if "eyJ" in line or "token=" in line or "earer" in line or "EARER" in line:
        return _SECRETS.sub(_hide, line)
    return line


def _hide(m: re.Match) -> str:
    return " <redacted>" if m.group(0)[:1].isspace() else "<redacted>"


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
    broker is down). Keep one line per logger per `interval` seconds."""

    def __init__(self, prefixes=("aiokafka", "redis"), interval: float = 5.0):
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


class ParseErrors(logging.Filter):
    """aiohttp logs every request it cannot parse at level error, with a
    traceback that quotes the offending bytes (a request line with a
    `?token=`, an `Authorization` header), as fast as anyone sends them.
    Those become one short warning without the bytes, at most one per
    `interval` seconds, with a count of those held back. aiohttp's other
    errors (a handler's 500) pass as they are."""

    def __init__(self, interval: float = 5.0):
        super().__init__()
        self.interval = interval
        self.last = float("-inf")
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "aiohttp.server" or not record.exc_info:
            return True
        from aiohttp.http_exceptions import HttpProcessingError
        exc = record.exc_info[1]
        if not isinstance(exc, HttpProcessingError):
            return True
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return False
        self.last = now
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        record.msg, record.args = "bad HTTP request", ()
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.fields = {"event": "bad_http_request", "peer": peer, "error": type(exc).__name__,
                         "status": getattr(exc, "code", 400), "suppressed": self.suppressed}
        self.suppressed = 0
        return True


def setup(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    h.addFilter(RateLimit())
    h.addFilter(ParseErrors())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
