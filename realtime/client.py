"""One client, whatever carries it (PROTOCOL §2, §3): how it opens (rights,
resume, `welcome`, replay), each command it sends, and how it closes.

The transports only move bytes: transports/websocket.py today, SSE, long
polling and gRPC next (issue 11). Each authenticates, makes its Outlet
(transports/base.py) and a Session, then calls `start`, `command` for every
message, and `close`; so conflation, priorities, rights, filters, clusters,
heartbeats, `token_expiring`, `reconnect` and `recovered` behave the same on
every transport, as centrifuge's client.go sits apart from its transports.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from . import messages as M
from . import replay
from .auth import CLOSE_FORBIDDEN, AuthError, Claims
from .session import Session
from .stores.base import StoresUnavailable, eid_key

log = logging.getLogger("realtime.client")

CLOSE_TRY_AGAIN = 1013      # rights or a resume cannot be read now: try again
CLOSE_POLICY = 1008         # a persistent rate-limit violation


class Refused(Exception):
    """The connection cannot open (or must close): a close code and a reason."""

    def __init__(self, code: int, reason: str):
        super().__init__(code, reason)
        self.code, self.reason = code, reason


async def start(hub, s: Session, resume: str | None, last_event: str | None,
                must_resume: bool = False) -> bool:
    """Opens an admitted session (Hub.admit): rights and the stored session in
    one round trip, then `welcome`, the resumed subscription's snapshot and the
    replay. Returns whether a session was resumed. Raises Refused before
    anything is attached; after that the caller must call close().

    Rights and a resume are never skipped: without them the connection is
    refused with 1013 (try again), as a skipped ACL could widen rights and a
    skipped resume would lose events (PROTOCOL §2, §3.4).

    must_resume (the HTTP transports' `session=`): an unknown session is
    refused with 4404 and another user's with 4403, instead of a fresh one."""
    if hub.follower is not None and not hub.follower.has_fleet:
        # a worker that has not had the owner's fleet yet (it just started;
        # the owner is slow or restarting) holds no vehicles: a client would
        # get an empty snapshot, and a resume's replay would skip every event
        # of a vehicle unknown here while `recovered` said true
        raise Refused(CLOSE_TRY_AGAIN, "this worker is starting: try again")
    stores = hub.stores
    claims = s.claims
    acl_generation = hub.acl_generation
    try:
        acl, record, where = await stores.connect_reads(
            claims.sub, resume, last_event if resume and replay.well_formed(last_event) else None)
    except StoresUnavailable as e:
        raise _try_again(e.why, e) from None
    except Exception as e:
        raise _try_again("the session cannot be resumed now" if resume else "rights cannot be checked now",
                         e) from None
    s.acl = acl
    s.claims = claims.with_acl(acl)
    if not claims.may_enter(acl):
        hub.security.report("forbidden", s.kind, s.peer, "token grants no vehicles (nor its ACL)",
                            claims.sub, s.client_id)
        raise Refused(CLOSE_FORBIDDEN, "token grants no vehicles")
    if record is not None and record.get("user_id") != claims.sub:
        hub.security.report("forbidden", s.kind, s.peer, "resume of another user's session",
                            claims.sub, s.client_id)
        if must_resume:
            raise Refused(4403, "this session belongs to another user")
        record = None
    if record is None and must_resume:
        raise Refused(4404, "unknown session")
    recovered, after = replay.place(where, last_event) if record is not None else (False, None)
    if after is not None:
        await _tail_reaches(hub, after)
        if hub.last_eid is not None and eid_key(hub.last_eid) < eid_key(after):
            # this instance has not read the log as far as the client got:
            # a replay would be empty and what lies between would come again
            raise _try_again("this instance is behind the event log",
                             RuntimeError(f"read up to {hub.last_eid}, client has {after}"))
    try:
        await stores.resolve_groups(list(s.claims.groups) + _groups_of(record))
        await stores.resolve_vehicles(((record or {}).get("subscription") or {}).get("vehicles") or [])
    except Exception as e:  # the next reconcile fills these in
        log.warning("stores unavailable at connect", extra={"fields": {"error": repr(e)[:200]}})
    if s.closed:
        raise Refused(1000, "client closed")
    # from here on synchronous: nothing is delivered in between, so the
    # replay ends at `upto` exactly where held live events begin
    upto = hub.last_eid
    if record is not None:
        s.session_id = resume
    stored, readable = hub.stored_subscription(s, record) if record is not None else (None, True)
    if record is None or (after is not None and upto is None) or not readable:
        # no session, no log read here yet to replay from, or a subscription
        # that cannot be restored (the replay would filter out its events)
        recovered = False
    hub.attach(s)
    if hub.acl_generation != acl_generation:
        # an acl:updates came while this connection was between its ACL read
        # and attach(), so it was not applied here: read the ACL again
        hub.spawn(_recheck_acl(hub, s))
    welcome = {"type": "welcome", "client": s.client_id, "session": s.session_id,
               "resumed": record is not None, "recovered": recovered,
               "heartbeat_s": int(hub.settings.heartbeat_s)}
    if record is not None:
        # whether the session's subscription came back: when it did not (none
        # stored, or one this version cannot read) the client subscribes again
        welcome["restored"] = stored is not None
    if upto is not None:
        # every event after this one reaches this connection (live or by the
        # replay): a client that gets no event before it reconnects resumes
        # from here and still misses nothing (docs/protocol.md, Resume)
        welcome["last_event"] = upto
    s.send(welcome)
    hub.warn_expiry(s, time.time())
    if record is not None:
        hub.resume(s, stored)
        if after is not None and upto is not None and after != upto:
            hub.hold_for_replay(s)
            hub.spawn(replay.run(hub, s, after, upto))
    hub.save_session(s)
    hub.spawn(stores.client_opened(s.claims.sub, s.client_id))
    hub.records.connection_opened(s.claims.sub, s.client_id, s.connected_at, s.kind, s.peer)
    opened = hub.stats.opened
    opened[s.kind] = opened.get(s.kind, 0) + 1
    return record is not None


async def command(hub, authn, s: Session, data: bytes, binary: bool) -> None:
    """One message from the client: rate-limited, parsed, answered. Raises
    Refused when the client must be closed (a rate limit it keeps breaking)."""
    settings = hub.settings
    if not s.limiter.allow():
        hub.security.report("limit", s.kind, s.peer, "messages per second", s.claims.sub, s.client_id)
        if s.limiter.persistent:
            raise Refused(CLOSE_POLICY, "rate limit exceeded")
        s.send(M.error("rate_limited", "more than %d messages/s" % settings.max_messages_per_s,
                       M.request_id(data, binary)))
        return
    await _dispatch(hub, authn, s, data, binary, settings)


def close(hub, s: Session, reason: str) -> None:
    """Releases everything the session took (core row, limits, shared sets)
    and records why it closed. Safe after a failed start()."""
    s.closed = True
    if s.row >= 0:   # counted once: the transport's totals (GET /metrics)
        st = hub.stats
        st.closed_messages[s.kind] = st.closed_messages.get(s.kind, 0) + s.messages_sent
        st.closed_bytes[s.kind] = st.closed_bytes.get(s.kind, 0) + s.bytes_sent
    hub.detach(s)
    vehicles = ((s.subscription or {}).get("subscriptions") or {}).get("vehicles") or []
    hub.spawn(hub.stores.client_closed(s.claims.sub, s.client_id, s.session_id, vehicles))
    hub.records.connection_closed(s.client_id, reason, s.messages_sent, s.bytes_sent)


async def _recheck_acl(hub, s: Session) -> None:
    """The ACL read again after an update that raced this connection's read.
    If it cannot be read, the connection is closed (1013, try again) rather
    than left with rights the update may have taken away."""
    try:
        await hub.reapply_acl(s.claims.sub)
    except Exception as e:
        log.warning("ACL re-read failed; closing the connection", extra={"fields": {
            "user": s.claims.sub, "client": s.client_id, "error": repr(e)[:200]}})
        if not s.closed:
            s.close(CLOSE_TRY_AGAIN, "rights cannot be checked now: try again")


def _try_again(why: str, e: Exception) -> Refused:
    log.warning("connection refused: stores unavailable", extra={"fields": {"why": why, "error": repr(e)[:200]}})
    return Refused(CLOSE_TRY_AGAIN, f"{why}: try again")


async def _tail_reaches(hub, eid: str, timeout: float = 2.0) -> None:
    """A client that left another instance may have seen events this one has
    not delivered yet: wait a little for them, so that they are replayed
    (and not sent again live after the replay)."""
    deadline = time.monotonic() + timeout
    while hub.last_eid is not None and eid_key(hub.last_eid) < eid_key(eid) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _groups_of(record: dict | None) -> list[str]:
    return list(((record or {}).get("subscription") or {}).get("groups") or [])


async def _dispatch(hub, authn, s: Session, data: bytes, binary: bool, settings) -> None:
    try:
        m = M.parse(data, binary)
    except M.ProtocolError as e:
        s.send(M.error(e.code, e.message, e.req_id))
        return
    kind = type(m).__name__.lower()
    hub.stats.commands[kind] = hub.stats.commands.get(kind, 0) + 1
    try:
        match m:
            case M.Subscribe():
                n = len(m.subscriptions.vehicles) + len(m.subscriptions.groups)
                if n > settings.max_subscription_size:
                    hub.security.report("limit", s.kind, s.peer, "subscription size", s.claims.sub, s.client_id)
                    s.send(M.error("bad_request", f"subscription names {n} vehicles and groups; "
                                   f"at most {settings.max_subscription_size}", m.id))
                    return
                await subscribe(hub, s, m)
            case M.Viewport():
                hub.viewport(s, m)
            case M.Unsubscribe():
                hub.unsubscribe(s, m)
            case M.Get():
                _get(hub, s, m)
            case M.Ping():
                s.last_ping = time.time()
                s.send(M.reply("pong", m.id, ts=int(time.time() * 1000)))
                hub.save_session(s)
            case M.Refresh():
                await _refresh(hub, authn, s, m, settings)
            case M.Auth():
                s.send(M.error("bad_request", "already authenticated; use refresh", m.id))
    except M.ProtocolError as e:
        s.send(M.error(e.code, e.message, m.id))


async def subscribe(hub, s: Session, m: M.Subscribe, full_all: bool = True) -> None:
    """A subscription (its size checked by the caller): the groups and
    vehicles it names are read from the stores first, when they can be.
    full_all: see Hub.subscribe."""
    try:
        await hub.stores.resolve_groups(m.subscriptions.groups)
        await hub.stores.resolve_vehicles(m.subscriptions.vehicles)
    except Exception:  # stores down: subscribe with the membership we know
        pass
    if not s.closed:
        hub.subscribe(s, m, full_all=full_all)


def renew(hub, s: Session, claims: Claims) -> None:
    """The HTTP transports send a token with every request: one for the same
    user (checked by the caller) that expires later, or grants other rights,
    is taken as a `refresh` would be, with the ACL in force on top: a session
    outlives its first token, and never reads with more than the request's."""
    t = s.token_claims
    if claims.exp > t.exp or (claims.view_all, claims.vehicles, claims.groups, claims.contacts,
                              claims.permissions) != (t.view_all, t.vehicles, t.groups, t.contacts, t.permissions):
        # other rights: this request's token is the one in force
        _take_token(hub, s, claims, hub.stores.acl_in_doubt(claims.sub))


def _narrower(new: Claims, old: Claims) -> bool:
    """Whether `new` grants nothing `old` does not."""
    if not new.permissions <= old.permissions:
        return False
    return old.view_all or (set(new.vehicles) <= set(old.vehicles) and set(new.groups) <= set(old.groups))


def _take_token(hub, s: Session, claims: Claims, in_doubt: bool = False) -> None:
    """A new token for the session. `in_doubt`: the user's ACL was never
    read, or an update of it could not be: the ACL in force may be wider
    than the one in Redis (a new connection of the user is refused with 1013
    meanwhile), so a token that grants more takes only its new exp
    (docs/protocol.md, "Rights never widen"); it used to take the new
    token's rights on top of the stale ACL."""
    if in_doubt and not _narrower(claims, s.token_claims):
        claims = dataclasses.replace(s.token_claims, exp=claims.exp)
    effective = claims.with_acl(s.acl)
    s.token_claims = claims
    if s.closed:
        return
    old = s.claims
    if (old.view_all, old.vehicles, old.groups, old.contacts) != \
            (effective.view_all, effective.vehicles, effective.groups, effective.contacts):
        hub.set_claims(s, effective)
    else:
        s.claims = effective
    s.expiry_warned = False


def _get(hub, s: Session, m) -> None:
    if not hub.may_see(s.claims, m.vehicle):
        hub.security.report("forbidden", s.kind, s.peer, "get of a vehicle outside the rights: " + m.vehicle,
                            s.claims.sub, s.client_id)
        s.send(M.error("forbidden", "not allowed to see this vehicle", m.id))
        return
    d = hub.long_form(s.claims, m.vehicle)
    if d is None:
        s.send(M.error("bad_request", "unknown vehicle", m.id))
        return
    if m.id is not None:
        d["id"] = m.id
    s.send(d)


async def _refresh(hub, authn, s: Session, m, settings) -> None:
    try:
        claims: Claims = authn.decode(m.token)
    except AuthError as e:
        hub.security.report(e.kind, s.kind, s.peer, "refresh: " + str(e), s.claims.sub, s.client_id)
        s.send(M.error("unauthorized", str(e), m.id))
        return
    if claims.sub != s.claims.sub:
        hub.security.report("forbidden", s.kind, s.peer, "refresh with another user's token",
                            s.claims.sub, s.client_id)
        s.send(M.error("forbidden", "a refreshed token must be for the same user", m.id))
        return
    acl_generation = hub.acl_generation
    try:
        s.acl = await hub.stores.acl(claims.sub)
        in_doubt = False   # read now (or, Redis down, the one in force for new connections too)
    except Exception:
        in_doubt = True    # rights cannot be read now: the ACL in force stays
    _take_token(hub, s, claims, in_doubt)
    if hub.acl_generation != acl_generation:   # as in start(): this read may predate it
        hub.spawn(_recheck_acl(hub, s))
    if s.closed:
        return
    s.send(M.reply("refreshed", m.id, exp=int(claims.exp)))
    hub.warn_expiry(s, time.time())
