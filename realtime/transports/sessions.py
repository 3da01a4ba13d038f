"""Sessions without a connection (PROTOCOL §4): the session API, and the copy
of each HTTP session that this worker holds for long polling and SSE.

- `POST /api/realtime/session` (Bearer, a `subscribe` body) makes a session:
  a Session whose Outlet is a Mailbox (realtime/mailbox.py), attached to the
  hub like any connection, so rights, filters, priorities, conflation,
  clusters and `token_expiring` are the client layer's and the hub's, as on
  WebSocket. `201 {"session": …}`.
- `PUT /api/realtime/session/{id}` subscribes again: `subscribed` and its
  batch (`full` for what came in, `leave` for what went out) go to the stream.
- `DELETE` ends it: the record goes, later polls and streams get 410 here
  and 404 elsewhere.

Several instances (or workers) may be asked for the same session, since polls
need no sticky sessions. The session's record in the stores (`session:{id}`)
names the copy that serves it (`copy`) and the newest event its reader has
acknowledged (`last_event`, see Mailbox). An instance asked for a session it
does not hold, or whose record names another copy, takes it over: it starts
a new copy from the record, as a WebSocket resume does, so the reader gets
`reset`, the full state and every event since `last_event` (nothing lost;
sticky sessions only save the snapshot). A copy that is no longer named is
ended within SWEEP_S; one that nobody reads for --session-idle-s (2 minutes)
is ended, with its record, and releases everything.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict

from aiohttp import web

from .. import client
from ..address import of_request as client_address
from .. import messages as M
from .._core._schema import FMT_JSON
from ..auth import AuthError, Claims
from ..ingest.http import bearer
from ..mailbox import Budget, Mailbox, newer
from ..session import Session, new_id
from ..stores.base import SESSION_TTL_S
from ..tasks import cancel_and_wait

log = logging.getLogger("realtime.sessions")

SWEEP_S = 5.0           # idle sessions and copies taken over elsewhere are found this often
ENDED_KEEP = 10_000     # ids of sessions ended here, remembered for a 410 (bounded)
SAVE_ACK_EVERY_S = 1.0  # the acknowledged mark goes to the record at most this often
CLOSE_TAKEN = 4009      # the session is served by another copy now (docs/protocol.md)
RECORD_MARKS = 32       # (seq, event) marks of the newest batches in a session's record
MARKS_EVERY_S = 30.0    # a streamed session's record gets its new marks this often


def latest(*marks: str | None) -> str | None:
    """The newest of some event ids (None: none)."""
    out = None
    for m in marks:
        if newer(m, out):
            out = m
    return out


def _mark_in_record(record: dict, seq: int | None) -> str | None:
    """The event acknowledged by Last-Event-ID `seq`, from the marks the
    copy that numbered it left in the record (none: another copy's id)."""
    best = None
    if seq is None:
        return None
    for pair in record.get("seq_marks") or ():
        if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int) and pair[0] <= seq:
            best = pair[1] if isinstance(pair[1], str) else best
    return best


class HttpError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> web.Response:
        """PROTOCOL §4: the error body of §3 (`type`, `code`, `message`), with
        `error` as well, as the other HTTP endpoints answer."""
        return web.json_response(M.http_error(self.code, self.message), status=self.status, headers=self.headers)


# what a Refused close code means to an HTTP client (PROTOCOL §4)
_REFUSED = {4404: (404, "not_found"), 4410: (410, "gone"), 4403: (403, "forbidden"), 4003: (403, "forbidden"),
            1013: (503, "unavailable"), 1008: (429, "rate_limited")}


def refused_error(r: client.Refused) -> HttpError:
    status, code = _REFUSED.get(r.code, (503, "unavailable"))
    return HttpError(status, code, r.reason, {"Retry-After": "1"} if status == 503 else None)


def _other_user(request, claims: Claims, transport: str) -> HttpError:
    request.app["security"].of_request(request, "forbidden", transport, "another user's session", claims.sub)
    return HttpError(403, "forbidden", "this session belongs to another user")


def authenticate(request: web.Request, transport: str) -> Claims:
    """The request's token (Bearer or ?token=), or HttpError 401/403."""
    app = request.app
    try:
        claims = app["auth"].decode(bearer(request))   # its rights with the live ACL: client.start
    except AuthError as e:
        app["security"].of_request(request, e.kind, transport, str(e), e.user)
        if e.forbidden:
            raise HttpError(403, "forbidden", str(e)) from None
        raise HttpError(401, "unauthorized", str(e), {"WWW-Authenticate": "Bearer"}) from None
    return claims


class Held:
    """This worker's copy of one HTTP session."""

    __slots__ = ("s", "box", "copy", "last_seen", "ack_saved_at", "saved_at")

    def __init__(self, s: Session, box: Mailbox, copy: str):
        self.s, self.box, self.copy = s, box, copy
        self.last_seen = self.saved_at = time.monotonic()
        self.ack_saved_at = 0.0

    def busy(self) -> bool:
        return self.box.reader is not None or self.box.waiting()


class HttpSessions:
    def __init__(self, app: web.Application):
        self.app = app
        self.hub = app["hub"]
        self.held: dict[str, Held] = {}
        self.ended: OrderedDict[str, None] = OrderedDict()
        self._task: asyncio.Task | None = None
        self._locks: dict[str, asyncio.Lock] = {}
        self.budget = Budget(app["settings"].session_buffer_bytes)

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._sweep(), name="http-sessions")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_S, self.app["settings"].session_idle_s / 4))
            try:
                await self.sweep()
            except Exception:
                log.exception("session sweep failed")

    async def sweep(self) -> None:
        now = time.monotonic()
        idle = self.app["settings"].session_idle_s
        for sid, h in list(self.held.items()):
            self._save_ack(h, now)
            stale_marks = h.box.seq_marks and h.s.extra.get("seq_marks", [[0]])[-1][0] != h.box.seq_marks[-1][0]
            if not h.box.closed and (now - h.saved_at > SESSION_TTL_S / 3
                                     or (stale_marks and now - h.saved_at > MARKS_EVERY_S)):
                h.saved_at = now   # a quiet record must outlive its TTL; a stream's marks move on
                self._save(h)
            if not h.busy() and now - h.last_seen > idle:
                log.info("session expired", extra={"fields": {"event": "session_expired", "session": sid,
                                                               "user": h.s.claims.sub}})
                self.hub.records.event("session_expired", h.s.client_id, None, session=sid)
                await self.end(sid, h, "not read for %g s" % idle)
        if self.hub.settings.redis and self.held:
            await self._drop_moved()

    async def _drop_moved(self) -> None:
        """Copies whose record names another copy (taken over elsewhere) or
        is gone (DELETE elsewhere, expired): ended here, so that an SSE stream
        attached to one does not go on with an old subscription."""
        sids = list(self.held)
        try:
            records = await self.hub.stores.load_sessions(sids)
        except Exception:
            return   # Redis down: keep serving what is here
        for sid, record in zip(sids, records):
            h = self.held.get(sid)
            if h is None or h.box.closed:
                continue
            if record is None:
                self._forget(sid, h, 4410, "the session was ended")
            elif record.get("copy") != h.copy:
                self._forget(sid, h, CLOSE_TAKEN, "the session is served elsewhere now: reconnect")

    # ------------------------------------------------------------ making and finding
    async def create(self, request: web.Request, claims: Claims, sub: M.Subscribe | None) -> Held:
        """A new session; with no subscription (`?subscription=none`) it sees
        nothing until a PUT, like a WebSocket before its first subscribe."""
        hub = self.hub
        h = self._new(request, claims, "long_poll")
        h.s.extra.update(copy=h.copy, last_event=h.box.ack)
        try:
            await client.start(hub, h.s, None, None)
        except client.Refused as r:
            self._release(h)
            raise refused_error(r) from None
        h.s.extra["_claimed"] = True   # later saves only while the record names this copy
        self.held[h.s.session_id] = h
        try:
            if sub is not None:
                await self._subscribe(h, sub)
        except HttpError:
            await self.end(h.s.session_id, h, "refused", deleted=True)
            raise
        await hub.stores.session_written(h.s.session_id)   # a poll elsewhere finds it
        return h

    def renew(self, request: web.Request, h: Held, claims: Claims, transport: str) -> None:
        """This request's token for the session (client.renew). One that names
        no vehicles, where the user's ACL grants none either, is refused
        with 403 as at the session's start (client.start)."""
        if not claims.may_enter(h.s.acl):
            request.app["security"].of_request(request, "forbidden", transport, "token grants no vehicles",
                                               claims.sub)
            raise HttpError(403, "forbidden", "token grants no vehicles")
        client.renew(self.hub, h.s, claims)

    async def find(self, request: web.Request, claims: Claims, sid: str, last_event: str | None = None,
                   kind: str = "long_poll", serves=None, seq: int | None = None,
                   transport: str | None = None) -> tuple[Held, bool]:
        """The copy that serves `sid` for this user: the one held here when
        the record names it and serves(box) (it holds what the reader asks
        for), else a new copy taken over from the record. (copy, whether it
        is new: its reader starts from its first entry, with `reset`).
        The request's token is taken (renew; a 403 names `transport`, by
        default `kind`) before serves() is asked: a token that narrows the
        rights lets go of what the reader had (Mailbox.rights_narrowed), so
        a re-read of it becomes a new copy."""
        if not sid or len(sid) > 64:
            raise HttpError(400, "bad_request", "session is required")
        held = self.held.get(sid)
        if held is not None and held.s.claims.sub == claims.sub and not held.s.limiter.allow():
            # before anything is made: a reset (a new copy) is the costly case
            # (and before the lock, which only the finally below gives back)
            self.app["security"].of_request(request, "limit", kind, "requests per second", claims.sub)
            raise HttpError(429, "rate_limited", "more than %d requests/s for this session"
                            % self.app["settings"].max_messages_per_s)
        lock = self._locks.get(sid)
        if lock is None:
            lock = self._locks[sid] = asyncio.Lock()
        try:
            async with lock:   # two readers at once must not both make a copy
                h, new = await self._find(request, claims, sid, last_event, kind, seq)
                self.renew(request, h, claims, transport or kind)
                if not new and serves is not None and not serves(h.box):
                    self._forget(sid, h, CLOSE_TAKEN, "the session is served by a new copy")
                    after = latest(last_event, h.box.ack, h.box.mark_of_seq(seq))
                    h, new = await self._take_over(request, claims, sid, after, kind, h.copy), True
                return h, new
        finally:
            if not lock.locked() and not getattr(lock, "_waiters", None):
                self._locks.pop(sid, None)

    async def _find(self, request, claims, sid, last_event, kind, seq):
        hub = self.hub
        h = self.held.get(sid)
        if h is not None and h.s.claims.sub != claims.sub:
            raise _other_user(request, claims, kind)
        try:
            record = await hub.stores.load_session(sid)
        except Exception:
            if h is not None and not h.box.closed:
                return h, False   # the stores are down: serve what is here
            raise HttpError(503, "unavailable", "the session cannot be read now: try again",
                            {"Retry-After": "1"}) from None
        if record is None:
            if h is not None:
                self._forget(sid, h, 4410, "the session was ended")
            if sid in self.ended or h is not None:
                raise HttpError(410, "gone", "the session was ended")
            raise HttpError(404, "not_found", "unknown session")
        if record.get("user_id") != claims.sub:
            raise _other_user(request, claims, kind)
        if h is not None and not h.box.closed and record.get("copy") == h.copy:
            return h, False
        if h is not None:
            self._forget(sid, h, CLOSE_TAKEN, "the session is served by a new copy")
        after = latest(last_event, record.get("last_event"), _mark_in_record(record, seq))
        return await self._take_over(request, claims, sid, after, kind, record.get("copy") or ""), True

    async def _take_over(self, request, claims: Claims, sid: str, after: str | None, kind: str,
                         claim_from: str) -> Held:
        """A new copy of `sid` here, from its record; its first save claims
        the record only while the record still names `claim_from` (the copy
        it was taken from: a DELETE in between is not undone)."""
        old = self.held.get(sid)
        limiter = old.s.limiter if old is not None else None
        if old is not None:
            self._forget(sid, old, CLOSE_TAKEN, "the session is served by a new copy")
        after = after or "0-0"   # no acknowledged event: the log's start
        h = self._new(request, claims, kind)
        if limiter is not None:
            h.s.limiter = limiter   # a reset does not start a fresh rate limit
        h.s.extra.update(copy=h.copy, last_event=after, _claim_from=claim_from)   # the record written at start
        h.box.ack = after
        h.box.starting = True
        try:
            await client.start(self.hub, h.s, sid, after, must_resume=True)
        except client.Refused as r:
            self._release(h)
            raise refused_error(r) from None
        finally:
            h.box.starting = False
        h.s.extra["_claimed"] = True
        self.held[sid] = h
        log.info("session taken over", extra={"fields": {
            "event": "session_taken_over", "session": sid, "user": claims.sub, "copy": h.copy,
            "last_event": after}})
        return h

    def _new(self, request, claims: Claims, kind: str) -> Held:
        settings = self.app["settings"]
        h = Held.__new__(Held)
        box = Mailbox(self.hub, settings.write_buffer_close_bytes, settings.slow_client_buffer_bytes,
                      on_close=lambda b, h=h: self._closed(h), budget=self.budget)
        s = Session(box, claims, FMT_JSON, settings.max_messages_per_s, kind, client_address(request))
        s.extra = {}
        box.session = s
        Held.__init__(h, s, box, new_id("k_"))
        refused = self.hub.admit(s)
        if refused:
            request.app["security"].of_request(request, "limit", kind, refused, claims.sub)
            raise HttpError(429, "rate_limited", refused)
        return h

    async def _subscribe(self, h: Held, sub: M.Subscribe, full_all: bool = True) -> None:
        """`sub` is one _subscribe_body() read and checked; full_all: see Hub.subscribe."""
        try:
            await client.subscribe(self.hub, h.s, sub, full_all)
        except M.ProtocolError as e:   # bounds the hub refuses (south above north, …)
            raise HttpError(400, e.code, e.message) from None

    # ------------------------------------------------------------ reading
    def acknowledged(self, h: Held, cursor: int | None) -> None:
        """The reader has everything up to `cursor` (None: the box's mark was
        moved already): the mark goes to the record (at most once a second;
        the sweep writes one held back), for a copy that has to start again."""
        if cursor is not None:
            h.box.acknowledge(cursor)
        self._save_ack(h, time.monotonic())

    def _save_ack(self, h: Held, now: float) -> None:
        ack = h.box.ack
        if h.s.extra.get("last_event") != ack and now - h.ack_saved_at >= SAVE_ACK_EVERY_S \
                and not h.box.closed:
            h.ack_saved_at = now
            h.s.extra["last_event"] = ack
            self._save(h)

    def _save(self, h: Held) -> None:
        """The record, with the marks of the newest batches: an SSE reader that
        comes back on another instance with Last-Event-ID replays from there."""
        h.s.extra["seq_marks"] = [list(p) for p in list(h.box.seq_marks)[-RECORD_MARKS:]]
        self.hub.save_session(h.s)

    # ------------------------------------------------------------ ending
    async def end(self, sid: str, h: Held | None, reason: str, deleted: bool = False) -> None:
        """DELETE, or nobody read it here for --session-idle-s: the record goes too
        (after an idle spell only while it still names this copy: it may be
        served elsewhere now)."""
        copy = None if deleted or h is None else h.copy
        if h is not None:
            self._forget(sid, h, 4410, reason)
        self._remember_ended(sid)
        try:
            await self.hub.stores.delete_session(sid, copy)
        except Exception as e:
            log.warning("session record not deleted", extra={"fields": {"session": sid, "error": repr(e)[:200]}})

    def _forget(self, sid: str, h: Held, code: int, reason: str) -> None:
        if not h.box.closed:
            h.s.close(code, reason)   # -> _closed
        else:
            self._release(h)

    def _closed(self, h: Held) -> None:
        """The copy closed (slow reader, token expiry, shutdown, or ended
        here): it leaves the hub and this registry now; a later read starts
        a new copy from the record, which gets this copy's latest marks."""
        if h.s.extra.get("_claimed") and self.held.get(h.s.session_id) is h:
            self._save(h)
        self._release(h)

    def _release(self, h: Held) -> None:
        s = h.s
        sid = s.session_id
        if self.held.get(sid) is h:
            del self.held[sid]
        if s.row >= 0:
            client.close(self.hub, s, s.close_reason or "closed")
        self.hub.unadmit(s)
        h.box.release()

    def _remember_ended(self, sid: str) -> None:
        self.ended[sid] = None
        while len(self.ended) > ENDED_KEEP:
            self.ended.popitem(last=False)


# ---------------------------------------------------------------- the API
def _too_large(request, claims: Claims, limit: int) -> HttpError:
    request.app["security"].of_request(request, "limit", "http", "request body size", claims.sub)
    return HttpError(413, "too_large", f"at most {limit} bytes")


async def _subscribe_body(request: web.Request, claims: Claims) -> M.Subscribe:
    settings = request.app["settings"]
    if request.content_length is not None and request.content_length > settings.max_message_bytes:
        raise _too_large(request, claims, settings.max_message_bytes)
    data = b""
    while len(data) <= settings.max_message_bytes:   # read() gives what has arrived so far
        chunk = await request.content.read(settings.max_message_bytes + 1 - len(data))
        if not chunk:
            break
        data += chunk
    if len(data) > settings.max_message_bytes:
        raise _too_large(request, claims, settings.max_message_bytes)
    try:
        obj = json.loads(data or b"{}")
    except ValueError:
        raise HttpError(400, "bad_request", "the body must be a JSON subscribe message") from None
    if not isinstance(obj, dict):
        raise HttpError(400, "bad_request", "the body must be a JSON object")
    obj.setdefault("type", "subscribe")
    try:
        m = M.parse(json.dumps(obj).encode(), False)
    except M.ProtocolError as e:
        raise HttpError(400, e.code, e.message) from None
    if not isinstance(m, M.Subscribe):
        raise HttpError(400, "bad_request", "the body must be a subscribe message")
    n = len(m.subscriptions.vehicles) + len(m.subscriptions.groups)
    if n > settings.max_subscription_size:
        request.app["security"].of_request(request, "limit", "http", "subscription size", claims.sub)
        raise HttpError(400, "bad_request", f"subscription names {n} vehicles and groups; "
                                            f"at most {settings.max_subscription_size}")
    return m


def _errors(handler):
    async def wrapped(request: web.Request):
        try:
            return await handler(request)
        except HttpError as e:
            return e.response()
    wrapped.__name__ = handler.__name__
    return wrapped


@_errors
async def post(request: web.Request) -> web.Response:
    claims = authenticate(request, "http")
    sub = await _subscribe_body(request, claims)
    if request.query.get("subscription") == "none":
        sub = None   # the browser library: its subscription comes with a PUT
    h = await request.app["http_sessions"].create(request, claims, sub)
    return web.json_response({"session": h.s.session_id}, status=201)


@_errors
async def put(request: web.Request) -> web.Response:
    claims = authenticate(request, "http")
    sub = await _subscribe_body(request, claims)
    registry: HttpSessions = request.app["http_sessions"]
    h, _ = await registry.find(request, claims, request.match_info["session_id"], transport="http")
    await registry._subscribe(h, sub, full_all=False)   # §4: `full` for what came in, `leave` for what went out
    await registry.hub.stores.session_written(h.s.session_id)   # a poll elsewhere sees it
    return web.json_response({"session": h.s.session_id})


@_errors
async def delete(request: web.Request) -> web.Response:
    claims = authenticate(request, "http")
    registry: HttpSessions = request.app["http_sessions"]
    sid = request.match_info["session_id"]
    h = registry.held.get(sid)
    if h is not None and h.s.claims.sub != claims.sub:
        raise _other_user(request, claims, "http")
    if h is None:
        try:
            record = await registry.hub.stores.load_session(sid)
        except Exception:
            raise HttpError(503, "unavailable", "the session cannot be read now: try again",
                            {"Retry-After": "1"}) from None
        if record is None:
            if sid in registry.ended:
                raise HttpError(410, "gone", "the session was ended")
            raise HttpError(404, "not_found", "unknown session")
        if record.get("user_id") != claims.sub:
            raise _other_user(request, claims, "http")
    await registry.end(sid, h, "deleted", deleted=True)
    return web.Response(status=204)
