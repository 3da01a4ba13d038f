"""The workers of one instance (--workers N): worker 0 owns the fleet, the
others mirror it.

Before this, every worker held the whole fleet on its own: it read the relay
of every update through Redis Pub/Sub, applied it, reconciled and consumed
Kafka. A second worker then cost ~0.07 CPU-s/s at 20k updates/s before it
served anyone (benchmarks/README (i)). Now one worker, the owner, does all of
that once: ingest (the simulator, Kafka, the relay from other instances, the
reconcile), liveness (offline, stale) and the Redis writer. At each of its
ticks it sends the followers, over a Unix socket in a directory only this
user can enter (the supervisor makes it), what changed:

  - the rows that go out in this tick, as the core's records (positions,
    status, timestamps), a copy per tick and no per-update work;
  - the ids of rows the followers have not been told of, and of vehicles
    forgotten since the last frame;
  - the rich fields (alerts, driver, assignment, groups) of rows whose rich
    fields changed;
  - the vehicle-type names, when there are new ones (codes are per core).

A follower copies those into its own core, marks them dirty, and its own tick
routes and encodes them for its own clients: what a second worker adds is its
clients' routing and writes, and the copy.

A follower that connects (at start, after the owner restarted, after it was
dropped for falling behind) first gets the whole fleet, in slices made one
per turn of the owner's loop, the tick frames between them (Owner._copy); a
vehicle it held that the owner does not is forgotten at the end of it
(`leave`, stale). The owner sends that only once its first reconcile has loaded the
fleet from Redis.

HTTP ingest that reaches a follower is forwarded to the owner, which treats it
as its own (Kafka when configured, else applied and relayed to other
instances) and answers; a follower without an owner answers 503. Events do
not come through here: every worker reads them from the event log.

Frames are msgpack maps behind a 4-byte length. The owner drops a follower
whose unsent frames pass FOLLOWER_BUFFER_MAX (it reconnects and starts from
the whole fleet again): a stuck follower never makes the owner hold frames
without bound.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import stat
import struct
import time

import msgpack
import numpy as np

from ._core import _schema as S
from ._core._base import records
from ._core._schema import VEHICLE_DTYPE

log = logging.getLogger("realtime.mirror")

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30
SNAPSHOT_SLICE = 2_000                  # vehicles per frame of a whole-fleet copy: ~20 ms of the owner's loop
# a follower this far behind is cut off (it starts again from the whole fleet)
FOLLOWER_BUFFER_MAX = 64 * 1024 * 1024
# above the owner's own Kafka produce bound (app.py, 5 s): its answer comes first
FORWARD_TIMEOUT_S = 10.0
FORWARD_MAX = 64                        # forwarded ingest requests in flight per follower
FORWARD_BUFFER_MAX = 16 * 1024 * 1024   # a follower's unsent forwards, at most (then 503)
RECONNECT_MAX_S = 1.0
HEARTBEAT_S = 1.0                       # the owner sends at least a frame this often
SILENT_S = 5.0                          # a follower that heard nothing this long reconnects
# no core has that many rows (16M vehicles; past ~85k an instance splits by
# region), and a follower's owner-to-local table for the highest is 128 MB
MAX_ROW = 1 << 24
# what a follower checks in the first frame: the same frames and records
# 2: the follower speaks first (hello); 3: tick frames come between the copy's slices;
# 4: frames carry the groups the updates carry, and a copy may be partial ("p")
VERSION = [4, str(VEHICLE_DTYPE.descr)]


def role(settings) -> str | None:
    """'owner', 'follower' or None (one worker: it is all of it)."""
    if settings.workers <= 1 or not getattr(settings, "mirror_dir", None):
        return None
    return "owner" if settings.worker_index == 0 else "follower"


def socket_path(settings) -> str:
    return os.path.join(settings.mirror_dir, "owner.sock")


def _frame(obj) -> bytes:
    body = msgpack.packb(obj, use_bin_type=True)
    return HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader):
    """The next frame, or None at the end of the stream."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError:
        return None
    (n,) = HEADER.unpack(head)
    if n > MAX_FRAME:
        raise ValueError(f"frame of {n} bytes")
    try:
        body = await reader.readexactly(n)
    except asyncio.IncompleteReadError:
        return None
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


async def loaded_unless_down(stores, loaded: asyncio.Event) -> bool:
    """Waits for the Redis snapshot to be loaded: True once it is, False as
    soon as Redis is known to be down (its loops failed) while it is not."""
    while not loaded.is_set():
        if stores.healthy is False:
            return False
        try:
            await asyncio.wait_for(loaded.wait(), 0.1)
        except asyncio.TimeoutError:
            pass
    return True


def _records_frame(core, rows: np.ndarray, rich: list, named) -> dict:
    """The rows' records and rich entries; with `named`, those rows' ids."""
    frame = {"r": rows.tobytes(), "c": records(core.cur, rows).tobytes(), "x": rich}
    if named is not None:
        frame["n"] = [named.tobytes(), [core.ids[r] for r in named.tolist()]]
    return frame


def _rich_entry(core, r: int, mask: int = -1) -> list:
    """[row, alerts, driver, assignment, groups], None for a field that did not
    change (`mask`, F_AL...; -1: all of them, as a whole-fleet copy sends).
    The groups are those the updates carry, never what this worker read from
    the registry: each worker reads the registry for the groups its own
    clients name, and one worker's reading, no longer refreshed once its
    clients stopped naming the group, kept a vehicle in that group on the
    others for good (a group rights widening found by a review)."""
    return [r,
            list(core.alerts[r]) if mask & S.F_AL else None,
            core.driver[r] if mask & (S.F_DR | S.F_DRR) else None,
            core.assignment[r] if mask & S.F_AS else None,
            list(core.carried[r]) if mask & S.F_G else None]


class Owner:
    """Worker 0's side: a frame per tick to every follower, forwarded ingest in."""

    def __init__(self, hub, path: str, sink):
        self.hub = hub
        self.path = path
        self.sink = sink                     # app.py's HTTP-ingest sink
        self.followers: set[asyncio.StreamWriter] = set()
        self.announced = np.zeros(0, bool)  # rows whose id every connected follower was told
        self.types_sent = 0
        self.gone: list[str] = []            # forgotten since the last frame
        self.server = None
        self.frames = 0
        self.dropped = 0
        self.failed = 0                      # frames that could not be made (every follower starts again)
        self._sent_at = 0.0
        self._handlers: set[asyncio.Task] = set()
        self._beat: asyncio.Task | None = None
        hub.core.rich_log = {}

    async def start(self) -> None:
        where = os.path.dirname(self.path)
        os.makedirs(where, 0o700, exist_ok=True)   # a tmp cleaner may have taken it
        if not _ours(where):
            # made by someone else meanwhile: they could stand in for this owner
            raise RuntimeError(f"{where} is not this user's alone: not serving the other workers from it")
        try:
            os.unlink(self.path)   # a previous owner's
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._follower, path=self.path)
        os.chmod(self.path, 0o600)
        self._beat = asyncio.get_running_loop().create_task(self._heartbeat(), name="mirror-heartbeat")

    async def _heartbeat(self) -> None:
        """A quiet owner still says it is alive (a follower that hears nothing
        for SILENT_S starts again)."""
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            try:
                if self.followers and time.monotonic() - self._sent_at >= HEARTBEAT_S:
                    self._send(_frame({"r": b""}))
            except Exception:   # never the end of the heartbeat: followers would reconnect every SILENT_S
                log.exception("mirror heartbeat failed")

    async def stop(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        if self.server is not None:
            self.server.close()
        self._drop_all()
        for t in list(self._handlers):
            t.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=1.0)

    @property
    def connected(self) -> int:
        return len(self.followers)

    # ------------------------------------------------------------ ticks
    def forgotten(self, ids: list[str], rows) -> None:
        """core.forget() dropped these: the followers drop them in the next frame."""
        self.gone.extend(ids)
        rows = np.asarray(rows, np.int64)
        self.announced[rows[rows < len(self.announced)]] = False

    def publish(self):
        """Before the owner's tick: what that tick sends, to the followers.
        Returns the tick's rows (core.dirty_rows()) when it took them, else
        None. Never raises into the tick: a frame that cannot be made cuts
        every follower off, and each starts again from the whole fleet."""
        core = self.hub.core
        rich = core.rich_log
        if not self.followers:
            rich.clear()
            self.gone.clear()
            return None
        rows = None
        try:
            # a row whose rich fields changed is dirty too (_apply_rich), until
            # this tick or until it is forgotten
            rows = core.dirty_rows()
            if not len(rows) and not self.gone:
                return rows
            live_rich = sorted((r, m) for r, m in rich.items() if core.id_to_row.get(core.ids[r]) == r)
            frame = self._rows_frame(rows, [_rich_entry(core, r, m) for r, m in live_rich])
            if self.gone:
                frame["g"] = self.gone
            data = _frame(frame)
        except Exception:
            log.exception("mirror frame failed; the other workers start again from the whole fleet")
            self.failed += 1
            self._drop_all()
            return rows
        finally:
            rich.clear()
            self.gone = []
        self._send(data)
        return rows

    def _rows_frame(self, rows: np.ndarray, rich: list) -> dict:
        core = self.hub.core
        announced = self.announced
        if len(announced) < core.vcap:
            announced = np.zeros(core.vcap, bool)
            announced[: len(self.announced)] = self.announced
        fresh = rows[~announced[rows]]
        frame = _records_frame(core, rows, rich, fresh if len(fresh) else None)
        if len(core.types) != self.types_sent:
            frame["t"] = list(core.types)
        # only now that the frame is made: a failure above leaves these as they were
        announced[fresh] = True
        self.announced = announced
        self.types_sent = len(core.types)
        return frame

    def _send(self, data: bytes) -> None:
        self.frames += 1
        self._sent_at = time.monotonic()
        for w in list(self.followers):
            if w.is_closing():
                self.followers.discard(w)
                continue
            if w.transport.get_write_buffer_size() > FOLLOWER_BUFFER_MAX:
                # behind by more than we keep: it starts again from the whole fleet
                self._drop(w)
                self.dropped += 1
                log.warning("mirror follower dropped: too far behind")
                continue
            w.write(data)

    def _drop(self, w: asyncio.StreamWriter) -> None:
        """The link ends here; abort, not close, frees what it did not read now."""
        self.followers.discard(w)
        w.transport.abort()

    def _drop_all(self) -> None:
        for w in list(self.followers):
            self._drop(w)

    async def _copy(self, w: asyncio.StreamWriter, partial: bool = False) -> None:
        """The whole fleet to one follower, every rich field of every vehicle
        (what is empty now must be empty there too), a slice per turn of the
        loop. Made all at once, 200k vehicles held the owner's loop -- its
        clients' ticks, Kafka, the Redis writer -- for ~2 s on this machine.

        The follower takes the tick frames from the first slice on, so the
        frames and the slices reach it in the order they were made and the
        last one made of a row wins: a slice holds each row as it is when the
        slice is made; a tick frame of a row whose slice has not come yet is
        skipped there (the slice brings it later). A row's vehicle forgotten
        and not yet told (self.gone) is left out: the next frame forgets the
        old one and then names the row, and would forget a copy sent before."""
        core = self.hub.core
        live = np.array(sorted(core.id_to_row.values()), np.int32)
        bounds = list(range(0, len(live), SNAPSHOT_SLICE)) or [0]
        for i, at in enumerate(bounds):
            if i:
                if w.is_closing():
                    return
                await asyncio.sleep(0)   # a tick, a Kafka poll, a client, between slices
                await w.drain()          # at the follower's pace: never the whole copy in a buffer
            part = self._still_live(live[at:at + SNAPSHOT_SLICE])
            # a partial copy (no snapshot: Redis is down) sends no rich field:
            # what this owner has not heard again since it started is not
            # "none", and the follower keeps what it holds (drivers, groups)
            rich = [] if partial else [_rich_entry(core, r) for r in part.tolist()]
            frame = _records_frame(core, part, rich, part)
            frame["t"] = list(core.types)
            frame["k"] = 1
            if partial:   # not the whole fleet: the follower forgets nothing it holds
                frame["p"] = 1
            if i == 0:
                frame["s"] = VERSION
            if i == len(bounds) - 1:
                frame["e"] = 1
            w.write(_frame(frame))
            if i == 0:   # the tick frames from here on go to it as well
                self.followers.add(w)
                log.info("mirror follower connected", extra={"fields": {"followers": len(self.followers)}})

    def _still_live(self, rows: np.ndarray) -> np.ndarray:
        """Those of `rows` that hold a vehicle now (one may have been forgotten
        since the copy began), less those whose vehicle is to be forgotten in
        the next frame."""
        core = self.hub.core
        ids, where, n = core.ids, core.id_to_row, core.n
        gone = set(self.gone)
        return np.array([r for r in rows.tolist() if r < n and where.get(ids[r]) == r and ids[r] not in gone],
                        np.int32)

    async def _follower(self, reader, writer) -> None:
        self._handlers.add(asyncio.current_task())
        inflight = asyncio.Semaphore(FORWARD_MAX)
        tasks: set[asyncio.Task] = set()
        try:
            if not _same_user(writer):
                raise ValueError("a process of another user")
            hello = await asyncio.wait_for(read_frame(reader), SILENT_S)
            if not (isinstance(hello, dict) and hello.get("v") == VERSION):
                # other code (an upgrade in place, half done): no copy for it; it
                # stays not ready until it runs the same code as this owner
                raise ValueError(f"a follower with frames {repr(hello)[:100]}, here {VERSION!r}")
            loaded = getattr(self.hub.stores, "snapshot_loaded", None)
            # the fleet as Redis has it, not an empty start; while Redis is
            # down (this owner restarted during an outage) what this owner has,
            # as a partial copy, rather than nothing for the outage: the
            # followers' clients had frozen positions for all of it
            partial = loaded is not None and not await loaded_unless_down(self.hub.stores, loaded)
            # what is pending goes to the others first: the copy is as of now,
            # and the next frame holds nothing from before it (a vehicle
            # forgotten and back again would be forgotten there)
            self.publish()
            await self._copy(writer, partial)
            if partial:
                # the whole fleet once Redis has given it: a new link, a new copy
                t = asyncio.get_running_loop().create_task(self._recopy_when(loaded, writer))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
            while True:
                msg = await read_frame(reader)
                if msg is None:
                    break
                if not (isinstance(msg, dict) and isinstance(msg.get("u"), list)):
                    raise ValueError("not a forwarded ingest")
                await inflight.acquire()   # a follower sends at most FORWARD_MAX at once
                t = asyncio.get_running_loop().create_task(self._forwarded(writer, msg, inflight))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        except (ConnectionError, ValueError, msgpack.UnpackException, asyncio.TimeoutError) as e:
            log.warning("mirror follower link failed", extra={"fields": {"error": repr(e)[:200]}})
        except asyncio.CancelledError:
            pass   # stop(): this task is the link's whole life, and asyncio logs one that ends cancelled
        finally:
            self._drop(writer)
            for t in tasks:
                t.cancel()
            self._handlers.discard(asyncio.current_task())

    async def _recopy_when(self, loaded: asyncio.Event, writer) -> None:
        await loaded.wait()
        if writer in self.followers:
            log.info("mirror: the snapshot is loaded; the follower that had a partial copy starts again")
            self._drop(writer)

    async def _forwarded(self, writer, msg, inflight) -> None:
        """HTTP ingest a follower received: as if it came here."""
        try:
            await self.sink(msg["u"])
            reply = {"a": msg.get("i")}
        except Exception as e:
            reply = {"a": msg.get("i"), "e": repr(e)[:200]}
        finally:
            inflight.release()
        if not writer.is_closing():
            writer.write(_frame(reply))


class Follower:
    """Workers 1..N-1: the owner's frames into this core; ingest to the owner."""

    def __init__(self, hub, path: str):
        self.hub = hub
        self.path = path
        self.xlate = np.full(0, -1, np.int64)     # the owner's row -> ours
        self.types = np.zeros(256, np.uint8)      # the owner's type code -> ours
        self.connected = False                    # linked, and the whole fleet received
        # a whole fleet received since this worker started: until then it
        # holds no vehicles, and refuses clients (client.start)
        self.has_fleet = False
        self.frames = 0
        # rows the owner had not named here: a tick frame's row whose slice of
        # a whole-fleet copy had not come yet (Owner._copy); after a copy, a bug
        self.unknown_rows = 0
        self.links = 0                            # connections made to the owner
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._snapshot_rows: set[int] | None = None
        self._task: asyncio.Task | None = None
        self._heard = 0.0                         # loop time of the link's last frame
        self._watcher: asyncio.TimerHandle | None = None
        self.silences = 0                         # links cut for SILENT_S without a frame

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="mirror-follower")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1.0)

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                if not _ours(os.path.dirname(self.path)):
                    raise OSError("the socket's directory is not this user's alone")
                reader, writer = await asyncio.open_unix_connection(self.path)
                if not _same_user(writer):
                    writer.transport.abort()
                    raise OSError("the socket is another user's")
            except OSError as e:
                if backoff >= RECONNECT_MAX_S:
                    log.debug("mirror: owner worker not reachable", extra={"fields": {"error": repr(e)[:200]}})
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
                continue
            self._writer = writer
            self.links += 1
            writer.write(_frame({"v": VERSION}))   # the owner copies the fleet only to its own kind
            loop = asyncio.get_running_loop()
            self._heard = loop.time()
            self._watcher = loop.call_later(SILENT_S, self._watch, writer)
            try:
                while True:
                    msg = await read_frame(reader)
                    if msg is None:
                        break
                    self._heard = loop.time()
                    if not isinstance(msg, dict):
                        raise ValueError("not a frame")
                    if "a" in msg:
                        self._answered(msg)
                        continue
                    self.apply(msg)
                    if msg.get("e"):
                        backoff = 0.05   # a whole fleet came through: the link works
            except asyncio.CancelledError:
                raise
            except Exception as e:   # a frame we cannot read: start again from the whole fleet (silence: _watch)
                log.warning("mirror link failed", extra={"fields": {"error": repr(e)[:200]}})
            finally:
                self._watcher.cancel()
                self._writer = None
                self.connected = False
                writer.transport.abort()
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("the owner worker went away"))
                self._pending.clear()
            log.info("mirror link to the owner worker closed; reconnecting")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    def _watch(self, writer: asyncio.StreamWriter) -> None:
        """Once the fleet is here the owner speaks every HEARTBEAT_S (before,
        it may be loading the fleet from Redis): a link silent for SILENT_S is
        cut, and the follower starts again from the whole fleet. A timer that
        moves on with the frames, not a timeout around each read: wait_for
        makes a task per frame, ~13 a second."""
        if self._writer is not writer:
            return
        loop = asyncio.get_running_loop()
        quiet = loop.time() - self._heard
        if self.connected and quiet >= SILENT_S:
            self.silences += 1
            log.warning("mirror link silent; reconnecting", extra={"fields": {"silent_s": round(quiet, 1)}})
            writer.transport.abort()   # the read in _run ends: the link starts again
            return
        self._watcher = loop.call_later(max(SILENT_S - quiet, 0.05) if self.connected else SILENT_S,
                                        self._watch, writer)

    def _answered(self, msg: dict) -> None:
        fut = self._pending.pop(msg.get("a"), None)
        if fut is not None and not fut.done():
            if msg.get("e"):
                fut.set_exception(ConnectionError("owner worker: " + str(msg["e"])[:200]))
            else:
                fut.set_result(None)

    async def forward(self, updates: list[dict]) -> None:
        """HTTP ingest to the owner; raises (503 to the sender) when it cannot take it."""
        w = self._writer
        if w is None or not self.connected:
            raise ConnectionError("the owner worker is not reachable")
        if len(self._pending) >= FORWARD_MAX or w.transport.get_write_buffer_size() > FORWARD_BUFFER_MAX:
            # the owner takes FORWARD_MAX at once; past that, and past what
            # a slow owner has not read, a request is refused now rather
            # than queued here: the buffer grew with the ingest rate for as
            # long as the owner was slow, and each timed-out request's frame
            # stayed in it (found by a review)
            raise ConnectionError("the owner worker is busy")
        req = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        try:
            w.write(_frame({"i": req, "u": updates}))

            async def sent_and_answered():
                await w.drain()
                await fut
            await asyncio.wait_for(sent_and_answered(), FORWARD_TIMEOUT_S)
        finally:
            self._pending.pop(req, None)

    # ------------------------------------------------------------ frames
    def apply(self, f: dict) -> None:
        """One frame into the core. Everything is checked before anything
        changes: a frame that does not fit raises ValueError (the link is then
        started again), never leaves the core half-changed."""
        hub, core = self.hub, self.hub.core
        orows, recs, named, rich, types, gone = self._checked(f)
        self.frames += 1
        if "s" in f:   # a whole fleet from (maybe a new) owner: its rows are new to us
            self.xlate[:] = -1
            self._snapshot_rows = set()
        if types is not None:
            for code, name in enumerate(types):
                self.types[code] = core.vtype_code(name)
        if gone:
            rows = [core.id_to_row[v] for v in dict.fromkeys(gone) if v in core.id_to_row]
            self._unmap(rows)
            hub.forget_rows(rows)
        if named is not None:
            if f.get("k") and not f.get("p") and self._snapshot_rows is not None:   # a slice: every field as it is
                self._renew(named, rich)
            self._name(*named)
        if len(orows):
            local, skipped = core.mirror_rows(self.xlate, orows, recs, self.types)
            self.unknown_rows += skipped
            if self._snapshot_rows is not None:
                self._snapshot_rows.update(local.tolist())
            hub.mirrored(len(local))
        xlate = self.xlate
        for orow, al, dr, asg, grp in rich:
            r = int(xlate[orow]) if orow < len(xlate) else -1
            if r < 0:
                continue
            # the groups the updates carry; this worker adds the registry's
            # for its own clients' groups (_apply_rich, _effective_groups)
            core._apply_rich(r, None if al is None else tuple(al), dr, asg, grp)
        core.new_alerts = []   # the owner publishes alert events; they come from the log
        if f.get("e") and f.get("p"):
            # a partial copy (the owner has no snapshot: Redis is down): what
            # it has goes on from here, and what only we hold stays until the
            # whole copy that follows; a worker without the fleet still has none
            self._snapshot_rows = None
            if not self.connected:
                log.info("mirror: partial fleet received", extra={"fields": {"vehicles": len(core.id_to_row)}})
            self.connected = True
        elif f.get("e"):
            extra = set(core.id_to_row.values()) - self._snapshot_rows
            self._snapshot_rows = None
            if extra:   # held here, unknown to the owner: gone while we were apart
                self._unmap(list(extra))
                hub.forget_rows(sorted(extra))
            if not self.connected:
                log.info("mirror: whole fleet received", extra={"fields": {"vehicles": len(core.id_to_row)}})
            self.connected = self.has_fleet = True
        hub.wake()

    def _checked(self, f: dict):
        """The frame's parts, each checked against what this core can take."""
        if "s" in f and f["s"] != VERSION:
            raise ValueError(f"the owner worker's frames are {f['s']!r}, this worker's {VERSION!r}")
        if ("e" in f or "k" in f) and self._snapshot_rows is None and "s" not in f:
            raise ValueError("a slice of a whole fleet that did not start")
        orows = _rows(f.get("r", b""))
        recs = np.frombuffer(f.get("c", b""), VEHICLE_DTYPE) if len(orows) else np.zeros(0, VEHICLE_DTYPE)
        if len(recs) != len(orows):
            raise ValueError("rows and records differ in length")
        if len(recs) and recs["status"].max() >= len(S.STATUSES):
            raise ValueError("status")
        types = f.get("t")
        if types is not None:
            if not (isinstance(types, list) and len(types) <= S.MAX_TYPES and all(isinstance(t, str) for t in types)):
                raise ValueError("types")
        if len(recs) and recs["vtype"].max() >= (len(types) if types is not None else S.MAX_TYPES):
            raise ValueError("vtype")
        named = None
        if "n" in f:
            n = f["n"]
            if not (isinstance(n, list) and len(n) == 2 and isinstance(n[1], list)):
                raise ValueError("names")
            nrows = _rows(n[0])
            if len(nrows) != len(n[1]) or not all(isinstance(v, str) for v in n[1]):
                raise ValueError("names")
            named = (nrows, n[1])
        rich = f.get("x", [])
        if not isinstance(rich, list):
            raise ValueError("rich fields")
        for e in rich:
            if not (isinstance(e, list) and len(e) == 5 and isinstance(e[0], int) and 0 <= e[0] < MAX_ROW
                    and (e[1] is None or (isinstance(e[1], list) and all(isinstance(a, str) for a in e[1])))
                    and (e[2] is None or isinstance(e[2], dict)) and (e[3] is None or isinstance(e[3], dict))
                    and (e[4] is None or (isinstance(e[4], list) and all(isinstance(g, str) for g in e[4])))):
                raise ValueError("rich fields")
        gone = f.get("g", [])
        if not (isinstance(gone, list) and all(isinstance(v, str) for v in gone)):
            raise ValueError("gone")
        return orows, recs, named, rich, types, gone

    def free_unlisted(self) -> None:
        """Rows this worker's registry reads made for vehicles never heard of,
        which no registry group lists any more (CoreBase.unlisted_rows): freed
        here, unless the owner names them (then it decides)."""
        rows = self.hub.core.unlisted_rows()
        if rows:
            mapped = set(np.intersect1d(self.xlate, np.asarray(rows, np.int64)).tolist())
            mine = [r for r in rows if r not in mapped]
            if mine:
                self.hub.forget_rows(np.asarray(mine, np.int32))

    def _renew(self, named, rich) -> None:
        """In a whole-fleet copy: a vehicle held here whose driver or assignment
        the owner no longer has (cleared while we were apart) is forgotten
        and made again from the copy (`leave`, then `full`), as "no driver"
        is not a change an update can make."""
        core = self.hub.core
        ids = dict(zip(named[0].tolist(), named[1]))
        stale = []
        for orow, _, dr, asg, _ in rich:
            r = core.id_to_row.get(ids.get(orow))
            if r is not None and ((dr is None and core.driver[r] is not None)
                                  or (asg is None and core.assignment[r] is not None)):
                stale.append(r)
        if stale:
            self._unmap(stale)
            self.hub.forget_rows(stale)

    def _name(self, orows: np.ndarray, ids: list) -> None:
        core = self.hub.core
        get = core.id_to_row.get
        local = [get(v) for v in ids]
        missing = list(dict.fromkeys(v for v, r in zip(ids, local) if r is None))
        if missing:
            made = dict(zip(missing, core._new_vehicles(missing)))
            local = [r if r is not None else made[v] for v, r in zip(ids, local)]
        top = int(orows.max()) + 1 if len(orows) else 0
        if top > len(self.xlate):
            grown = np.full(max(top, 2 * len(self.xlate)), -1, np.int64)
            grown[: len(self.xlate)] = self.xlate
            self.xlate = grown
        self.xlate[orows] = np.array(local, np.int64)

    def _unmap(self, local_rows) -> None:
        if len(local_rows) and len(self.xlate):
            self.xlate[np.isin(self.xlate, np.asarray(local_rows, np.int64))] = -1


def _rows(raw) -> np.ndarray:
    if not isinstance(raw, bytes) or len(raw) % 4:
        raise ValueError("rows")
    rows = np.frombuffer(raw, np.int32)
    # one pass: a negative row read as unsigned is past MAX_ROW too
    if len(rows) and rows.view(np.uint32).max() >= MAX_ROW:
        raise ValueError("rows out of range")
    return rows


def _ours(directory: str) -> bool:
    """The directory exists, is a directory (not a link), is this user's, and
    nobody else may enter it."""
    try:
        st = os.lstat(directory)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o077


def _same_user(writer: asyncio.StreamWriter) -> bool:
    """The other end of a Unix socket runs as this user (SO_PEERCRED)."""
    sock = writer.get_extra_info("socket")
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    except (OSError, AttributeError):   # not Linux: the directory's mode is the guard
        return True
    return uid == os.getuid()
