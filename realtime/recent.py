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

MAX_EVENTS = 10_000    # ~6 MB: both encodings of 10,000 typical events
MAX_BYTES = 64 << 20   # and never more than this, however big the events


def _size(item: "Recent") -> int:
    if item.pieces is not None:
        return len(item.pieces[0]) + len(item.pieces[1]) + 200
    return len(str(item.ev.body)) + 200


class Recent(NamedTuple):
    ev: Event
    pieces: tuple[bytes, bytes] | None   # its (JSON, msgpack) `event` messages, if encoded already


class RecentEvents:
    def __init__(self, max_events: int = MAX_EVENTS):
        self.max = max_events
        self._keys: list[tuple[int, int]] = []
        self._items: list[Recent] = []
        self._sizes: list[int] = []
        self.nbytes = 0   # the kept events' encodings (or bodies), roughly

    def add(self, item: Recent) -> None:
        key = eid_key(item.ev.eid)
        if self._keys and key <= self._keys[-1]:
            return   # not newer: the log is read once, in order; never out of order here
        self._keys.append(key)
        self._items.append(item)
        self._sizes.append(_size(item))
        self.nbytes += self._sizes[-1]
        if len(self._keys) > 2 * self.max or self.nbytes > MAX_BYTES:
            # trimmed in steps (amortised O(1) per event): to max events, and
            # to half the byte bound (events may be up to 16 KiB each)
            drop = max(len(self._keys) - self.max, 0)
            while drop < len(self._keys) and self.nbytes - sum(self._sizes[:drop]) > MAX_BYTES // 2:
                drop += max(1, len(self._keys) // 8)
            drop = min(drop, len(self._keys))
            self.nbytes -= sum(self._sizes[:drop])
            del self._keys[:drop]
            del self._items[:drop]
            del self._sizes[:drop]

    def clear(self) -> None:
        self._keys.clear()
        self._items.clear()
        self._sizes.clear()
        self.nbytes = 0

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
