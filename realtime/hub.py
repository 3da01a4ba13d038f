"""This worker's sessions and the per-tick fan-out through the core.

The hub owns the core. Ingest calls `apply` (one core call per batch); the
tick task calls `flush` at most once every --tick-ms, as soon as there is
something to send: one core.tick() that returns
[(body, client rows)], then one write per client. Client commands run
`flush` first, so that the core's "no pending changes" precondition holds and
a command's snapshot is never followed by a repeat of the same state.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time

import msgspec
import numpy as np

from ._core import Core, UpdateBatch
from ._core._fanout import fan_out
from ._core._schema import FMT_JSON, msgpack_array_head, msgpack_items
from .auth import Claims
from .ingest.decode import to_batch
from .latency import Histogram
from .loadmon import LoadMonitor
from .messages import Subscribe
from . import replay
from .recent import Recent, RecentEvents
from .security import SecurityEvents, rights_change
from .session import Session
from .stores.base import Event
from .stores.memory import MemoryStores
from .stores.records import NoRecords
from .tasks import Signal, cancel_and_wait

log = logging.getLogger("realtime.hub")
CLUSTER_REFRESH_S = 1.0  # clustered clients get at most one `clusters` a second
# Vehicles turned offline, or forgotten as stale, per tick at most: 20,000 at
# once (a feed outage) held one tick for 0.5 s (offline) and 7 s (stale).
VEHICLE_SLICE = 1000
# Shutdown's `reconnect.after_ms` spreads the clients' return over at least
# clients / RECONNECTS_PER_S seconds (at most MAX_SPREAD_MS).
RECONNECTS_PER_S = 500
MAX_SPREAD_MS = 30_000


class Stats:
    """Counters that /metrics will export (issue 5 moves them to prometheus-client)."""

    def __init__(self):
        self.ingest_updates = 0
        self.ingest_rejected: dict[str, int] = {}
        self.frames_sent = 0
        self.ticks = 0
        self.tick_seconds = 0.0   # route + encode + write, summed over ticks
        self.events = 0
        self.events_unknown_vehicle = 0
        self.went_offline = 0        # vehicles silent past --offline-after-s
        self.forgotten = 0           # vehicles silent past --stale-after-s, dropped
        self.conflations = 0         # times a slow connection stopped getting positions
        self.frames_conflated = 0    # batches not written to a conflating connection
        self.slow_closed = 0         # closed 1013: its events could not be kept
        self.pong_timeouts = 0
        # gRPC calls closed with a write the reader never took, which grpc
        # keeps until the client reads or goes (transports/grpc_stream.py)
        self.grpc_lingering = 0
        self.commands: dict[str, int] = {}   # client messages handled, by type
        self.background_errors: dict[str, int] = {}   # failed background work, by kind
        # by transport (websocket, sse, long_poll, grpc): connections opened,
        # and the messages and bytes of those that closed (metrics.py adds
        # the open ones)
        self.opened: dict[str, int] = {}
        self.closed_messages: dict[str, int] = {}
        self.closed_bytes: dict[str, int] = {}
        self.cluster_refreshes = 0   # refresh_clusters runs
        self.cluster_views = 0       # distinct views (and formats) encoded by them
        self.cluster_seconds = 0.0
        self.mirrored_rows = 0       # rows a follower worker took from the owner's frames

    def reject(self, reason: str, n: int = 1):
        self.ingest_rejected[reason] = self.ingest_rejected.get(reason, 0) + n


class Hub:
    def __init__(self, settings, core: Core | None = None):
        self.settings = settings
        self.core = core or Core(vehicle_capacity=4096, client_capacity=256)
        self.sessions: dict[int, Session] = {}
        # user -> their attached sessions: an ACL update reaches them without a
        # pass over every session (a Pub/Sub reconnect re-reads every user's)
        self._by_user: dict[str, set] = {}
        # core row -> the session's transport (an Outlet) or None, for fan_out:
        # a list, indexed without hashing per write
        self.outlets: list = []
        self.instance_id = settings.instance_id or f"{os.getpid():x}"
        self.stats = Stats()
        self._bg_logged: dict[str, tuple[float, int]] = {}   # kind -> (last logged, suppressed since)
        self._tick_no = 0
        self._task: asyncio.Task | None = None
        self.stores = MemoryStores()
        self.records = NoRecords()   # PostgreSQL (app.py sets it with --postgres)
        self.security = SecurityEvents(self)
        self.acl_generation = 0      # acl:updates seen (acl_changed)
        self._view_memo: dict = {}   # see _views_memo
        self._memo_at = float("-inf")
        self._memo_epoch = -1
        self.last_eid: str | None = None   # the newest event handed to the core
        # the newest event that every client has been written (or held for):
        # last_eid as of the last tick (mailbox.py's marks)
        self.flushed_eid: str | None = None
        self.recent = RecentEvents()       # the newest events read from the log, for replays
        self.store_replays = asyncio.Semaphore(replay.STORE_REPLAYS)   # replays reading the stores
        self._bg: set[asyncio.Task] = set()
        self._per_ip: dict[str, int] = {}
        self._per_user: dict[str, int] = {}
        self.core.jitter_s = settings.idle_jitter_s
        self.core.jitter_m = settings.idle_jitter_m
        self.latency = Histogram()
        self._arrivals: list[tuple[float, int]] = []   # (monotonic time, updates) since the last tick
        self.conflating: set[Session] = set()
        self.load = LoadMonitor()
        self._work = Signal()   # set by ingest and events: the tick has something to do
        # --workers N (mirror.py): worker 0 owns the fleet and sends each tick's
        # changes to the others, which route them for their own clients
        self.owner = None      # mirror.Owner in worker 0
        self.follower = None   # mirror.Follower in the others

    # ------------------------------------------------------------ ingest
    def apply_updates(self, updates: list[dict], aged_up_to=0.0, alerts: bool = True) -> int:
        """Validated updates (ingest.decode.validate) -> core. Returns how many were applied."""
        if not updates:
            return 0
        return self.apply(to_batch(updates, self.core.vtype_code), aged_up_to, alerts)

    def apply(self, batch: UpdateBatch, aged_up_to=0.0, alerts: bool = True) -> int:
        """`aged_up_to` > 0 (seconds, or an array of them, one per update):
        history, heard when its timestamps say (core.apply).
        `alerts` False: state read back from the Redis snapshot, whose alerts
        were raised as events by whoever applied the update that carried
        them (an alert new to this core is not new: raised again, its
        dedupe key has the hash's later timestamp, and every client would
        get it twice at each restart)."""
        before = self.core.ignored_stale
        now = time.monotonic()
        rows, _ = self.core.apply(batch, now, aged_up_to)
        if not alerts:
            self.core.new_alerts = []
        self._arrivals.append((now, len(batch)))
        self.stats.ingest_updates += len(batch)
        self.stores.changed(rows)
        if self.core.new_alerts and self.owner is not None:
            # the other workers learn of a new vehicle from the owner's frame
            # and of its alert from the event log: the frame goes first, now,
            # before the alert is written (mirror.py)
            self.owner.publish()
        for row, alert in self.core.new_alerts:
            # a new alert is an event: it goes through the event log for its eid
            ts = int(self.core.cur[row]["ts"])
            self.spawn(self.stores.publish_event(self.core.ids[row], "alert", {"alert": alert}, ts, True))
        # woken after the alerts are on their way: with the in-memory log an
        # alert is then in the same tick as its update, ahead of it (priority)
        self._work.set()
        return len(batch) - (self.core.ignored_stale - before)

    def mirrored(self, n: int) -> None:
        """A follower took `n` rows from the owner's frame (mirror.py)."""
        self._arrivals.append((time.monotonic(), n))
        self.stats.mirrored_rows += n

    def wake(self) -> None:
        self._work.set()

    def spawn(self, coro) -> None:
        """Fire-and-forget work off the delivery path, kept referenced until
        done. A failure (Redis down, mostly) is counted by kind and logged at
        most once a minute per kind, not one traceback per write."""
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg_done)

    async def settle(self, timeout: float) -> None:
        """Let the background writes in flight (session records, connection
        sets) finish before the stores close: at shutdown they carry what the
        clients need to resume elsewhere."""
        if self._bg:
            await asyncio.wait(list(self._bg), timeout=timeout)

    def _bg_done(self, t: asyncio.Task) -> None:
        self._bg.discard(t)
        if t.cancelled() or t.exception() is None:
            return
        e = t.exception()
        kind = getattr(t.get_coro(), "__qualname__", "task")
        errors = self.stats.background_errors
        errors[kind] = errors.get(kind, 0) + 1
        now = time.monotonic()
        last, suppressed = self._bg_logged.get(kind, (-1e9, 0))
        if now - last < 60.0:
            self._bg_logged[kind] = (last, suppressed + 1)
            return
        self._bg_logged[kind] = (now, 0)
        log.warning("background work failed", extra={"fields": {
            "kind": kind, "error": repr(e)[:200], "suppressed": suppressed, "total": errors[kind]}})

    def deliver_event(self, ev: Event) -> None:
        """An event from the log's tail: to every client that sees the vehicle, next tick."""
        pieces = None
        if self.core.add_event(ev.vehicle_id, ev.etype, ev.body, ev.eid, ev.ts, ev.is_alert):
            self.stats.events += 1
            self._work.set()
            pieces = self.core.events[-1][1:3]
        else:
            self.stats.events_unknown_vehicle += 1
        if not ev.eid.endswith("-local"):
            self.last_eid = ev.eid
            self.recent.add(Recent(ev, pieces))

    def logged(self, ev: Event) -> None:
        """A log entry that is not delivered (it was, with a local id, while
        the log could not be written): kept for replays all the same."""
        self.last_eid = ev.eid
        self.recent.add(Recent(ev, None))

    def log_reset(self) -> None:
        """The log no longer continues what was read from it: replays go to
        the stores until the kept events are complete again."""
        self.recent.clear()

    # ------------------------------------------------------------ ticks
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hub-tick")
        self.load.start()

    async def stop(self) -> None:
        await cancel_and_wait(self._task)
        self._task = None
        await self.load.stop()

    async def _run(self) -> None:
        period = self.settings.tick_ms / 1000.0
        loop = asyncio.get_running_loop()
        last = loop.time()
        next_clusters = last + CLUSTER_REFRESH_S
        next_second = last + 1.0
        behind = False
        while True:
            # At most one tick per period, and within that as soon as there is
            # something to send: an update that arrives after a quiet spell goes
            # out at once rather than waiting up to a period for the clock. A
            # steady stream still gets exactly one tick per period.
            # Waiting for work comes first and the period's rest after it, so
            # that a worker fed every 100 ms wakes once per batch, not also at
            # each period's end to find nothing: on this machine a wake-up
            # costs the process ~0.1 ms of CPU whatever it then does (bench_idle).
            # Without work it wakes for the once-a-second duties below, and
            # every period while a slow client may have drained (_conflating_tick).
            if not self._work.is_set():
                due = last + period if self.conflating else min(next_second, next_clusters)
                await self._work.wait(max(0.0, due - loop.time()))
            wait = last + period - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            self._work.clear()
            last = loop.time()
            try:
                clusters = loop.time() >= next_clusters
                if clusters:
                    next_clusters = loop.time() + CLUSTER_REFRESH_S
                self.flush(rebuild=True, clusters=clusters)
                if loop.time() >= next_second:
                    next_second = loop.time() + 1.0
                    behind = self.check_vehicles(time.monotonic())
                    self.check_connections(time.monotonic())
                elif behind:   # a slice of a mass offline or forget is left: next tick
                    behind = self.check_vehicles(time.monotonic())
                if behind:
                    self._work.set()
            except Exception:  # a bug in one tick must not stop delivery for good
                log.exception("tick failed")
            self.load.poke()   # on this wake-up rather than one of its own (loadmon.py)

    def flush(self, rebuild: bool = False, clusters: bool = False) -> None:
        """Route and send now. Commands call it with rebuild=False (see Core.tick);
        the tick loop with clusters=True once a CLUSTER_REFRESH_S."""
        t0 = time.perf_counter()
        try:
            self._flush(rebuild, clusters)
        finally:
            self.stats.tick_seconds += time.perf_counter() - t0

    def _flush(self, rebuild: bool, clusters: bool = False) -> None:
        # sessions conflating before this tick get its events held instead
        already = list(self.conflating) if self.conflating else None
        events = list(self.core.events) if already else None
        self.flushed_eid = self.last_eid
        # what this tick sends, to the other workers too
        rows = self.owner.publish() if self.owner is not None else None
        out = self.core.tick(rebuild, time.monotonic(), rows)
        if clusters:
            try:
                out = self._with_clusters(out)
            except Exception:   # the tick's events and positions go out all the same
                log.exception("clusters refresh failed")
        self._tick_no += 1
        self.stats.ticks += 1
        if out:
            # one write per client, in compiled code (_fanout.pyx)
            frames, skipped, congested, failed = fan_out(out, self.outlets, self.batch_id(),
                                                         self.core.envelope)
            self.stats.frames_sent += frames
            self.stats.frames_conflated += skipped
            for row, e in failed:   # the others have had their tick
                self.sessions[row].write_failed(e)
            for row in congested:
                s = self.sessions[row]
                if not s.closed:
                    self._conflate(s)
        if already:
            self._conflating_tick(already, events)
        if self._arrivals:
            self.latency.observe_arrivals(self._arrivals, time.monotonic())
            self._arrivals.clear()

    # ------------------------------------------------------------ slow clients
    def _conflate(self, s: Session) -> None:
        """PROTOCOL §3.3: the connection's write buffer passed its high-water
        mark. Stop writing position batches to it and remember what it has;
        events are held for it. It gets the latest state once it drains."""
        s.known = self.core.visible_rows(s.row)
        s.held = []
        self.conflating.add(s)
        self.stats.conflations += 1

    def _conflating_tick(self, sessions, events) -> None:
        limit = self.settings.slow_client_max_events
        for s in sessions:
            if s.closed or s.row < 0:
                self.conflating.discard(s)
                continue
            for row, jp, mp, is_alert in events or ():
                if self._sees(s, row) and (s.show_alerts or not is_alert):
                    s.held.append((self.core.ids[row], mp if s.fmt else jp))
            if len(s.held) > limit:
                # the one thing that is never dropped cannot be kept: the
                # client resumes with last_event and gets them from the log
                self.stats.slow_closed += 1
                self.records.event("slow_client_closed", s.client_id, None, held_events=len(s.held))
                self.conflating.discard(s)
                s.close(1013, f"slow client: more than {limit} events waiting")
            elif not s.replaying and not s.transport.congested_now():
                self._catch_up(s)

    def _catch_up(self, s: Session) -> None:
        """Flowing again (or a command needs a consistent view): one batch with
        the latest state of what it sees, `leave` for what it lost, then the
        events it missed."""
        if s.known is None or s.replaying:
            return
        known, held = s.known, s.held
        s.known, s.held = None, []
        self.conflating.discard(s)
        body = self.core.resync(s.row, known)
        if s.cells is not None:
            s.cells = [None]  # resend the clusters at the next refresh
        s.send_batch(self.core.envelope, self.batch_id(), body)
        for part in replay.batches([piece for _, piece in held]):   # at most 1,000 messages and 1 MiB each (§3.4)
            s.send_batch(self.core.envelope, self.batch_id(), self.core.body_of(s.fmt, part))
        # the next ticks tell whether it keeps up: the catch-up's own bytes do
        # not count (send_batch), what piles up behind them does

    @property
    def tick_no(self) -> int:
        return self._tick_no

    def batch_id(self) -> bytes:
        return f"{self.instance_id}-{self._tick_no}".encode()

    # ------------------------------------------------------------ sessions
    def take_address(self, peer: str) -> str | None:
        """A connection from `peer` before it is authenticated: why it may not
        open, or None and it counts against the per-IP limit (checked and
        taken in one step) until release_address(), or admit(address_taken=True)
        and unadmit()."""
        limit = self.settings.max_connections_per_ip
        if self._per_ip.get(peer, 0) >= limit:
            return f"more than {limit} connections from this address"
        self._per_ip[peer] = self._per_ip.get(peer, 0) + 1
        return None

    def release_address(self, peer: str) -> None:
        _release(self._per_ip, peer)

    def admit(self, s: Session, address_taken: bool = False) -> str | None:
        """Why this connection may not open (per-IP and per-user limits), or
        None: then it counts against both limits at once, before the awaits
        of the connect path (a burst could otherwise pass the check together),
        until unadmit(). address_taken: take_address() counted it already
        (released here when the user's limit refuses it)."""
        st = self.settings
        if not address_taken and self._per_ip.get(s.peer, 0) >= st.max_connections_per_ip:
            return f"more than {st.max_connections_per_ip} connections from this address"
        if self._per_user.get(s.claims.sub, 0) >= st.max_connections_per_user:
            if address_taken:
                self.release_address(s.peer)
            return f"more than {st.max_connections_per_user} connections for this user"
        s.counted = (s.peer, s.claims.sub)
        if not address_taken:
            self._per_ip[s.peer] = self._per_ip.get(s.peer, 0) + 1
        self._per_user[s.claims.sub] = self._per_user.get(s.claims.sub, 0) + 1
        return None

    def unadmit(self, s: Session) -> None:
        """Release what admit() counted; once, whatever the way out."""
        if s.counted is None:
            return
        peer, user = s.counted
        s.counted = None
        _release(self._per_ip, peer)
        _release(self._per_user, user)

    def attach(self, s: Session) -> None:
        c = s.claims
        s.row = self.core.add_client(s.fmt, c.view_all, c.vehicles, c.groups, c.contacts)
        self.sessions[s.row] = s
        self._by_user.setdefault(c.sub, set()).add(s)   # a session's user never changes
        if s.row >= len(self.outlets):
            self.outlets.extend([None] * (s.row + 1 - len(self.outlets)))
        self.outlets[s.row] = s.transport

    def detach(self, s: Session) -> None:
        self.conflating.discard(s)
        if s.row >= 0 and self.sessions.get(s.row) is s:
            del self.sessions[s.row]
            mine = self._by_user.get(s.claims.sub)
            if mine is not None:
                mine.discard(s)
                if not mine:
                    del self._by_user[s.claims.sub]
            self.outlets[s.row] = None
            self.core.remove_client(s.row)
            s.row = -1
        self.unadmit(s)

    def subscribe(self, s: Session, msg, reply: bool = True, full_all: bool = True) -> None:
        """full_all: `full` for every visible vehicle (§3 `subscribe`), else
        for what came in only (§4 PUT on a session: `leave` for what went out)."""
        self.flush()
        self._catch_up(s)
        sub, f = msg.subscriptions, msg.filters
        geo = sub.geographic
        bounds = geo.bounds.as_tuple() if geo and geo.bounds else None
        zoom = geo.zoom if geo else None
        visible, body = self.core.subscribe(s.row, sub.vehicles, sub.groups, bounds, zoom,
                                            f.status, f.vehicle_types, f.show_alerts, full_all)
        s.view = (bounds, zoom)
        body = self._cluster_or(s, visible, body)
        if reply:
            s.send({"type": "subscribed", **({"id": msg.id} if msg.id is not None else {}),
                    "visible": visible})
        s.send_batch(self.core.envelope, self.batch_id(), body)
        old_vehicles = s.subscription.get("subscriptions", {}).get("vehicles", []) if s.subscription else []
        s.subscription = msgspec.to_builtins(msg)
        s.subscription.pop("id", None)
        s.subscription.pop("type", None)
        self.spawn(self.stores.set_client_vehicles(s.client_id, old_vehicles, list(sub.vehicles)))
        self.save_session(s)
        self.records.subscribed(s.claims.sub, sub.vehicles)
        self.records.event("subscribe", s.client_id, None, vehicles=len(sub.vehicles),
                           groups=list(sub.groups)[:50], geographic=geo is not None, visible=visible)

    def viewport(self, s: Session, msg) -> None:
        self.flush()
        self._catch_up(s)
        bounds = msg.bounds.as_tuple()
        body = self.core.set_viewport(s.row, bounds, msg.zoom)
        s.view = (bounds, msg.zoom)
        body = self._cluster_or(s, self.core.visible_count(s.row), body)
        s.send_batch(self.core.envelope, self.batch_id(), body, msg.id)
        if s.subscription is None:
            s.subscription = {"subscriptions": {}, "filters": {}}
        geo = {"bounds": dict(zip(("south", "west", "north", "east"), bounds)), "zoom": msg.zoom}
        s.subscription.setdefault("subscriptions", {})["geographic"] = geo
        self.save_session(s)

    def unsubscribe(self, s: Session, msg) -> None:
        self.flush()
        self._catch_up(s)
        body = self.core.unsubscribe(s.row)
        s.view = (None, None)
        if s.cells is not None:
            self.core.set_clustered(s.row, False)
            s.cells = None
            body = self._clusters_body(s, [])
        s.send({"type": "unsubscribed", **({"id": msg.id} if msg.id is not None else {})})
        s.send_batch(self.core.envelope, self.batch_id(), body)
        old_vehicles = s.subscription.get("subscriptions", {}).get("vehicles", []) if s.subscription else []
        s.subscription = None
        self.spawn(self.stores.set_client_vehicles(s.client_id, old_vehicles, []))
        self.save_session(s)

    # ------------------------------------------------------------ sessions in the store
    def session_record(self, s: Session) -> dict:
        """`session:{id}` (PROTOCOL §1.3): what another instance needs to resume."""
        sub = s.subscription or {}
        geo = (sub.get("subscriptions") or {}).get("geographic")
        return {"user_id": s.claims.sub, "role": s.claims.role,
                "permissions": sorted(s.claims.permissions), "client": s.client_id,
                "subscription": sub.get("subscriptions"), "filters": sub.get("filters"),
                "viewport": geo, "instance_id": self.instance_id,
                "connected_at": int(s.connected_at * 1000), "last_ping": int(s.last_ping * 1000),
                "transport": s.kind, **{k: v for k, v in (s.extra or {}).items() if k[0] != "_"}}

    def save_session(self, s: Session) -> None:
        """An HTTP session's copy (transports/sessions.py) writes its record
        only while the record still names it: once another instance took the
        session over (or it was deleted), an old copy's save must not undo that."""
        extra = s.extra
        only_if = None
        if extra:   # "" for a record without a copy (a WebSocket session's)
            only_if = extra["copy"] if extra.get("_claimed") else extra.get("_claim_from")
        self.spawn(self.stores.save_session(s.session_id, self.session_record(s), only_if))

    def stored_subscription(self, s: Session, record: dict):
        """(the stored subscription as a Subscribe, or None; whether it could
        be read). One written by another version, or by hand, cannot."""
        if record.get("subscription") is None:
            return None, True
        try:
            return msgspec.convert({"type": "subscribe", "subscriptions": record["subscription"] or {},
                                    "filters": record.get("filters") or {}}, Subscribe), True
        except (msgspec.ValidationError, TypeError, AttributeError) as e:
            log.warning("stored subscription unreadable; resuming without it",
                        extra={"fields": {"client": s.client_id, "error": str(e)[:200]}})
            return None, False

    def resume(self, s: Session, msg) -> None:
        """Restore a stored subscription (stored_subscription's) for a resuming
        client: its `full` snapshot goes out now. Synchronous: nothing is
        delivered in between."""
        self.flush()
        if msg is not None:
            self.subscribe(s, msg, reply=False)
        else:
            s.send_batch(self.core.envelope, self.batch_id(), self.core.empty_body(s.fmt))

    # ------------------------------------------------------------ resume's replay (replay.py)
    def hold_for_replay(self, s: Session) -> None:
        """From the next tick on, hold this client's traffic as for a slow
        client (events kept, positions caught up later) while its replay runs."""
        s.replaying = True
        s.known = self.core.visible_rows(s.row)
        s.held = []
        self.conflating.add(s)

    def event_pieces_for(self, s: Session, items: list[Recent]):
        """(vehicle id, encoded `event` message) of the log entries this client
        may see; each encoded once, for every client that replays it (recent.py)."""
        for ev, pieces in items:
            row = self.core.row_of(ev.vehicle_id)
            if row < 0 or not self._sees(s, row) or (ev.is_alert and not s.show_alerts):
                continue
            yield ev.vehicle_id, (pieces or self.core.event_pieces(row, ev.etype, ev.body, ev.eid, ev.ts))[s.fmt]

    def send_events(self, s: Session, pieces: list[bytes]) -> None:
        s.send_batch(self.core.envelope, self.batch_id(), self.core.body_of(s.fmt, pieces))

    def replay_done(self, s: Session) -> None:
        """The next tick catches the client up: latest state, then what was held."""
        s.replaying = False
        self._work.set()

    def _sees(self, s: Session, row: int) -> bool:
        return bool((int(self.core.vis[row, s.row >> 6]) >> (s.row & 63)) & 1)

    async def acl_changed(self, user_id: str, read=None) -> None:
        """PUBLISH acl:updates {user}: apply the live rights to that user's
        connections. `read`: how to read them (stores.acl by default)."""
        # counted before anything else: a connection that read its ACL before
        # this and attaches after it is not among the targets, and sees the
        # count moved (client.start, client._refresh)
        self.acl_generation += 1
        await self.reapply_acl(user_id, read)

    async def reapply_acl(self, user_id: str, read=None) -> None:
        """The user's ACL read again and applied to their connections. It
        does not count as an update: a re-read must not make connects that
        overlap it read again in turn."""
        targets = list(self._by_user.get(user_id, ()))
        if not targets:
            return
        acl = await (read or self.stores.acl)(user_id)
        for s in targets:
            if not s.closed and s.row >= 0:
                s.acl = acl
                old, new = s.claims, s.token_claims.with_acl(acl)
                if (old.view_all, old.vehicles, old.groups, old.contacts) == \
                        (new.view_all, new.vehicles, new.groups, new.contacts):
                    s.claims = new   # nothing the client sees changes: no diff to send
                else:
                    self.set_claims(s, new)
                change = rights_change(old, new)
                if change:
                    self.security.report("acl_applied", s.kind, s.peer, change, user_id, s.client_id)

    # ------------------------------------------------------------ clusters
    def _cluster_or(self, s: Session, visible: int, body: bytes) -> bytes:
        """PROTOCOL §3.1 `clusters`: below --cluster-below-zoom, or with more
        than --max-visible vehicles, the client gets aggregated cells instead
        of individual vehicles. Returns the body to send for the command."""
        bounds, zoom = s.view
        st = self.settings
        want = (zoom is not None and zoom < st.cluster_below_zoom) or visible > st.max_visible
        if want:
            self.core.set_clustered(s.row, True)
            s.cells = self._view_body(s, self._views_memo(), {})
            return s.cells
        if s.cells is not None:
            s.cells = None
            # an empty `clusters` first: a client clears its cells even when no
            # vehicle is visible in the new view (no `full` would tell it)
            from .messages import encode
            return prepend_piece(s.fmt, encode(s.fmt, {"t": "clusters", "z": zoom, "cells": []}),
                                 self.core.set_clustered(s.row, False))
        return body

    def _cell_deg(self, s: Session) -> float:
        """90 / 2^zoom degrees (~64 px at 256-px tiles); without a zoom, 1/16
        of the viewport's longer side. Rounded down to 90 / 2^k, so that
        views of fractional zooms, or of none, share the grid of a whole zoom
        (and with it the aggregate view_cells keeps per grid)."""
        bounds, zoom = s.view
        if zoom is not None:
            raw = 90.0 / (2.0 ** zoom)
        elif bounds is not None:
            south, west, north, east = bounds
            width = east - west if east >= west else east + 360.0 - west
            raw = max(north - south, width, 1e-6) / 16.0
        else:
            raw = 360.0 / 64.0
        k = min(30, max(0, math.ceil(math.log2(90.0 / raw) - 1e-9)))
        return 90.0 / 2 ** k

    def _clusters_body(self, s: Session, cells: list) -> bytes:
        zoom = s.view[1]
        msg = {"t": "clusters", "z": zoom, "cells": cells}
        from .messages import encode
        return encode(s.fmt, [msg])

    def _views_memo(self) -> dict:
        """view_cells' aggregates, shared by the refresh and the commands of
        one tick period: a clustered client that pans pays for its window,
        not for a pass over the fleet. Dropped when a selection id is given
        out or freed (it would name another set of vehicles) and after a tick
        period (vehicles move)."""
        now = time.monotonic()
        epoch = self.core.sel_epoch
        if now - self._memo_at > self.settings.tick_ms / 1000.0 or epoch != self._memo_epoch:
            self._view_memo, self._memo_at, self._memo_epoch = {}, now, epoch
        return self._view_memo

    def _view_body(self, s: Session, memo: dict, bodies: dict) -> bytes:
        """The encoded `clusters` body of s's view (core.view_key): its cells
        computed once per view and encoded once per view and format, within
        one refresh (`memo` and `bodies`), for every client that has it."""
        zoom = s.view[1]
        key = self.core.view_key(s.row, self._cell_deg(s))
        ck = (key, zoom, s.fmt)
        body = bodies.get(ck)
        if body is None:
            cells = memo.get(("cells", key))
            if cells is None:
                cells = memo[("cells", key)] = self.core.view_cells(key, memo) if key is not None else []
            body = bodies[ck] = self._clusters_body(s, cells)
        return body

    def refresh_clusters(self) -> dict[int, bytes]:
        """The cells of clustered clients whose picture changed, as {row:
        body}: once a second, each distinct view computed and encoded once,
        the same bytes for all its clients. s.cells holds the body last sent
        (_with_clusters sends them, and sets it)."""
        t0 = time.perf_counter()
        memo, bodies = self._views_memo(), {}
        changed = {}
        for s in list(self.sessions.values()):
            if s.cells is None or s.known is not None:
                continue
            body = self._view_body(s, memo, bodies)
            if body != s.cells:
                changed[s.row] = body
        st = self.stats
        st.cluster_refreshes += 1
        st.cluster_views += len(bodies)
        st.cluster_seconds += time.perf_counter() - t0
        return changed

    def _with_clusters(self, out: list) -> list:
        """The tick's [(body, rows)] with the clusters refresh in it: one frame
        per client per tick, so a clustered client whose tick carries an event
        gets its new cells in the same frame (after the event). The others
        that share a view share its body, as the tick's clients share theirs."""
        changed = self.refresh_clusters()
        if not changed:
            return out
        sessions = self.sessions
        sent = dict(changed)
        merged = []
        for body, rows in out:
            if not any(r in changed for r in rows):
                merged.append((body, rows))
                continue
            rest = [r for r in rows if r not in changed]
            if rest:
                merged.append((body, rest))
            for r in rows:
                if r in changed:
                    merged.append((join_bodies(sessions[r].fmt, body, changed.pop(r)), [r]))
        by_body: dict[bytes, list] = {}
        for r, body in changed.items():
            by_body.setdefault(body, []).append(r)
        merged.extend(by_body.items())
        # only now: had the merge failed, the next refresh would find them changed still
        for r, body in sent.items():
            sessions[r].cells = body
        return merged

    # ------------------------------------------------------------ once a second
    def check_vehicles(self, now: float) -> bool:
        """PROTOCOL §3.3: silent for --offline-after-s turns `offline` (sent by
        the next tick as a delta); silent for --stale-after-s gets `leave` with
        `r: stale` and is forgotten. At most VEHICLE_SLICE of each per call,
        so that a whole fleet going silent at once (a feed outage) never holds
        a tick: returns True when some are left for the next tick."""
        if self.follower is not None:
            # the owner decides, and its frames say so (mirror.py); rows this
            # worker's own registry reads made are its own to free
            self.follower.free_unlisted()
            return False
        st = self.settings
        core = self.core
        stale = core.silent_rows(now - st.stale_after_s)
        behind = len(stale) > VEHICLE_SLICE
        stale = stale[:VEHICLE_SLICE]
        if len(stale):
            forgotten_ids = self._drop(stale)
            for vid in forgotten_ids:
                self.records.event("vehicle_stale", None, vid)
            log.info("vehicles forgotten", extra={"fields": {"count": int(len(stale)),
                                                             "silent_s": st.stale_after_s}})
        # rows the registry made for vehicles never heard of, which it no
        # longer lists: nothing else frees them (they never turn stale)
        unlisted = core.unlisted_rows()[:VEHICLE_SLICE]
        if unlisted:
            self._drop(np.asarray(unlisted, np.int32))
        off = core.mark_offline(core.silent_rows(now - st.offline_after_s), VEHICLE_SLICE)
        if len(off):
            self.stores.changed(off)
            self.stats.went_offline += len(off)
            for r in off:
                self.records.event("vehicle_offline", None, core.ids[r])
        return behind or len(off) == VEHICLE_SLICE

    def _drop(self, rows) -> list[str]:
        """Forgets rows here, in the other workers and in Redis (the writer
        takes them out of the geo index and of the groups their updates
        carried). Returns their ids."""
        core = self.core
        ids = [core.ids[r] for r in rows]
        carried = [core.carried[r] for r in rows]
        self.forget_rows(rows)
        self.stores.forgotten(ids, carried)
        if self.owner is not None:
            self.owner.forgotten(ids, rows)
        return ids

    def forget_rows(self, rows) -> None:
        """`leave` (r: stale) to the clients that see these rows, then the
        core drops them (stale here, or gone from the owner's fleet)."""
        if not len(rows):
            return
        core = self.core
        self.flush()
        for s in list(self.conflating):   # forget() needs every view current
            self._catch_up(s)
        envelope, batch_id = core.envelope, self.batch_id()
        for body, rows_ in core.forget(rows):
            for row in rows_:
                s = self.sessions.get(row)
                if s is not None:
                    s.send_batch(envelope, batch_id, body)
        for s in self.conflating:   # re-conflated since: its rows may be reused
            s.known = np.setdiff1d(s.known, rows)
        self.stats.forgotten += len(rows)

    def check_connections(self, now: float) -> None:
        """Heartbeat (PROTOCOL §3.3): pings, and closes what stopped answering.
        Token expiry (§2): `token_expiring` --token-expiry-warning-s ahead,
        close 4001 at exp."""
        st = self.settings
        timeout = st.pong_timeout_s
        wall = time.time()
        for s in list(self.sessions.values()):
            if s.closed:
                continue
            try:
                if s.token_claims.exp <= wall:
                    self.security.report("expired_token", s.kind, s.peer, "closed at exp: not refreshed",
                                         s.claims.sub, s.client_id)
                    s.close(4001, "token expired")
                    continue
                self.warn_expiry(s, wall)
                if not s.transport.keepalive(now, st.heartbeat_s, timeout):
                    self.stats.pong_timeouts += 1
                    self.records.event("heartbeat_timeout", s.client_id, None, timeout_s=timeout)
                    s.close(1011, f"no pong for {timeout:g} s")
            except Exception as e:   # its ping could not be written: this one only
                s.write_failed(e)

    def warn_expiry(self, s: Session, wall: float) -> None:
        """`token_expiring` once per token, --token-expiry-warning-s ahead; at
        once for a token that is already that close (at connect, at refresh)."""
        left = s.token_claims.exp - wall
        if left <= self.settings.token_expiry_warning_s and not s.expiry_warned:
            s.expiry_warned = True
            s.send({"type": "token_expiring", "in_s": int(max(0.0, left))})

    def set_claims(self, s: Session, claims: Claims) -> None:
        """New rights (token refresh, ACL update): diff what the client sees."""
        self.flush()
        self._catch_up(s)
        narrowed = s.claims.takes_away(claims)
        s.claims = claims
        body = self.core.set_rights(s.row, claims.view_all, claims.vehicles, claims.groups,
                                    claims.contacts)
        if body not in (b"[]", b"\x90"):
            s.send_batch(self.core.envelope, self.batch_id(), body)
        if narrowed:
            if s.held:
                # events held during a replay (_catch_up waits for its end)
                # were kept under the rights before: the catch-up would send
                # them after the `leave` above
                s.held = self.allowed(claims, s.held)
            s.transport.rights_narrowed()

    # ------------------------------------------------------------ shutdown
    async def say_goodbye(self, grace_s: float) -> None:
        """PROTOCOL §5: tell every client to reconnect elsewhere (after a jittered
        delay, so that they do not all come back at once), let the outboxes drain,
        then close with 1001."""
        import random
        sessions = list(self.sessions.values())
        # the more clients, the wider the spread: an instance that takes them
        # over admits a few hundred a second (the reconnect storm benchmark:
        # 10,000 clients back within 3 s overflowed its accept queue, and
        # 12% of them had to try again)
        spread_ms = int(max(min(5000.0, max(500.0, grace_s * 300)),
                            min(MAX_SPREAD_MS, len(sessions) * 1000 / RECONNECTS_PER_S)))
        for s in sessions:
            s.send({"type": "reconnect", "reason": "shutdown", "after_ms": random.randint(100, spread_ms)})
        deadline = asyncio.get_running_loop().time() + max(0.1, grace_s / 3)
        while asyncio.get_running_loop().time() < deadline:
            if all(s.transport.pending() == 0 for s in sessions if not s.closed):
                break
            await asyncio.sleep(0.02)
        for s in sessions:
            s.close(1001, "server shutting down")
        # give the close frames a moment to leave
        await asyncio.sleep(0.05)

    # ------------------------------------------------------------ reads
    def allowed(self, claims: Claims, pairs: list) -> list:
        """The (vehicle id, encoded event) pairs of vehicles that `claims`
        may see: its rights alone, not its view (a vehicle that left the
        viewport keeps its events). A set per call, not may_see's scans: an
        ACL may name thousands of vehicles, and a replay holds up to
        --slow-client-max-events."""
        if claims.view_all:
            return pairs
        vehicles, groups = set(claims.vehicles), set(claims.groups)
        return [pair for pair in pairs if pair[0] in vehicles or (groups and self._in_groups(pair[0], groups))]

    def may_see(self, claims: Claims, vehicle_id: str) -> bool:
        if claims.view_all or vehicle_id in claims.vehicles:
            return True
        return bool(claims.groups) and self._in_groups(vehicle_id, claims.groups)

    def _in_groups(self, vehicle_id: str, groups) -> bool:
        """Whether the vehicle is a member of one of `groups` (a set or a tuple)."""
        row = self.core.row_of(vehicle_id)
        return row >= 0 and any(g in groups for g in self.core.groups_of[row])

    def long_form(self, claims: Claims, vehicle_id: str) -> dict | None:
        from .ingest.decode import iso_ms
        d = self.core.long_form(vehicle_id, claims.contacts)
        if d is not None:
            d["timestamp"] = iso_ms(d["timestamp"])
        return d


def _release(counts: dict, key) -> None:
    """One count less for key; a key at zero is dropped (the dicts stay as
    small as what is open)."""
    n = counts.get(key, 1) - 1
    if n:
        counts[key] = n
    else:
        counts.pop(key, None)


def prepend_piece(fmt: int, piece: bytes, body: bytes) -> bytes:
    """An encoded message put before the others of an encoded batch body."""
    if fmt == FMT_JSON:
        return b"[" + piece + (b"]" if body == b"[]" else b"," + body[1:])
    n, rest = msgpack_items(body)
    return msgpack_array_head(n + 1) + piece + rest


def join_bodies(fmt: int, first: bytes, second: bytes) -> bytes:
    """Two encoded batch bodies as one: the messages of `first`, then those
    of `second`."""
    if fmt == FMT_JSON:
        if first == b"[]":
            return second
        return first if second == b"[]" else first[:-1] + b"," + second[1:]
    n1, rest1 = msgpack_items(first)
    n2, rest2 = msgpack_items(second)
    return msgpack_array_head(n1 + n2) + rest1 + rest2


__all__ = ["Hub", "Stats", "FMT_JSON", "join_bodies", "prepend_piece"]
