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
dropped for falling behind) first gets the whole fleet, in slices; a vehicle
it held that the owner does not is forgotten at the end of it (`leave`,
stale). The owner sends that only once its first reconcile has loaded the
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
import struct

import msgpack
import numpy as np

from ._core._schema import VEHICLE_DTYPE

log = logging.getLogger("realtime.mirror")

HEADER = struct.Struct("<I")
MAX_FRAME = 1 << 30
SNAPSHOT_SLICE = 10_000                 # vehicles per frame of a whole-fleet copy
FOLLOWER_BUFFER_MAX = 256 * 1024 * 1024
FORWARD_TIMEOUT_S = 5.0
RECONNECT_MAX_S = 1.0
# the record fields a follower takes as they are; the versions of rich fields
# and has_alerts are its own (its _apply_rich keeps them), the type is mapped
COPIED = ("lat", "lon", "speed", "course", "ts", "status", "version")


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


def _rich_entry(core, r: int) -> list:
    return [r, list(core.alerts[r]), core.driver[r], core.assignment[r], list(core.groups_of[r])]


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
        self._handlers: set[asyncio.Task] = set()
        hub.core.rich_log = set()

    async def start(self) -> None:
        try:
            os.unlink(self.path)   # a previous owner's
        except FileNotFoundError:
            pass
        self.server = await asyncio.start_unix_server(self._follower, path=self.path)
        os.chmod(self.path, 0o600)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for w in list(self.followers):
            w.close()
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

    def publish(self) -> None:
        """Before the owner's tick: what that tick sends, to the followers."""
        core = self.hub.core
        rich = core.rich_log
        if not self.followers:
            rich.clear()
            self.gone.clear()
            return
        # a row whose rich fields changed is dirty too (_apply_rich), until
        # this tick or until it is forgotten
        rows = np.flatnonzero(core.dirty[: core.n])
        live_rich = sorted(r for r in rich if core.id_to_row.get(core.ids[r]) == r)
        rich.clear()
        if not len(rows) and not self.gone:
            return
        frame = self._rows_frame(rows.astype(np.int32), live_rich)
        if self.gone:
            frame["g"] = self.gone
            self.gone = []
        self._send(_frame(frame))

    def _rows_frame(self, rows: np.ndarray, rich_rows) -> dict:
        core = self.hub.core
        if len(self.announced) < core.vcap:
            grown = np.zeros(core.vcap, bool)
            grown[: len(self.announced)] = self.announced
            self.announced = grown
        fresh = rows[~self.announced[rows]]
        self.announced[fresh] = True
        ids = core.ids
        frame = {"r": rows.tobytes(), "c": core.cur[rows].tobytes(),
                 "x": [_rich_entry(core, r) for r in rich_rows]}
        if len(fresh):
            frame["n"] = [fresh.tobytes(), [ids[r] for r in fresh.tolist()]]
        if len(core.types) != self.types_sent:
            self.types_sent = len(core.types)
            frame["t"] = list(core.types)
        return frame

    def _send(self, data: bytes) -> None:
        self.frames += 1
        for w in list(self.followers):
            if w.is_closing() or w.transport.get_write_buffer_size() > FOLLOWER_BUFFER_MAX:
                # behind by more than we keep: it starts again from the whole fleet
                self.followers.discard(w)
                self.dropped += 1
                log.warning("mirror follower dropped: too far behind")
                w.close()
                continue
            w.write(data)

    def _snapshot(self, w: asyncio.StreamWriter) -> None:
        """The whole fleet to one follower, in slices; synchronous, so that no
        tick's frame falls between it and the follower's first tick frame."""
        core = self.hub.core
        live = np.array(sorted(core.id_to_row.values()), np.int32)
        types = list(core.types)
        parts = [live[i:i + SNAPSHOT_SLICE] for i in range(0, len(live), SNAPSHOT_SLICE)] or [live]
        for i, part in enumerate(parts):
            rich = [r for r in part.tolist()
                    if core.alerts[r] or core.driver[r] is not None or core.assignment[r] is not None
                    or core.groups_of[r]]
            frame = {"r": part.tobytes(), "c": core.cur[part].tobytes(),
                     "x": [_rich_entry(core, r) for r in rich],
                     "n": [part.tobytes(), [core.ids[r] for r in part.tolist()]], "t": types}
            if i == 0:
                frame["s"] = 1
            if i == len(parts) - 1:
                frame["e"] = 1
            w.write(_frame(frame))

    async def _follower(self, reader, writer) -> None:
        self._handlers.add(asyncio.current_task())
        try:
            loaded = getattr(self.hub.stores, "snapshot_loaded", None)
            if loaded is not None:
                await loaded.wait()   # the fleet as Redis has it, not an empty start
            self._snapshot(writer)
            self.followers.add(writer)
            log.info("mirror follower connected", extra={"fields": {"followers": len(self.followers)}})
            while True:
                msg = await read_frame(reader)
                if msg is None:
                    break
                await self._forwarded(writer, msg)
        except (ConnectionError, ValueError, msgpack.UnpackException) as e:
            log.warning("mirror follower link failed", extra={"fields": {"error": repr(e)[:200]}})
        finally:
            self.followers.discard(writer)
            writer.close()
            self._handlers.discard(asyncio.current_task())

    async def _forwarded(self, writer, msg) -> None:
        """HTTP ingest a follower received: as if it came here."""
        req = msg.get("i") if isinstance(msg, dict) else None
        updates = msg.get("u") if isinstance(msg, dict) else None
        if not isinstance(updates, list):
            raise ValueError("not a forwarded ingest")
        try:
            await self.sink(updates)
            reply = {"a": req}
        except Exception as e:
            reply = {"a": req, "e": repr(e)[:200]}
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
        self.frames = 0
        self.unknown_rows = 0                     # rows the owner never named (a bug if not 0)
        self._writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._snapshot_rows: set[int] | None = None
        self._task: asyncio.Task | None = None

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
                reader, writer = await asyncio.open_unix_connection(self.path)
            except OSError:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RECONNECT_MAX_S)
                continue
            backoff = 0.05
            self._writer = writer
            try:
                while True:
                    msg = await read_frame(reader)
                    if msg is None:
                        break
                    if "a" in msg:
                        fut = self._pending.pop(msg["a"], None)
                        if fut is not None and not fut.done():
                            if msg.get("e"):
                                fut.set_exception(ConnectionError("owner: " + msg["e"]))
                            else:
                                fut.set_result(None)
                        continue
                    self.apply(msg)
            except asyncio.CancelledError:
                raise
            except Exception as e:   # a frame we cannot read: start again from the whole fleet
                log.warning("mirror link failed", extra={"fields": {"error": repr(e)[:200]}})
            finally:
                self._writer = None
                self.connected = False
                writer.close()
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("the owner worker went away"))
                self._pending.clear()
            log.info("mirror link to the owner worker closed; reconnecting")

    async def forward(self, updates: list[dict]) -> None:
        """HTTP ingest to the owner; raises (503 to the sender) when it cannot take it."""
        w = self._writer
        if w is None or not self.connected:
            raise ConnectionError("the owner worker is not reachable")
        req = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[req] = fut
        try:
            w.write(_frame({"i": req, "u": updates}))
            await asyncio.wait_for(fut, FORWARD_TIMEOUT_S)
        finally:
            self._pending.pop(req, None)

    # ------------------------------------------------------------ frames
    def apply(self, f: dict) -> None:
        hub, core = self.hub, self.hub.core
        self.frames += 1
        if f.get("s"):   # a whole fleet from (maybe a new) owner: its rows are new to us
            self.xlate[:] = -1
            self._snapshot_rows = set()
        if "t" in f:
            for code, name in enumerate(f["t"][:256]):
                self.types[code] = core.vtype_code(name)
        gone = f.get("g")
        if gone:
            rows = [core.id_to_row[v] for v in dict.fromkeys(gone) if v in core.id_to_row]
            self._unmap(rows)
            hub.forget_rows(rows)
        if "n" in f:
            self._name(np.frombuffer(f["n"][0], np.int32), f["n"][1])
        orows = np.frombuffer(f["r"], np.int32)
        if len(orows):
            recs = np.frombuffer(f["c"], VEHICLE_DTYPE)
            if len(recs) != len(orows):
                raise ValueError("rows and records differ in length")
            local = np.full(len(orows), -1, np.int64)
            inside = orows < len(self.xlate)
            local[inside] = self.xlate[orows[inside]]
            ok = local >= 0
            if not ok.all():
                self.unknown_rows += int((~ok).sum())
                local, recs = local[ok], recs[ok]
            cur = core.cur
            for name in COPIED:
                cur[name][local] = recs[name]
            cur["vtype"][local] = self.types[recs["vtype"]]
            core.dirty[local] = 1
            if self._snapshot_rows is not None:
                self._snapshot_rows.update(local.tolist())
            hub.mirrored(len(local))
        xlate = self.xlate
        for orow, al, dr, asg, grp in f.get("x", ()):
            r = int(xlate[orow]) if 0 <= orow < len(xlate) else -1
            if r >= 0:
                core._apply_rich(r, tuple(al), dr, asg, tuple(grp))
        core.new_alerts = []   # the owner publishes alert events; they come from the log
        if f.get("e"):
            extra = set(core.id_to_row.values()) - (self._snapshot_rows or set())
            self._snapshot_rows = None
            if extra:   # held here, unknown to the owner: gone while we were apart
                self._unmap(list(extra))
                hub.forget_rows(sorted(extra))
            if not self.connected:
                log.info("mirror: whole fleet received", extra={"fields": {"vehicles": len(core.id_to_row)}})
            self.connected = True
        hub.wake()

    def _name(self, orows: np.ndarray, ids: list) -> None:
        core = self.hub.core
        if len(ids) != len(orows):
            raise ValueError("rows and ids differ in length")
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
