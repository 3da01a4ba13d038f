"""One client connection: claims, core row, output format, sequence numbers,
rate limit, and whether it was warned of its token's expiry.

A Session lives from a successful authentication until its transport closes;
the hub owns the mapping from core row to Session. The transport only knows
how to write one message and how to close (transports/base.py).
"""
from __future__ import annotations

import logging
import secrets
import time

from . import messages as M
from .replay import split_body
from .auth import Claims

log = logging.getLogger("realtime.session")
CLOSE_WRITE_FAILED = 1011


class RateLimiter:
    """Token bucket: `rate` messages per second with a burst of `rate`.

    `violations` counts refused messages in the current 10 s window so that the
    caller can close a client that keeps going (PROTOCOL §3.3: close 1008 if it
    persists)."""

    __slots__ = ("rate", "tokens", "last", "violations", "window_start")

    def __init__(self, rate: float):
        self.rate = rate
        self.tokens = rate
        self.last = time.monotonic()
        self.violations = 0
        self.window_start = self.last

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if now - self.window_start > 10.0:
            self.window_start = now
            self.violations = 0
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.violations += 1
        return False

    @property
    def persistent(self) -> bool:
        return self.violations > 2 * self.rate


def new_id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(12)


class Session:
    __slots__ = ("transport", "claims", "fmt", "row", "client_id", "session_id",
                 "limiter", "connected_at", "expiry_warned", "kind",
                 "peer", "_closed", "view", "cells", "token_claims", "subscription", "last_ping",
                 "_known", "held", "close_reason", "replaying", "acl", "counted", "extra")

    def __init__(self, transport, claims: Claims, fmt: int, rate: float, kind: str = "websocket",
                 peer: str = ""):
        self.transport = transport
        self.claims = claims
        self.fmt = fmt
        self.row = -1
        self.client_id = new_id("c_")
        self.session_id = new_id("s_")
        self.limiter = RateLimiter(rate)
        self.connected_at = time.time()
        # token_expiring sent for the current token (the hub's sweep sends it,
        # and closes 4001 at exp: no timer per connection)
        self.expiry_warned = False
        self.kind = kind
        self.peer = peer
        self._closed = False
        self.token_claims = claims    # the token's own rights; ACLs apply on top
        self.acl = None               # the live ACL (acl:user:{id}) in force, None: none
        self.subscription = None      # the last subscribe request as sent, for resume
        self.last_ping = self.connected_at
        self.view = (None, None)  # (bounds, zoom) of the subscription
        self.cells = None         # the last `clusters` body sent (bytes), None when not clustered
        # conflation (slow client): the vehicle rows it had when position
        # updates stopped, and the events held for it since; None when flowing
        self._known = None
        self.held: list[tuple[str, bytes]] = []   # (vehicle, encoded event)
        # resume's replay is running (replay.py): traffic is held as above,
        # and the catch-up waits until the replay is done
        self.replaying = False
        self.close_reason = ""
        self.counted = None       # (peer, user) while it counts against the limits (Hub.admit)
        # fields of its record that belong to its transport (the HTTP
        # sessions' copy and acknowledged event, transports/sessions.py)
        self.extra = None

    @property
    def show_alerts(self) -> bool:
        f = (self.subscription or {}).get("filters") or {}
        return f.get("show_alerts", True) is not False

    # Connections closed because a write to them raised, in this process
    # (GET /metrics: write_errors). A class counter: the hub's loops, the
    # replay and the handlers all write through Session, and none of them
    # should have to catch this.
    write_errors = 0

    def send(self, obj: dict) -> None:
        self.write(M.encode(self.fmt, obj))

    def write(self, payload: bytes) -> None:
        if not self._closed:
            try:
                self.transport.write(payload)
            except Exception as e:
                self.write_failed(e)

    def send_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None) -> None:
        """envelope_of is CoreBase.envelope: this connection's seq (and request
        id) around the body shared with other connections, written at once.
        A body of more than 1,000 messages or 1 MiB goes as several batches
        (§3.4), the request's id on the last, `more` on the others: a client
        knows when a snapshot or a reply is whole.
        These are snapshots, catch-ups and replies, not ticks: what they put in
        the buffer does not make the client slow (Outlet.tolerate)."""
        if not self._closed:
            try:
                parts = split_body(self.fmt, body)
                last = len(parts) - 1
                for i, part in enumerate(parts):   # later: see RawWriter.write_batch
                    self.transport.write_batch(envelope_of, batch_id, part,
                                               req_id if i == last else None, i < last, last > 0)
                self.transport.tolerate()
            except Exception as e:
                self.write_failed(e)

    def write_failed(self, e: BaseException) -> None:
        """A write to this connection raised: close this one (1011), and only
        this one. Whoever was writing to many clients goes on with the rest;
        this client resumes and gets a full snapshot and the events it missed,
        so nothing it should have had is silently skipped."""
        Session.write_errors += 1
        log.warning("write failed; closing the connection", extra={"fields": {
            "event": "write_error", "client": self.client_id, "transport": self.kind,
            "error": repr(e)[:200]}})
        try:
            self.close(CLOSE_WRITE_FAILED, "write failed: resume")
        except Exception:   # the transport is broken through and through
            self.closed = True

    # The transport (an Outlet) keeps the write state the compiled fan-out
    # reads; these mirror it so that Python code reads one place.
    @property
    def seq(self) -> int:
        return self.transport.seq

    @property
    def messages_sent(self) -> int:
        return self.transport.messages

    @property
    def bytes_sent(self) -> int:
        return self.transport.nbytes

    @property
    def closed(self) -> bool:
        return self._closed

    @closed.setter
    def closed(self, value: bool) -> None:
        self._closed = self.transport.closed = bool(value)

    @property
    def known(self):
        """While conflating: the vehicle rows it had when position batches
        stopped (see Hub._conflate); None when flowing."""
        return self._known

    @known.setter
    def known(self, rows) -> None:
        self._known = rows
        self.transport.conflating = rows is not None

    @property
    def conflating(self) -> bool:
        return self._known is not None

    def close(self, code: int, reason: str) -> None:
        if not self.closed:
            self.close_reason = reason
            self.closed = True
            self.transport.close(code, reason)
