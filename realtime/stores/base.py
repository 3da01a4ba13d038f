"""What the hub needs from shared storage, with an in-memory twin and Redis.

One worker alone keeps everything in process (memory.py); several workers or
instances share it through Redis (redis.py, PROTOCOL §1.3). Both have the
same interface so that the hub, the transports and the tests do not care.

- Event log: every instant event and new alert gets an id (`eid`) from the
  log, is delivered to the hub from the log's tail, and stays at least 10
  minutes for resume.
- Sessions: `session:{id}` records that let a client resume on any instance.
- Vehicle state: the snapshot other instances start from and reconcile with.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol

EVENT_RETENTION_S = 600          # PROTOCOL §3.4: at least 10 minutes
EVENT_LOG_MAX = 1_000_000        # and bounded: about 1,600 events/s for 10 minutes
SESSION_TTL_S = 3600


class StoresUnavailable(Exception):
    """A read that must not be skipped (rights, a resume) cannot be done now.
    `why` is what the client is told (PROTOCOL §2, §3.4: close 1013)."""

    def __init__(self, message: str, why: str = "rights cannot be checked now"):
        super().__init__(message)
        self.why = why


class Event(NamedTuple):
    eid: str
    vehicle_id: str
    etype: str
    body: Any
    ts: int
    is_alert: bool


def eid_key(eid: str) -> tuple[int, int]:
    """Stream ids order as (milliseconds, sequence)."""
    try:
        ms, _, seq = eid.partition("-")
        return int(ms), int(seq or 0)
    except ValueError:
        return (0, 0)


class Stores(Protocol):
    healthy: bool

    async def start(self, hub) -> None: ...
    async def stop(self) -> None: ...

    # events
    async def publish_event(self, vehicle_id: str, etype: str, body, ts: int, is_alert: bool) -> None: ...
    async def locate(self, eid: str) -> str:
        """Where a stream id stands in the log: "found", "older" than its
        oldest event (or the log is empty), or "unknown"."""
    async def events_page(self, after: str, upto: str, limit: int) -> list[Event]:
        """At most `limit` events with after < eid <= upto, oldest first."""

    # sessions
    async def save_session(self, session_id: str, data: dict, only_if_copy: str | None = None) -> None:
        """With only_if_copy: only while the record exists and names that copy."""
    async def session_written(self, session_id: str) -> None:
        """Until the saves of this session made so far are written (bounded)."""
    async def load_session(self, session_id: str) -> dict | None: ...
    async def load_sessions(self, session_ids: list[str]) -> list[dict | None]: ...
    async def delete_session(self, session_id: str, copy: str | None = None) -> None:
        """The record goes; with `copy`, only while the record names it."""
    async def client_opened(self, user_id: str, client_id: str) -> None: ...
    async def client_closed(self, user_id: str, client_id: str, session_id: str,
                            vehicles: list[str]) -> None: ...
    async def set_client_vehicles(self, client_id: str, old: list[str], new: list[str]) -> None: ...
    async def acl(self, user_id: str) -> dict | None: ...

    def acl_in_doubt(self, user_id: str) -> bool:
        """Whether the ACL in force for this user is known to be out of date
        (an update of it could not be read)."""
        return False
    async def connect_reads(self, user_id: str, session_id: str | None, eid: str | None):
        """(acl, stored session or None, locate(eid) or None) at once."""
    async def resolve_groups(self, names) -> None: ...
    async def in_registry_group(self, vehicle_id: str, names) -> bool: ...
    async def resolve_vehicles(self, ids) -> None: ...

    # vehicles
    def changed(self, rows) -> None: ...
    def forgotten(self, vehicle_ids: list, carried: list) -> None: ...   # stale (§3.3): out of shared indexes and groups
    async def relay_updates(self, batch) -> None: ...   # an UpdateBatch, applied here already
