"""The in-process twin of the Redis stores: one worker, nothing shared."""
from __future__ import annotations

import asyncio
import time
from bisect import bisect_left, bisect_right
from collections import deque

import msgpack

from .base import EVENT_LOG_MAX, EVENT_RETENTION_S, SESSION_TTL_S, Event, eid_key


class MemoryStores:
    healthy = True

    def __init__(self, settings=None):
        self.hub = None
        # the event log: a list trimmed from the front by moving `_head`
        # (compacted now and then), so that ids can be found by bisection
        self.log: list[Event] = []
        self._head = 0
        # session id -> (msgpack record, expiry): packed, ~300 B instead of a
        # ~1 KB dict per connection. `_expiry` holds one (expiry, id) per
        # session in first-save order, so saves drop expired records as they go
        self.sessions: dict[str, tuple[bytes, float]] = {}
        self._expiry: deque[tuple[float, str]] = deque()
        self._last_ms = 0
        self._seq = 0

    async def start(self, hub) -> None:
        self.hub = hub

    async def stop(self) -> None:
        pass

    # ---------------------------------------------------------------- events
    def _next_eid(self) -> str:
        ms = int(time.time() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._seq += 1
        else:
            self._seq = 0
        self._last_ms = ms
        return f"{ms}-{self._seq}"

    async def publish_event(self, vehicle_id, etype, body, ts, is_alert) -> None:
        ev = Event(self._next_eid(), vehicle_id, etype, body, ts, is_alert)
        log = self.log
        log.append(ev)
        cutoff = time.time() * 1000 - EVENT_RETENTION_S * 1000 * 1.5
        head = max(self._head, len(log) - EVENT_LOG_MAX)
        while head < len(log) and eid_key(log[head].eid)[0] < cutoff:
            head += 1
        if head > 4096 and head * 2 > len(log):
            del log[:head]
            head = 0
        self._head = head
        if self.hub is not None:
            self.hub.deliver_event(ev)

    def _index(self, eid: str, right: bool) -> int:
        find = bisect_right if right else bisect_left
        return find(self.log, eid_key(eid), lo=self._head, key=lambda e: eid_key(e.eid))

    async def locate(self, eid: str) -> str:
        i = self._index(eid, right=False)
        if i < len(self.log) and self.log[i].eid == eid:
            return "found"
        if self._head == len(self.log) or eid_key(eid) < eid_key(self.log[self._head].eid):
            return "older"
        return "unknown"

    async def events_page(self, after: str, upto: str, limit: int) -> list[Event]:
        i, j = self._index(after, right=True), self._index(upto, right=True)
        return self.log[i:min(j, i + limit)]

    # ---------------------------------------------------------------- sessions
    async def session_written(self, session_id: str) -> None:
        await asyncio.sleep(0)   # the spawned save runs first

    async def save_session(self, session_id: str, data: dict, only_if_copy: str | None = None) -> None:
        if only_if_copy is not None:
            record = await self.load_session(session_id)
            copy = record.get("copy") if record is not None else None
            if record is None or (copy if isinstance(copy, str) else "") != only_if_copy:
                return
        now = time.time()
        exp = now + SESSION_TTL_S
        if session_id not in self.sessions:
            self._expiry.append((exp, session_id))   # one entry per session
        self.sessions[session_id] = (msgpack.packb(data), exp)
        while self._expiry and self._expiry[0][0] < now:
            _, sid = self._expiry.popleft()
            item = self.sessions.get(sid)
            if item is None:
                continue
            if item[1] < now:
                del self.sessions[sid]
            else:   # saved again since: look again at its new expiry
                self._expiry.append((item[1], sid))

    async def load_session(self, session_id: str) -> dict | None:
        item = self.sessions.get(session_id)
        if item is None or item[1] < time.time():
            self.sessions.pop(session_id, None)
            return None
        return msgpack.unpackb(item[0])

    async def load_sessions(self, session_ids: list[str]) -> list[dict | None]:
        return [await self.load_session(sid) for sid in session_ids]

    async def delete_session(self, session_id: str, copy: str | None = None) -> None:
        record = await self.load_session(session_id)
        if record is not None and (copy is None or record.get("copy") == copy):
            del self.sessions[session_id]

    async def client_opened(self, user_id, client_id) -> None:
        pass

    async def client_closed(self, user_id, client_id, session_id, vehicles) -> None:
        pass

    async def set_client_vehicles(self, client_id, old, new) -> None:
        pass

    def acl_in_doubt(self, user_id: str) -> bool:
        return False   # no ACLs without Redis

    async def acl(self, user_id) -> dict | None:
        return None

    async def connect_reads(self, user_id, session_id, eid):
        record = await self.load_session(session_id) if session_id else None
        where = await self.locate(eid) if eid and record is not None else None
        return None, record, where

    async def resolve_groups(self, names) -> None:
        pass

    async def in_registry_group(self, vehicle_id: str, names) -> bool:
        return False   # no registry without Redis

    async def resolve_vehicles(self, ids) -> None:
        pass

    # ---------------------------------------------------------------- vehicles
    def changed(self, rows) -> None:
        pass

    def forgotten(self, vehicle_ids: list, carried: list) -> None:
        pass

    async def relay_updates(self, batch) -> None:
        pass
