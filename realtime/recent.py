"""The newest events this instance read from the log, kept for resume's replay.

Every event an instance takes from the log's tail is already decoded and
encoded (both formats) for its own clients. A resuming client usually missed
only the last seconds; when a whole instance's clients resume here at once (a
reconnect storm), reading those seconds from Redis again for each of them,
and encoding each event once per client, was most of the storm's cost
(benchmarks/bench_storm.py). So the newest MAX_EVENTS are kept here, in log
order, and a replay that falls inside them is served from memory.

Complete by construction: the tail delivers the log in order and, after a
Redis reconnect, carries on after the last event it read, so every log event
newer than the oldest kept one is here. When that stops being true (the log
was reset and the tail reads on from its newest entry) the caller clears it.
"""
from __future__ import annotations

from bisect import bisect_right
from typing import NamedTuple

from .stores.base import Event, eid_key

MAX_EVENTS = 10_000    # ~6 MB: both encodings of 10,000 events


class Recent(NamedTuple):
    ev: Event
    pieces: tuple[bytes, bytes] | None   # its (JSON, msgpack) `event` messages, if encoded already


class RecentEvents:
    def __init__(self, max_events: int = MAX_EVENTS):
        self.max = max_events
        self._keys: list[tuple[int, int]] = []
        self._items: list[Recent] = []

    def add(self, item: Recent) -> None:
        key = eid_key(item.ev.eid)
        if self._keys and key <= self._keys[-1]:
            return   # not newer: the log is read once, in order; never out of order here
        self._keys.append(key)
        self._items.append(item)
        if len(self._keys) > 2 * self.max:   # trimmed in steps: amortised O(1) per event
            del self._keys[:-self.max]
            del self._items[:-self.max]

    def clear(self) -> None:
        self._keys.clear()
        self._items.clear()

    def __len__(self) -> int:
        return len(self._keys)

    def between(self, after: str, upto: str) -> list[Recent] | None:
        """The events with after < eid <= upto, oldest first; None when some of
        them may be missing here (older than the oldest kept)."""
        if not self._keys or self._keys[0] > eid_key(after):
            return None
        lo = bisect_right(self._keys, eid_key(after))
        hi = bisect_right(self._keys, eid_key(upto))
        return self._items[lo:hi]
