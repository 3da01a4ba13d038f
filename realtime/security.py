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

Lines and rows are rate-limited per kind (a token bucket of BURST events
refilled at RATE_PER_S): a flood of bad tokens must neither flood the log nor
push the records' bounded queue over its limit, where it would drop other
records. What was held back is never lost from view: the next event of that
kind says how many were suppressed, and a quiet kind's count comes out as a
`security events suppressed` line and row within SUMMARY_S. The counters
count everything. Reasons are cut to REASON_CHARS; tokens are never part of
an event (tests/test_secrets.py checks every log and table).
"""
from __future__ import annotations

import asyncio
import logging
import time

log = logging.getLogger("realtime.security")

KINDS = ("bad_token", "expired_token", "forbidden", "limit", "origin_refused", "acl_applied")
TRANSPORTS = ("websocket", "sse", "long_poll", "grpc", "http")
RATE_PER_S = 5.0
BURST = 20.0
SUMMARY_S = 10.0
REASON_CHARS = 200
ADDRESSES_KEPT = 5   # addresses a suppression summary names, of the kind's flood


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
    __slots__ = ("tokens", "at", "suppressed", "addresses")

    def __init__(self, now: float):
        self.tokens, self.at = BURST, now
        self.suppressed = 0
        self.addresses: dict[str, int] = {}

    def take(self, now: float) -> bool:
        self.tokens = min(BURST, self.tokens + (now - self.at) * RATE_PER_S)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class SecurityEvents:
    def __init__(self, hub):
        self.hub = hub              # its records (stores/records.py) are set at startup
        self.counts: dict[tuple[str, str], int] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._task: asyncio.Task | None = None

    def report(self, kind: str, transport: str, address: str, reason: str,
               user: str | None = None, client: str | None = None) -> None:
        key = (kind, transport)
        self.counts[key] = self.counts.get(key, 0) + 1
        now = time.monotonic()
        b = self._buckets.get(kind)
        if b is None:
            b = self._buckets[kind] = _Bucket(now)
        if not b.take(now):
            b.suppressed += 1
            if address in b.addresses or len(b.addresses) < ADDRESSES_KEPT:
                b.addresses[address] = b.addresses.get(address, 0) + 1
            return
        fields = {"event": "security", "kind": kind, "user": user, "address": address,
                  "transport": transport, "reason": str(reason)[:REASON_CHARS]}
        if client:
            fields["client"] = client
        if b.suppressed:
            fields["suppressed_before"] = b.suppressed
            b.suppressed, b.addresses = 0, {}
        log.warning("security event", extra={"fields": fields})
        self.hub.records.event("security", client, None, **{k: v for k, v in fields.items()
                                                              if k not in ("event", "client")})

    def of_request(self, request, kind: str, transport: str, reason: str, user: str | None = None) -> None:
        """An event about an HTTP request (a WebSocket upgrade too)."""
        from .address import of_request
        self.report(kind, transport, of_request(request), reason, user)

    def summarize(self) -> None:
        """Counts held back by the rate limit, for kinds that went quiet."""
        for kind, b in self._buckets.items():
            if not b.suppressed:
                continue
            fields = {"event": "security", "kind": kind, "suppressed": b.suppressed,
                      "addresses": dict(sorted(b.addresses.items(), key=lambda kv: -kv[1]))}
            b.suppressed, b.addresses = 0, {}
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
