"""Structured logs: one JSON object per line on stderr."""
from __future__ import annotations

import json
import logging
import sys
import time


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
        return json.dumps(d, ensure_ascii=False, default=str)


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


def setup(level: str = "info") -> None:
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(JsonFormatter())
    h.addFilter(RateLimit())
    root = logging.getLogger()
    root.handlers[:] = [h]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
