"""Security events (docs/security.md, "Security events"): each one is a JSON
log line on the `realtime.security` logger and a `realtime_events` row
(event_type `security`), carrying the kind, the user when known, the
client's address (realtime/address.py), the transport and the reason. Every
event is counted for GET /metrics (`security_events_total{kind,transport}`).

Kinds:
- bad_token: missing, malformed, badly signed, wrong issuer or audience
- expired_token: expired at connect or at a `refresh`, or a connection
  closed (4001) at its token's `exp`
- forbidden: what the rights do not allow (a token that grants nothing, a
  `get` or GET /api/vehicles/{id} of a vehicle outside them, a permission
  it lacks, another user's session)
- limit: connections per address or per user, messages per second, the
  message size limit
- origin_refused: a WebSocket from an Origin outside --allowed-origins
- acl_applied: a live ACL (acl:updates) changed an open connection's rights

Lines and rows are rate-limited, per kind and address and per kind (token
buckets): a flood of bad tokens must neither flood the log nor push the
records' bounded queue over its limit, where it would drop other records, and
one address's flood must not hide another's events. What was held back is
never lost from view: every SUMMARY_S a `security events suppressed` line and
row per kind gives its count and the busiest addresses and users. The
counters count everything. Reasons and users lose control characters and are
cut to REASON_CHARS; tokens are never part of an event
(tests/test_security_events.py searches every log, table and Redis key).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

log = logging.getLogger("realtime.security")

KINDS = ("bad_token", "expired_token", "forbidden", "limit", "origin_refused", "acl_applied")
TRANSPORTS = ("websocket", "sse", "long_poll", "grpc", "http")
RATE_PER_S = 10.0            # lines per kind: BURST at once, then this many a second
BURST = 50.0
ADDRESS_RATE_PER_S = 1.0     # lines per kind from one address
ADDRESS_BURST = 10.0
ADDRESS_BUCKETS = 4096
SUMMARY_S = 10.0
REASON_CHARS = 200
TOP_KEPT = 64                # addresses and users counted in what is held back
TOP_NAMED = 5                # the busiest of them, named in a summary


def rights_change(old, new) -> str:
    """What an ACL changed in a connection's rights (two auth.Claims), in a
    few words for an `acl_applied` event; "" when nothing did."""
    parts = []
    for name, flag in (("view_all_vehicles", "view_all"), ("view_driver_contacts", "contacts")):
        a, b = getattr(old, flag), getattr(new, flag)
        if a != b:
            parts.append(f"{name} {'granted' if b else 'revoked'}")
    for name in ("vehicles", "groups"):
        a, b = getattr(old, name), getattr(new, name)
        if set(a) != set(b):
            parts.append(f"{name} {len(a)} -> {len(b)}")
    other = (old.permissions ^ new.permissions) - {"view_all_vehicles", "view_driver_contacts"}
    if other:
        parts.append("permissions " + ", ".join(sorted(other))[:80])
    return "; ".join(parts)


class _Bucket:
    """A token bucket: `burst` at once, then `rate` a second."""
    __slots__ = ("tokens", "at", "rate", "burst")

    def __init__(self, now: float, rate: float, burst: float):
        self.tokens, self.at, self.rate, self.burst = burst, now, rate, burst

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


def _tally(top: dict, key, cap: int) -> None:
    """Counts in bounded memory that keep the busiest keys (Space-Saving:
    a new key past `cap` takes the place, and the count, of the least one)."""
    if key in top:
        top[key] += 1
    elif len(top) < cap:
        top[key] = 1
    else:
        least = min(top, key=top.get)
        top[key] = top.pop(least) + 1


def _busiest(top: dict, n: int = TOP_NAMED) -> dict:
    return dict(sorted(top.items(), key=lambda kv: -kv[1])[:n])


_CONTROLS = {c: "?" for c in [*range(32), 127]}


def clean(text) -> str:
    """For a reason or a user: no control characters (a NUL would make the
    row's jsonb refuse it; a newline has no place in a log field), cut short."""
    return str(text).translate(_CONTROLS)[:REASON_CHARS]


class _Held:
    """What the rate limit held back of one kind since the last summary."""
    __slots__ = ("count", "addresses", "users")

    def __init__(self):
        self.count = 0
        self.addresses: dict[str, int] = {}
        self.users: dict[str, int] = {}


class SecurityEvents:
    def __init__(self, hub):
        self.hub = hub              # its records (stores/records.py) are set at startup
        self.counts: dict[tuple[str, str], int] = {}
        self._kinds: dict[str, _Bucket] = {}
        self._addresses: OrderedDict[tuple[str, str], _Bucket] = OrderedDict()
        self._held: dict[str, _Held] = {}
        self._task: asyncio.Task | None = None

    def _allowed(self, kind: str, address: str, now: float) -> bool:
        """One address's flood must not hide another's events (a bucket per
        kind and address, the least recently used forgotten past
        ADDRESS_BUCKETS), and many addresses must not flood the log (a
        bucket per kind)."""
        key = (kind, address)
        b = self._addresses.get(key)
        if b is None:
            b = self._addresses[key] = _Bucket(now, ADDRESS_RATE_PER_S, ADDRESS_BURST)
            if len(self._addresses) > ADDRESS_BUCKETS:
                self._addresses.popitem(last=False)
        else:
            self._addresses.move_to_end(key)
        if not b.take(now):
            return False
        k = self._kinds.get(kind)
        if k is None:
            k = self._kinds[kind] = _Bucket(now, RATE_PER_S, BURST)
        return k.take(now)

    def report(self, kind: str, transport: str, address: str, reason: str,
               user: str | None = None, client: str | None = None) -> None:
        key = (kind, transport)
        self.counts[key] = self.counts.get(key, 0) + 1
        user = clean(user) if user is not None else None
        if not self._allowed(kind, address, time.monotonic()):
            held = self._held.get(kind)
            if held is None:
                held = self._held[kind] = _Held()
            held.count += 1
            _tally(held.addresses, address, TOP_KEPT)
            if user is not None:
                _tally(held.users, user, TOP_KEPT)
            return
        fields = {"event": "security", "kind": kind, "user": user, "address": address,
                  "transport": transport, "reason": clean(reason)}
        if client:
            fields["client"] = client
        log.warning("security event", extra={"fields": fields})
        self.hub.records.event("security", client, None, **{k: v for k, v in fields.items()
                                                              if k not in ("event", "client")})

    def of_request(self, request, kind: str, transport: str, reason: str, user: str | None = None) -> None:
        """An event about an HTTP request (a WebSocket upgrade too)."""
        from .address import of_request
        self.report(kind, transport, of_request(request), reason, user)

    def summarize(self) -> None:
        """What the rate limit held back since the last summary, per kind."""
        held, self._held = self._held, {}
        for kind, h in held.items():
            fields = {"event": "security", "kind": kind, "suppressed": h.count,
                      "addresses": _busiest(h.addresses), "users": _busiest(h.users)}
            log.warning("security events suppressed", extra={"fields": fields})
            self.hub.records.event("security", None, None, **{k: v for k, v in fields.items() if k != "event"})

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._summaries())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.summarize()   # the last counts reach the log and the records

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_S)
            try:
                self.summarize()
            except Exception:
                log.exception("security summary failed")
