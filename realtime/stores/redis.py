"""The Redis stores (PROTOCOL §1.3), shared by every worker and instance.

Keys written here and read here:
- `vehicle:current:{id}` hash (EXPIRE --stale-after-s, 7200) and `vehicles:geoindex`: written
  once per 100 ms, pipelined, by the one instance holding the `realtime:writer`
  lease (all instances see the same Kafka stream; one writer is enough). The
  hash also carries `groups`, `alerts`, `driver`, `assignment` as JSON so that
  a snapshot restores a vehicle whole.
- `vehicles:changes`: the change feed. With each pipeline of hashes the writer
  XADDs one entry that lists their vehicles and timestamps (msgpack), kept
  CHANGES_KEEP_MS. Every 5 s each instance reads the feed from where it left
  off, and HGETALLs and applies only the vehicles whose feed timestamp is
  newer than its memory: reconciling costs one XRANGE per instance and what
  changed, not the fleet (issue 14).
- The safety net, for what the feed cannot show (a hash written by something
  else, a feed entry trimmed while an instance was away): a SCAN of
  `vehicle:current:*` comparing the `timestamp` field with memory, spread over
  the reconciles at --reconcile-scan-per-s keys a second, so that a whole
  pass takes between 5 s (a fleet of up to 1,000 at the default) and
  FULL_PASS_MAX_S. At start, and when the feed has a gap, a whole pass at
  once: the first loads the snapshot, so a new instance shows the fleet at once.
- `events:stream`: the event log. Each instance turns the Pub/Sub events it
  receives, and the new alerts it detects, into one XADD through a script
  that drops duplicates (every instance receives the same PUBLISH; the
  dedupe keys `evdedupe:{events:stream}:*` share the log's slot); every
  instance then delivers from the stream's tail, so an event's `eid` is its
  stream id everywhere, and resume reads the stream (XRANGE).
- `session:{id}`, `group:{name}:vehicles`, `acl:user:{user}` and the
  `acl:updates` channel, as the table in §1.3 says. `user:connections:{user}`,
  `subscribers:vehicle:{id}` and `subscriptions:client:{client}` are kept by
  presence.py, which also removes them after an instance that died.
- `realtime:updates`: HTTP-ingested updates relayed to the other workers.

Every loop here survives Redis going away: it marks the store unhealthy, waits
with jittered backoff and resynchronises; delivery from memory goes on.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import random
import secrets
import time

import msgpack
import msgspec
import numpy as np
from redis.exceptions import NoPermissionError, ResponseError

from .._core._base import records
from .._core._schema import MAX_ID_LEN, NOTHING_GROUP
from ..ingest.decode import Rejected, decode_relay, relay_origin, too_large, validate, validate_relayed
from .presence import Presence
from .redis_conn import DOWN, Scanner, clustered, connect, mget, run_ids
from .base import EVENT_LOG_MAX, EVENT_RETENTION_S, SESSION_TTL_S, Event, StoresUnavailable, eid_key

log = logging.getLogger("realtime.redis")
_json_decode = msgspec.json.Decoder().decode

STREAM = "events:stream"
WRITER_LEASE = "realtime:writer"
ACL_FIELDS = ("permissions", "vehicles", "groups")   # acl:user:{id} (PROTOCOL §1.3)
RELAY = "realtime:updates"
# The TTL is refreshed at most once a minute per vehicle, not with every HSET:
# a key then expires between 1:59 and 2:00 after its last update, for half the commands.
EXPIRE_EVERY_S = 60.0
RECONCILE_EVERY_S = 5.0
LEASE_MS = 10_000             # the writer lease (`realtime:writer`)
LEASE_RENEW_S = 3.0
LEASE_MARGIN_S = 6.0          # a writer stops this long before its lease could have run out (> the socket timeout)
CHANGES = "vehicles:changes"
CHANGES_KEEP_MS = 30_000      # an instance away longer than this reads the whole keyspace again
FEED_PAGE = 200               # feed entries per XRANGE (each lists up to WRITE_SLICE vehicles)
FULL_PASS_MAX_S = 600.0       # the safety scan covers every key at least this often
# Large work in slices of ~10-20 ms each, with the event loop free in between
# (issue 10 part 6): hashes written per pipeline, and hashes read and applied
# per step of a reconcile.
WRITE_SLICE = 1000
RECONCILE_SLICE = 500
DEDUPE_MS = 5000
# An alert's key holds its vehicle's timestamp, so it names one alert for good:
# kept as long as a replay reaches back, so that an instance whose Kafka lags
# (or that loads the vehicle with the reconcile) does not log it again
ALERT_DEDUPE_MS = 10 * 60 * 1000
SESSION_RETRIES = (0.5, 1.0, 2.0)   # a session write that fails is tried again after these pauses
MAX_EVENT_BYTES = 16 * 1024   # an instant event's body, as published (PROTOCOL §1.2)
LOCAL_KEYS_MAX = 10_000   # events delivered locally during one outage that are remembered
LOCAL_KEYS_S = 600.0      # and for how long
ACLS_KEPT = 100_000       # users whose last-read ACL is remembered (least recently read go first)
ACL_RETRY_S = 0.5         # an acl:updates that could not be read is read again this often
_DOWN = DOWN   # Redis unreachable or failing (redis_conn.py)

# SET NX + XADD in one step: of the instances that saw the same event, one adds it.
ADD_ONCE = """
if redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', unpack(ARGV, 3))
end
return false
"""
# an HTTP session's copy saves its record only while the record names it
SAVE_SESSION_IF = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
local ok, rec = pcall(cjson.decode, v)
if not ok or type(rec) ~= 'table' then return 0 end
local copy = rec['copy']
if type(copy) ~= 'string' then copy = '' end
if copy ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[3])
return 1
"""

# a session's record goes only while it names the copy that ends it (an idle
# copy here must not delete a session another instance took over since)
DELETE_SESSION = """
local v = redis.call('GET', KEYS[1])
if not v then return 0 end
if ARGV[1] ~= '' then
  local ok, rec = pcall(cjson.decode, v)
  if not ok or type(rec) ~= 'table' or rec['copy'] ~= ARGV[1] then return 0 end
end
return redis.call('DEL', KEYS[1])
"""

# the writer lease: renewed if it is ours (1), taken if nobody holds it (2), else 0
TAKE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 2
end
return 0
"""
# the change feed after ARGV[1], if the feed still holds ARGV[1] (else nil: a gap)
FEED_PAGE_AFTER = """
if #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1], 'COUNT', 1) == 0 then return false end
return redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
"""
# give the lease up only if it is still ours
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def dedupe_key(digest: str, cluster: bool) -> str:
    """The SET NX key of ADD_ONCE. It is used in one script with the event
    log, so on a Redis Cluster it must lie in the log's slot: the log's name
    is its hash tag ({events:stream} hashes as the key events:stream does).
    One server keeps the name it always had, so that a rolling upgrade does
    not log an event twice (old and new instances would not see each other's keys)."""
    return f"evdedupe:{{{STREAM}}}:{digest}" if cluster else f"evdedupe:{digest}"


class Repeats:
    """How many times each key came, counting only comings within `window_s`
    of the one before: the n-th of identical instant events is an event of its
    own. Every instance gets the same PUBLISHes in the same order, so each
    numbers them alike, and the log takes each (payload, n) once: identical
    payloads were merged into one (door open, closed, open again within 5 s:
    the map showed it closed). At most `max_n` keys are kept."""

    def __init__(self, max_n: int, window_s: float):
        self.max_n, self.window_s = max_n, window_s
        self._last: dict[bytes, tuple[int, float]] = {}   # key -> (n, when), oldest first

    def count(self, key: bytes) -> int:
        now = time.monotonic()
        last = self._last
        before = last.pop(key, None)
        n = before[0] + 1 if before is not None and now - before[1] <= self.window_s else 1
        while last and (len(last) >= self.max_n or now - next(iter(last.values()))[1] > self.window_s):
            del last[next(iter(last))]
        last[key] = (n, now)
        return n

    def __len__(self) -> int:
        return len(self._last)


class RecentKeys:
    """Keys seen lately, at most `max_n` of them and none older than `max_age_s`:
    what is older cannot come back (the dedupe window has passed)."""

    def __init__(self, max_n: int, max_age_s: float):
        self.max_n, self.max_age_s = max_n, max_age_s
        self._at: dict[str, float] = {}

    def add(self, key: str) -> None:
        now = time.monotonic()
        at = self._at
        at.pop(key, None)   # re-added: it moves to the end, so the oldest stays first
        while at and (len(at) >= self.max_n or now - next(iter(at.values())) > self.max_age_s):
            del at[next(iter(at))]
        at[key] = now

    def pop(self, key: str) -> bool:
        """Whether `key` was added within the window; it is removed either way."""
        t = self._at.pop(key, None)
        return t is not None and time.monotonic() - t <= self.max_age_s

    def __len__(self) -> int:
        return len(self._at)


# The relay's columns: numeric ones as the arrays' bytes (little-endian, as
# numpy lays them out here), the rest as lists. Receiving 20k updates a second
# as dicts (unpack, then a Python loop to build the batch) cost each worker
# about a tenth of a core; columns cost a copy (issue 14 part 4).
_RELAY_NUMERIC = (("lat", "<f8"), ("lon", "<f8"), ("speed", "<f8"), ("course", "<f8"),
                  ("status", "u1"), ("vtype", "u1"), ("ts", "<i8"))
_RELAY_RICH = ("alerts", "driver", "assignment", "groups")


def pack_relay(origin: str, batch, types: list) -> bytes:
    """One relay message: the batch's columns, with the sender's vehicle-type
    names (its codes are its own core's)."""
    msg = {"o": origin, "ids": batch.ids, "types": list(types)}
    for name, dtype in _RELAY_NUMERIC:
        msg[name] = np.ascontiguousarray(getattr(batch, name), dtype).tobytes()
    for name in _RELAY_RICH:
        msg[name] = getattr(batch, name)
    return msgpack.packb(msg, use_bin_type=True)


def unpack_relay(m, vtype_code):
    """A decoded relay message (ingest/decode.py decode_relay) -> an
    UpdateBatch for this core, or ValueError. Anyone who can PUBLISH to
    Redis can send one, so it is held to what `validate` asks of any update:
    the rich columns as they were decoded, the numeric ones here, a column
    at a time."""
    from .._core._schema import KEEP, STATUSES, UpdateBatch
    ids = m.ids
    n = len(ids)
    cols = {}
    for name, dtype in _RELAY_NUMERIC:
        raw = getattr(m, name)
        if len(raw) != n * np.dtype(dtype).itemsize:
            raise ValueError(name)
        cols[name] = np.frombuffer(raw, dtype).copy()   # the core's typed views need writable buffers
    lat, lon, speed, course, ts = cols["lat"], cols["lon"], cols["speed"], cols["course"], cols["ts"]
    # NaN fails every comparison, so the positions must be finite; speed
    # and course may be NaN (not carried), as validate leaves them
    if not ((np.abs(lat) <= 90).all() and (np.abs(lon) <= 180).all()):
        raise ValueError("position")
    if not (np.isnan(speed) | ((speed >= 0) & (speed <= 10000))).all():
        raise ValueError("speed")
    if not (np.isnan(course) | ((course >= 0) & (course < 360))).all():
        raise ValueError("course")
    if not ((ts >= 0) & (ts <= 100_000_000_000_000)).all():
        raise ValueError("ts")
    status = cols["status"]
    if ((status >= len(STATUSES)) & (status != KEEP)).any():
        raise ValueError("status")
    types = m.types
    # the sender's codes -> this core's; KEEP stays KEEP
    table = np.full(256, KEEP, np.uint8)
    used = np.unique(cols["vtype"])
    for code in used[used != KEEP]:
        if code >= len(types):
            raise ValueError("vtype")
        table[code] = vtype_code(types[code])
    return UpdateBatch(ids, lat, lon, speed, course, status, table[cols["vtype"]], ts,
                       m.alerts, m.driver, m.assignment, m.groups)


_REPLY_OFF = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$3\r\nOFF\r\n"
_REPLY_ON = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$2\r\nON\r\n"


# The writer's usual command, position and status only, in RESP (key, then
# the six values), and one member of its GEOADD (lon, lat, id).
_HSET_POSITION = (b"*14\r\n$4\r\nHSET\r\n$%d\r\n%b\r\n$3\r\nlat\r\n$%d\r\n%b\r\n$3\r\nlon\r\n$%d\r\n%b\r\n"
                  b"$5\r\nspeed\r\n$%d\r\n%b\r\n$6\r\ncourse\r\n$%d\r\n%b\r\n$6\r\nstatus\r\n$%d\r\n%b\r\n"
                  b"$9\r\ntimestamp\r\n$%d\r\n%b\r\n")
_GEO_MEMBER = b"$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n"
GEO_MAX_LAT = 85.05112878


def pack_resp(cmds) -> bytes:
    """Commands (sequences of str or bytes) in RESP, as redis-py would send
    them, without its per-argument machinery."""
    out = []
    add = out.append
    for args in cmds:
        add(b"*%d\r\n" % len(args))
        for a in args:
            if not isinstance(a, bytes):
                a = a.encode()
            add(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


def _feed_pairs(body):
    """(vehicle id, timestamp ms) of one change-feed entry; nothing for an
    entry that is not the writer's shape (another writer's mistake must not
    stall the reconcile: the safety scan covers what it meant)."""
    try:
        ids, stamps = msgpack.unpackb(body, raw=False)
        if not isinstance(ids, list) or not isinstance(stamps, list):
            return ()
        return [(v, t) for v, t in zip(ids, stamps)
                if isinstance(v, str) and isinstance(t, int) and not isinstance(t, bool)]
    except Exception:
        return ()


def _id_ms(stream_id: str) -> int:
    """The Redis clock's milliseconds in a stream id."""
    return int(stream_id.split("-", 1)[0])


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _utf8(b: bytes) -> bool:
    """A registry member that can be a vehicle id (one that is not UTF-8 is skipped)."""
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


class RedisStores:
    def __init__(self, settings, instance_id: str = ""):
        self.settings = settings
        # A bounded pool: a burst of connects waits at most --redis-pool-timeout-s
        # for one of --redis-pool-size connections, then fails (and is refused
        # with 1013) instead of opening connections without end. Named, so that
        # an operator (and the tests) can tell an instance's connections apart.
        # One server or a Redis Cluster (redis_conn.py).
        self.r = connect(settings.redis, max_connections=settings.redis_pool_size,
                         wait_s=settings.redis_pool_timeout_s, name=f"realtime:{instance_id}")
        # The log's tail and the Pub/Sub link hold a connection for as long
        # as they listen: on their own small pool, so that a burst that
        # exhausts the shared one never stalls them (nor marks Redis down)
        self.r_listen = connect(settings.redis, max_connections=4, wait_s=settings.redis_pool_timeout_s,
                                name=f"realtime:{instance_id}:listen")
        self.pool = self.r.pool
        self.cluster = clustered(self.r)
        self.hub = None
        # None until a loop has reached Redis; False once it has failed: then
        # connects do not wait for it (see acl, load_session, resolve_*)
        self.healthy: bool | None = None
        self.leader = False
        self.follower = False   # see start()
        self._lease_at = float("-inf")   # when the writer lease was last taken or renewed (monotonic)
        self._servers: dict | None = None   # the primaries' run_ids at the last renewal (redis_conn.run_ids)
        self._ops = 0                    # commands sent (redis_operations_total, with presence's)
        self.presence = Presence(self.r, instance_id, settings.instance_timeout_s)
        self.reconciled = 0
        self.feed_cursor: str | None = None   # the last change-feed entry read; None: a whole pass first
        self._scanner = Scanner(self.r, "vehicle:current:*")   # where the spread scan goes on
        self._feed_skew_ms = None             # Redis's clock minus ours, from the feed's ids (trimming)
        self.full_passes = 0                  # reconcile_* in GET /metrics
        self.feed_gaps = 0
        self.feed_vehicles = 0
        self.scanned = 0
        self._changed: set[int] = set()
        self._expired_at: dict[int, float] = {}   # row -> when its TTL was last set
        self._rich_written: dict[int, tuple] = {}  # row -> (vehicle, the rest of its hash) as last written
        self._quiet: bool | None = None   # CLIENT REPLY OFF usable for the writer (None: not tried yet)
        self._tasks: list[asyncio.Task] = []
        self._add_once = self.r.register_script(ADD_ONCE)
        self._take = self.r.register_script(TAKE)
        self._delete_session = self.r.register_script(DELETE_SESSION)
        self._save_session_if = self.r.register_script(SAVE_SESSION_IF)
        self._feed_page = self.r.register_script(FEED_PAGE_AFTER)
        self._local_seq = 0
        # Each event once, by its dedupe key, when an XADD fails mid-way (the
        # link broke): one delivered here with a local id is skipped when
        # another instance's copy comes through the log, and one that came
        # through the log already is not delivered locally again.
        self._local_keys = RecentKeys(LOCAL_KEYS_MAX, LOCAL_KEYS_S)
        self._logged_keys = RecentKeys(LOCAL_KEYS_MAX, DEDUPE_MS / 1000 * 2)
        self._repeats = Repeats(LOCAL_KEYS_MAX, DEDUPE_MS / 1000)
        # user -> the ACL last read for them (None: none set). PROTOCOL §2: a
        # Redis error never widens rights, so this stays in force while Redis
        # cannot answer; a user never read then cannot be admitted.
        self._acls: dict[str, dict | None] = {}
        # users connected here whose acl:updates could not be read: their
        # connections keep the rights in force, and they are read again when
        # Redis answers (_acls_behind_read); at most one entry per user
        self._acls_behind: set[str] = set()
        self._acls_behind_wake = asyncio.Event()
        self._session_latest: dict[str, str] = {}   # session -> newest record, while one is being written
        self.snapshot_loaded = asyncio.Event()
        # {partition: offset} that the Kafka consumer has applied (KafkaIngest.applied,
        # set by app.py), and what of it was last saved (kafka_positions)
        self.kafka_applied: dict[int, int] | None = None
        self._kafka_saved: dict[int, int] = {}
        self.write_every_s = max(settings.tick_ms / 1000.0, 0.02)  # one pipeline per tick

    # ---------------------------------------------------------------- lifecycle
    async def start(self, hub) -> None:
        self.hub = hub
        loop = asyncio.get_running_loop()
        # a follower worker (mirror.py) gets the fleet from the owner worker:
        # no relay, no reconcile and no writer of its own; group membership
        # for its own subscriptions it still reads
        self.follower = hub.follower is not None
        fleet = ((("redis-groups", self._groups),) if self.follower else
                 (("redis-writer", self._writer), ("redis-reconcile", self._reconcile)))
        for name, fn in (("redis-tail", self._tail), ("redis-pubsub", self._pubsub), *fleet,
                         ("redis-presence", self._presence), ("redis-acls", self._acls_behind_read)):
            self._tasks.append(loop.create_task(self._forever(name, fn), name=name))

    @property
    def ops(self) -> int:
        return self._ops + self.presence.ops

    async def stop(self) -> None:
        # a last write so that nothing applied here is missing from the snapshot
        try:
            if self.leader:
                # the writer loop must not take the lease back, and a write it
                # was in the middle of puts its rows back before the last one
                writers = {t for t in self._tasks if t.get_name() == "redis-writer"}
                for t in writers:
                    t.cancel()
                if writers:
                    await asyncio.wait(writers, timeout=1)
                await asyncio.wait_for(self._write_changed(), 2)
                # a survivor takes over the writing now, not when the lease
                # runs out: what reaches it meanwhile would be missing from
                # the snapshot that new instances and resumes read
                await asyncio.wait_for(self.r.eval(RELEASE, 1, WRITER_LEASE, self.hub.instance_id), 1)
                self.leader = False
        except Exception:
            pass
        # and this instance's connections leave the shared sets now, not when
        # a survivor notices it is gone
        try:
            await asyncio.wait_for(self.presence.leave(self._live), 2)
        except Exception:
            pass
        for t in self._tasks:
            t.cancel()
        # waited for with a bound, and never by swallowing a CancelledError:
        # that would also swallow the cancellation of this stop() itself (a
        # shutdown's wait_for), which then waits for ever on a stuck loop
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2.0)
        for r in (self.r, self.r_listen):
            try:
                await r.aclose()
            except Exception:
                pass

    async def _forever(self, name, fn) -> None:
        backoff = 0.2
        while True:
            started = time.monotonic()
            try:
                await fn()
                backoff = 0.2
            except asyncio.CancelledError:
                raise
            except _DOWN as e:
                if self.healthy is not False:   # the first failure, at start too
                    log.warning("redis unavailable", extra={"fields": {"task": name, "error": repr(e)[:200]}})
                self.healthy = False
                if name == "redis-writer":   # the others' errors say nothing about the lease
                    self.leader = False
                if self.cluster and name in ("redis-tail", "redis-pubsub"):
                    # the listening client sends nothing else that would make
                    # redis-py read the slot map again after a failover: its
                    # next command starts from the seeds and nodes it knew
                    try:
                        await self.r_listen.aclose()
                    except Exception:
                        pass
            except Exception:
                log.exception("redis task %s failed", name)
            if time.monotonic() - started > 10.0:
                backoff = 0.2   # it worked for a while: a new fault starts the backoff again
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(backoff * 2, 10.0)

    # ---------------------------------------------------------------- events
    async def publish_event(self, vehicle_id, etype, body, ts, is_alert, dedupe: bytes | None = None) -> None:
        fields = ["v", vehicle_id, "e", etype, "d", json.dumps(body, ensure_ascii=False), "ts", str(ts),
                  "a", "1" if is_alert else "0"]
        digest = hashlib.sha1(dedupe or "|".join(fields).encode()).hexdigest()
        try:
            await self._add_once(keys=[dedupe_key(digest, self.cluster), STREAM],
                                 args=[DEDUPE_MS if dedupe else ALERT_DEDUPE_MS, EVENT_LOG_MAX, *fields, "k", digest])
            self._ops += 1
        except _DOWN:
            # Redis is down: deliver here with a local id (not resumable)
            # rather than lose the event for the clients of this instance.
            self.healthy = False
            if self._logged_keys.pop(digest):
                return      # another instance logged it, and it was delivered from the log
            self._local_seq += 1
            eid = f"{int(time.time() * 1000)}-{self._local_seq}-local"
            self._local_keys.add(digest)
            self.hub.deliver_event(Event(eid, vehicle_id, etype, body, ts, is_alert))

    @staticmethod
    def _event(eid, f) -> Event:
        """A log entry; raises on one nobody can deliver (written by hand)."""
        g = {_s(k): _s(v) for k, v in f.items()}
        try:
            # msgspec, not json: NaN or Infinity in `d` would reach JSON clients
            # as bodies no JSON parser takes (the whole batch lost to them)
            body = _json_decode(g.get("d", "null"))
        except (msgspec.DecodeError, RecursionError):
            body = g.get("d")
        return Event(_s(eid), g.get("v", ""), g.get("e", "event"), body, int(g.get("ts", 0) or 0),
                     g.get("a") == "1")

    def _events(self, entries) -> list[Event]:
        """Log entries as events; one that cannot be read is skipped and
        counted, as the tail does: a replay across it would fail every time."""
        out = []
        for eid, f in entries:
            try:
                out.append(self._event(eid, f))
            except Exception as e:
                self._unreadable_entry(_s(eid), e)
        return out

    def _unreadable_entry(self, eid: str, e: Exception) -> None:
        self.hub.stats.reject("invalid_log_entry")
        log.warning("event log entry skipped: unreadable", extra={"fields": {"eid": eid, "error": repr(e)[:200]}})

    async def _tail(self) -> None:
        """Delivers the event log in order, each event once (PROTOCOL §3.4).
        The first start begins at the log's end: older events reach clients
        through resume. After any reconnect it carries on after the last event
        it delivered, so that clients that stayed connected miss nothing
        while the link was down. A log whose newest id is older than that was
        reset (a Redis restart, a failover to a lagging replica): what it holds
        was delivered here already, so it is read on from its newest entry."""
        last = await self.r.xrevrange(STREAM, count=1)
        top = _s(last[0][0]) if last else "0-0"
        if self.hub.last_eid is None:
            self.hub.last_eid = top
        elif eid_key(top) < eid_key(self.hub.last_eid):
            # Everything in it was delivered here already (an older snapshot
            # restored, a lagging replica, or an empty log): new entries get
            # ids from the clock, above both, so read on from its newest.
            log.warning("the event log is older than what this instance delivered: reading on from its newest entry",
                        extra={"fields": {"log_newest": top, "delivered": self.hub.last_eid}})
            self.hub.last_eid = top
            self.hub.log_reset()
        last_id = self.hub.last_eid
        self.healthy = True
        trim_at = time.monotonic()
        while True:
            if self.cluster:
                # to the log's node by name: redis-py would otherwise ask its
                # default node which key XREAD names (COMMAND GETKEYS) first,
                # and fail for good once that node is gone
                res = await self.r_listen.execute_command(
                    "XREAD", "COUNT", 1000, "BLOCK", 1000, "STREAMS", STREAM, last_id,
                    target_nodes=self.r_listen.get_node_from_key(STREAM))
            else:
                res = await self.r_listen.xread({STREAM: last_id}, count=1000, block=1000)
            self._ops += 1
            for _, entries in res or ():
                for eid, f in entries:
                    last_id = _s(eid)
                    try:
                        ev = self._event(eid, f)
                        key = _s(f.get(b"k", b""))
                        if key:
                            if self._local_keys.pop(key):
                                self.hub.logged(ev)   # delivered here already, with a local id
                                continue
                            self._logged_keys.add(key)
                        self.hub.deliver_event(ev)
                    except Exception as e:
                        # one entry that cannot be read (written by hand, or by
                        # another version) must not stop the log for everyone:
                        # the tail restarts from the last entry it delivered
                        self.hub.last_eid = last_id
                        self._unreadable_entry(last_id, e)
            if time.monotonic() >= trim_at:
                trim_at = time.monotonic() + 60
                cutoff = int((time.time() - EVENT_RETENTION_S * 1.5) * 1000)
                await self.r.xtrim(STREAM, minid=f"{cutoff}-0", approximate=True)

    async def locate(self, eid: str) -> str:
        pipe = self.r.pipeline(transaction=False)
        pipe.xrange(STREAM, min=eid, max=eid, count=1)
        pipe.xrange(STREAM, count=1)
        found, first = await pipe.execute(raise_on_error=False)
        self._ops += 2
        return _where(eid, found, first)

    async def events_page(self, after: str, upto: str, limit: int) -> list[Event]:
        while True:
            entries = await self.r.xrange(STREAM, min="(" + after, max=upto, count=limit)
            self._ops += 1
            events = self._events(entries)
            if events or not entries:
                return events
            after = _s(entries[-1][0])   # a page of unreadable entries only: read on past it

    async def _pubsub(self) -> None:
        if self.cluster:
            # Pub/Sub reaches every node of a cluster: any primary will do,
            # named so that the slot map (read again after a failure) decides
            await self.r_listen.initialize()
            ps = self.r_listen.pubsub(node=random.choice(self.r_listen.get_primaries()),
                                      ignore_subscribe_messages=True)
        else:
            ps = self.r_listen.pubsub(ignore_subscribe_messages=True)
        try:
            await ps.psubscribe("vehicle:events:*")
            await ps.subscribe("acl:updates", *(() if self.follower else (RELAY,)))
            self.healthy = True
            # ACL updates published while we were not listening are lost:
            # forget what was read before, and read again the rights of every
            # user connected here
            connected = {s.claims.sub for s in self.hub.sessions.values()}
            self._acls = {u: a for u, a in self._acls.items() if u in connected}
            for user in connected:
                if self._acls_behind:   # Redis did not answer for one: the rest wait with it
                    self.hub.acl_generation += 1   # as acl_changed counts it
                    self._acls.pop(user, None)
                    self._acl_behind(user)
                else:
                    await self._acl_update(user)
            async for m in ps.listen():
                try:
                    channel = _s(m.get("channel"))
                    data = m.get("data")
                    if channel == "acl:updates":
                        data = _s(data)
                except UnicodeDecodeError:   # PUBLISH vehicle:events:\xff ended the listener
                    self.hub.stats.reject("invalid_event")
                    continue
                if channel == RELAY:
                    self._relayed(data)
                elif channel == "acl:updates":
                    await self._acl_update(data)
                elif channel.startswith("vehicle:events:"):
                    await self._instant_event(channel[len("vehicle:events:"):], data)
        finally:
            await ps.aclose()

    async def _acl_update(self, user: str) -> None:
        """`acl:updates {user}`: the ACL in Redis, applied to the user's
        connections here. When it cannot be read, their connections keep the
        rights in force (PROTOCOL §2) and the user is read again once Redis
        answers. The listener goes on either way: one unreadable ACL used to end
        it, and with it instant events and ACL updates for everyone."""
        self._acls.pop(user, None)   # what was read before is out of date
        try:
            # never the remembered ACL: a read that was in flight may have put
            # the old one back since the pop
            await self.hub.acl_changed(user, read=self._acl_fresh)
        except StoresUnavailable:
            self._acl_behind(user)
            return
        self._acls_behind.discard(user)   # an older retry must not apply what this replaced

    def _acl_behind(self, user: str) -> None:
        if user not in self._acls_behind:
            log.warning("ACL update cannot be read now: the rights in force stay until Redis answers",
                        extra={"fields": {"user": user}})
        self._acls_behind.add(user)
        self._acls_behind_wake.set()

    async def _acls_behind_read(self) -> None:
        """The users whose acl:updates could not be read, read again every
        ACL_RETRY_S until Redis answers. A user no longer connected here is
        dropped without a read (reapply_acl has no one to apply it to; a new
        connection reads its own), so the set never outgrows the users connected."""
        while True:
            await self._acls_behind_wake.wait()
            while self._acls_behind:
                await asyncio.sleep(ACL_RETRY_S)
                for user in list(self._acls_behind):   # every one each round: one shard down holds up only its own
                    try:
                        await self.hub.reapply_acl(user, read=self._acl_fresh)
                    except StoresUnavailable:
                        continue
                    except Exception:   # a bug must not retry for ever, nor stop the others
                        log.exception("ACL update could not be applied", extra={"fields": {"user": user}})
                    self._acls_behind.discard(user)
            self._acls_behind_wake.clear()

    async def _instant_event(self, vehicle_id: str, data) -> None:
        # what enters the log must be deliverable to every client: a JSON
        # object of bounded size, no NaN or Infinity (not JSON for clients),
        # no integer msgpack cannot carry
        if len(data) > MAX_EVENT_BYTES:
            self.hub.stats.reject("event_too_large")
            return
        if not 0 < len(vehicle_id) <= MAX_ID_LEN:   # no vehicle has it: nothing in the log for it
            self.hub.stats.reject("invalid_event")
            return
        try:
            # 1e400 is a float to json.loads: infinite, as NaN and Infinity are
            obj = json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)
            if not isinstance(obj, dict):
                raise ValueError
            msgpack.packb(obj)
        except (ValueError, TypeError, OverflowError, RecursionError):
            self.hub.stats.reject("invalid_event")
            return
        etype = str(obj.pop("type", "event"))[:64]
        ts = obj.pop("ts", None)
        # epoch ms that a client's number holds exactly; anything else (a
        # string, a bool, 1e300) is the time it came, as a missing one is
        usable = isinstance(ts, (int, float)) and not isinstance(ts, bool) and 0 <= ts < 2 ** 53
        ts = int(ts) if usable else int(time.time() * 1000)
        # every instance gets this PUBLISH: the raw bytes, and which repeat of
        # them it is (Repeats), are the dedupe key; a first one's key is the
        # one older versions make (a rolling upgrade logs it once)
        key = b"ev|" + vehicle_id.encode() + b"|" + bytes(data)
        n = self._repeats.count(key)
        await self.publish_event(vehicle_id, etype, obj, ts, False, dedupe=key if n == 1 else key + b"|%d" % n)

    # ---------------------------------------------------------------- updates relay
    async def relay_updates(self, batch) -> None:
        """HTTP-ingested updates (an UpdateBatch, validated and applied here)
        to the other workers and instances, as columns (pack_relay)."""
        try:
            await self.r.publish(RELAY, pack_relay(self.hub.instance_id, batch, self.hub.core.types))
            self._ops += 1
        except _DOWN:
            self.healthy = False

    def _relayed(self, data) -> None:
        """Another worker's HTTP-ingested updates. One message that cannot be
        applied is counted, never a reason to drop the Pub/Sub link."""
        try:
            if relay_origin(data) == self.hub.instance_id:
                return   # our own, back from Pub/Sub: not unpacked
            try:
                batch = unpack_relay(decode_relay(data), self.hub.core.vtype_code)
            except ValueError:
                msg = msgpack.unpackb(data)
                if not (isinstance(msg, dict) and "u" in msg):
                    raise
                # an instance of before 2026-11-30: dicts, checked as any input is
                self.hub.apply_updates([validate_relayed(u) for u in msg.get("u") or []])
                return
            self.hub.apply(batch)
        except Exception as e:
            self.hub.stats.reject("invalid_relay")
            log.warning("relayed updates skipped: unreadable", extra={"fields": {"error": repr(e)[:200]}})

    # ---------------------------------------------------------------- vehicle state
    def changed(self, rows) -> None:
        if self.leader:
            self._changed.update(int(r) for r in rows)

    def forgotten(self, vehicle_ids: list, carried: list) -> None:
        """Vehicles forgotten as stale (§3.3) leave `vehicles:geoindex` and
        the `group:{name}:vehicles` sets of the groups their updates carried
        (`carried`, one tuple each): their hashes expire on their own, but
        nothing else takes them out of those, which grew with every id ever
        seen, and an id that came back months later was in its old groups
        again. The writer does it (every instance forgets the same vehicles)."""
        if self.leader and vehicle_ids:
            self.hub.spawn(self._unindex(list(vehicle_ids), list(carried)))

    async def _unindex(self, ids: list, carried: list) -> None:
        for i in range(0, len(ids), 1000):
            pipe = self.r.pipeline(transaction=False)
            pipe.zrem("vehicles:geoindex", *ids[i:i + 1000])
            for vid, groups in zip(ids[i:i + 1000], carried[i:i + 1000]):
                for g in groups:
                    pipe.srem(f"group:{g}:vehicles", vid)
            self._ops += len(pipe)
            # a set of another type (written by hand) is its own problem: the
            # rest of the ids still leave the index and their groups
            await pipe.execute(raise_on_error=False)

    async def _writer(self) -> None:
        """Takes or renews the writer lease every LEASE_RENEW_S by the clock,
        and writes only while the last renewal is recent enough: the rounds
        of a busy writer take longer than their sleep (encoding 20k hashes a
        second), and counting rounds instead of seconds let the lease run out
        while it went on writing, next to the instance that took it over."""
        me = self.hub.instance_id
        while True:
            now = time.monotonic()
            if now - self._lease_at >= LEASE_RENEW_S:
                got = int(await self._take(keys=[WRITER_LEASE], args=[me, LEASE_MS]))
                # None: not readable now (a node away, INFO not allowed);
                # the next answer then counts as a change
                servers = await run_ids(self.r) if got else None
                restarted = servers is not None and servers != self._servers
                if restarted and self.leader:   # not this writer's first look
                    log.info("a Redis server restarted or a replica took over: writing every vehicle again",
                             extra={"fields": {"servers": sorted(servers)}})
                if got == 2 or (got and not self.leader) or (got and restarted):
                    # a new writer writes everything once: the old one may have
                    # died mid-way (and so may this one, before an error here).
                    # So does a writer that sees a server restarted or a
                    # replica promoted since its last renewal: on a cluster,
                    # a master that comes back empty holds only part of the
                    # keys (the lease may be on another node), and vehicles
                    # that stand still would not be written again otherwise
                    self._changed.update(range(self.hub.core.n))
                    self._expired_at.clear()
                    self._rich_written.clear()
                self._servers = servers
                self.leader = bool(got)
                if self.leader:
                    self._lease_at = now
                self._ops += 1 + len(servers or ())
                self.healthy = True
            if self._lease_fresh():
                await self._write_changed()
            elif not self.leader:
                self._changed.clear()
            await asyncio.sleep(self.write_every_s)

    def _lease_fresh(self) -> bool:
        return self.leader and time.monotonic() - self._lease_at < LEASE_MS / 1000.0 - LEASE_MARGIN_S

    async def _write_changed(self) -> None:
        """Every changed row to `vehicle:current:*`, WRITE_SLICE rows per
        pipeline: a new writer rewrites the whole fleet, and the event loop
        must not be held while ~100k hashes are encoded."""
        # what the core had applied of Kafka when these rows were taken: every
        # record up to there changed rows that are in _changed or were written
        applied = dict(self.kafka_applied) if self.kafka_applied else None
        whole = True
        if self._changed:
            rows, self._changed = sorted(self._changed), set()
            for i in range(0, len(rows), WRITE_SLICE):   # each with its change-feed entry
                if not self._lease_fresh():   # a long rewrite goes on after the next renewal
                    self._changed.update(rows[i:])
                    return
                try:
                    whole = await self._write_rows(rows[i:i + WRITE_SLICE]) and whole
                except BaseException:
                    self._changed.update(rows[i:])  # written next time
                    raise
        if whole and applied and applied != self._kafka_saved and self._lease_fresh():
            # after the rows: a new instance reads the topic on from here
            # (KafkaIngest._seek_stored) and finds the rest in the snapshot
            await self.r.hset(self._positions_key(), mapping={str(p): o for p, o in applied.items()})
            self._kafka_saved = applied
            self._ops += 1

    def _positions_key(self) -> str:
        return f"kafka:positions:{self.settings.topic}"

    async def kafka_positions(self) -> dict[int, int] | None:
        """The Kafka positions saved with the snapshot ({partition: offset}),
        None when none were saved or Redis cannot say (then a new consumer
        starts at the end, as before positions were saved)."""
        try:
            raw = await asyncio.wait_for(self.r.hgetall(self._positions_key()), 5.0)
            self._ops += 1
        except asyncio.CancelledError:
            raise
        except Exception as e:   # down, or a key of the wrong type
            log.warning("kafka positions not readable from redis; reading the topic from its end",
                        extra={"fields": {"error": repr(e)[:200]}})
            return None
        out = {}
        for k, v in raw.items():
            k, v = (x.decode(errors="replace") if isinstance(x, bytes) else str(x) for x in (k, v))
            if k.isascii() and k.isdigit() and v.isascii() and v.isdigit() and len(k) < 10 and len(v) < 19:
                out[int(k)] = int(v)   # (a Kafka offset is a signed 64-bit number)
        return out or None

    async def _write_rows(self, rows) -> bool:
        """False when the slice was put back to be written next time."""
        core = self.hub.core
        pipe = self.r.pipeline(transaction=False)
        geo = []
        feed_ids, feed_ts = [], []
        n = 0
        now = time.monotonic()
        from .._core._schema import STATUSES
        # the slice's columns at once: a numpy record's fields one by one
        # cost more than the command they go into
        at = np.asarray(rows, np.int64)
        cur = records(core.cur, at)
        expire_s = int(self.settings.stale_after_s)
        written = self._rich_written
        # what was sent is remembered once Redis took it: a slice that fails
        # is sent again whole (its rows go back to _changed)
        marks, expired = [], []
        # the commands as argument lists, for a replied pipeline, and the same
        # in RESP, for the quiet write: each only while it may be used
        quiet = self._quiet is not False and not self.cluster
        replied = self._quiet is not True or self.cluster
        cmds: list = []
        packed: list = []
        geo_resp: list = []
        for r, version, lat, lon, speed, course, status, vtype, ts in zip(
                rows, cur["version"].tolist(), cur["lat"].tolist(), cur["lon"].tolist(),
                cur["speed"].tolist(), cur["course"].tolist(), cur["status"].tolist(),
                cur["vtype"].tolist(), cur["ts"].tolist()):
            if version == 0:
                continue
            vid = core.ids[r]
            key = f"vehicle:current:{vid}"
            la, lo, sp, co = repr(lat), repr(lon), repr(speed), repr(course)
            st, t = STATUSES[status], str(ts)
            # Redis's geo set holds latitudes to ±85.05112878 and refuses a
            # whole GEOADD for one beyond: a polar vehicle is indexed at the edge
            glat = lat if -GEO_MAX_LAT <= lat <= GEO_MAX_LAT else math.copysign(GEO_MAX_LAT, lat)
            gla = la if glat == lat else repr(glat)
            refresh = now - self._expired_at.get(r, -1e9) >= EXPIRE_EVERY_S
            # the rest of the hash only when it changed, or with the TTL's
            # refresh (a hash deleted by hand is whole again within a minute):
            # JSON for four fields per update was most of the writer's time
            # the groups the updates carry, not the registry's: the registry
            # owns its sets, and a group written back here would outlive its SREM
            rich = (vid, vtype, core.carried[r], core.alerts[r], core.driver[r], core.assignment[r])
            before = written.get(r)
            whole = refresh or before != rich
            try:
                mine = []
                if whole or replied:
                    args = ["HSET", key, b"lat", la, b"lon", lo, b"speed", sp,
                            b"course", co, b"status", st, b"timestamp", t]
                    if whole:
                        args += [b"vehicle_type", core.types[vtype],
                                 b"groups", json.dumps(list(rich[2]), ensure_ascii=False),
                                 b"alerts", json.dumps(list(rich[3]), ensure_ascii=False),
                                 b"driver", json.dumps(rich[4], ensure_ascii=False),
                                 b"assignment", json.dumps(rich[5], ensure_ascii=False)]
                    mine.append(args)
                    if refresh:
                        # a vehicle silent this long is forgotten in memory too (§3.3);
                        # group membership is refreshed as rarely
                        mine.append(("EXPIRE", key, str(expire_s)))
                    if refresh or (before is not None and before[2] != rich[2]):
                        mine += [("SADD", f"group:{g}:vehicles", vid) for g in rich[2]]
                    if before is not None and before[0] == vid:
                        # groups its updates no longer carry (§1.3: "groups named in
                        # updates are added too"; taken back when they are not)
                        mine += [("SREM", f"group:{g}:vehicles", vid) for g in before[2] if g not in rich[2]]
                # encoded here, every argument: a text that cannot be (a lone
                # surrogate) is this vehicle's problem, not its slice's
                kb, vb = key.encode(), vid.encode()
                blob = pack_resp(mine) if whole else None
                if quiet:
                    # most rows: position and status only, as one formatted
                    # RESP command (pack_resp's loop was half the writer's time)
                    packed.append(blob if whole else _HSET_POSITION % (
                        len(kb), kb, len(la), la.encode(), len(lo), lo.encode(), len(sp), sp.encode(),
                        len(co), co.encode(), len(st), st.encode(), len(t), t.encode()))
                    geo_resp.append(_GEO_MEMBER % (len(lo), lo.encode(), len(gla), gla.encode(), len(vb), vb))
            except (TypeError, ValueError) as e:
                # one vehicle nobody can write must not stop the slice
                # (every later vehicle would never be written again)
                self.hub.stats.reject("unwritable_vehicle")
                log.warning("vehicle not written to Redis: its fields cannot be encoded",
                            extra={"fields": {"vehicle": vid, "error": repr(e)[:200]}})
                continue
            if whole:
                marks.append((r, rich))
            if refresh:
                expired.append(r)
            cmds += mine
            n += len(mine) if whole else 1
            geo.extend((lon, glat, vid))
            feed_ids.append(vid)
            feed_ts.append(ts)
        if geo:
            n += 1
        # one server: the hashes and the geo index as one packed write
        # without replies, so that neither side spends a reply per command
        # (redis-py's packing and reply parsing were most of the writer's time)
        if packed:
            packed.append(b"*%d\r\n$6\r\nGEOADD\r\n$17\r\nvehicles:geoindex\r\n" % (2 + 3 * len(geo_resp)))
            packed.extend(geo_resp)
        if not (quiet and packed and await self._write_quietly(b"".join(packed))):
            if not replied and packed:
                # the server stopped taking the quiet write (its ACL changed):
                # the slice was packed for it alone, so it goes again, with replies
                self._changed.update(rows)
                return False
            for args in cmds:
                pipe.execute_command(*args)
            if geo:
                pipe.geoadd("vehicles:geoindex", geo)
        if feed_ids and not self.cluster:
            # one server runs a pipeline in order: the entry lands after its hashes
            self._add_changes(pipe, feed_ids, feed_ts)
            n += 1
        if len(pipe):
            res = await pipe.execute()
        if feed_ids and self.cluster:
            # a cluster runs each node's part of a pipeline at once: an entry
            # sent with its hashes could land first, and a reader would read
            # the old hashes and move past the entry. So it goes after them.
            pipe = self.r.pipeline(transaction=False)
            self._add_changes(pipe, feed_ids, feed_ts)
            n += 1
            res = await pipe.execute()
        if feed_ids:
            self._feed_skew_ms = _id_ms(_s(res[-1])) - time.time() * 1000.0
        written.update(marks)
        for r in expired:
            self._expired_at[r] = now
        self._ops += n
        return True

    async def _write_quietly(self, blob: bytes) -> bool:
        """The commands in `blob` (RESP) in one write between CLIENT REPLY OFF
        and ON, then a PING with a nonce, on a pooled connection: Redis runs
        them in order and answers only the ON and the PING, which therefore
        arrive after all of them ran. An error in one of them (a key of the
        wrong type, say) is not seen: that hash stays as it was, as with a
        vehicle that sends no update. False when this server cannot do it
        (an ACL without CLIENT REPLY, or something between that answers the
        OFF): the caller sends them again with replies, and so does every
        later write. A connection is never returned to the pool in the
        middle of this (it would stay without replies): on any error or
        cancellation it is closed."""
        pool = self.r.connection_pool
        conn = await pool.get_connection()
        done = False
        nonce = secrets.token_hex(8).encode()
        try:
            await conn.send_packed_command([_REPLY_OFF, blob, _REPLY_ON, pack_resp([(b"PING", nonce)])])
            try:
                first = await conn.read_response(disable_decoding=True)   # the ON's +OK
                second = await conn.read_response(disable_decoding=True)  # the nonce
            except ResponseError as e:
                text = str(e).lower()
                if not (isinstance(e, NoPermissionError) or "unknown" in text or "noperm" in text):
                    raise   # something else (BUSY, LOADING): the slice is tried again later
                # the OFF was refused, so every command answers too: this
                # connection is dropped with them unread, and the caller
                # sends them again with replies (a dropped connection may
                # not have run them all; an HSET twice is the same HSET)
                self._quiet = False
                log.info("CLIENT REPLY not allowed; the Redis writer reads every reply",
                         extra={"fields": {"error": repr(e)[:200]}})
                return False
            if first not in (b"OK", "OK") or second not in (nonce, nonce.decode()):
                self._quiet = False
                log.warning("CLIENT REPLY OFF not honoured on this connection; the Redis writer reads "
                            "every reply", extra={"fields": {"reply": repr(first)[:100]}})
                return False
            self._quiet = True
            done = True
            return True
        finally:
            try:
                if not done:
                    await conn.disconnect(nowait=True)
            finally:
                await pool.release(conn)

    def _add_changes(self, pipe, ids: list, stamps: list) -> None:
        """The feed entry for one pipeline of hashes; entries older than
        CHANGES_KEEP_MS (by Redis's clock, learned from the ids it gives)
        are trimmed on the way."""
        body = msgpack.packb([ids, stamps], use_bin_type=True)
        if self._feed_skew_ms is None:
            pipe.xadd(CHANGES, {"u": body})
        else:
            oldest = int(time.time() * 1000.0 + self._feed_skew_ms) - CHANGES_KEEP_MS
            pipe.xadd(CHANGES, {"u": body}, minid=f"{max(oldest, 0)}-0", approximate=True)

    async def _reconcile(self) -> None:
        while True:
            await self.reconcile_once()
            self.snapshot_loaded.set()
            self.healthy = True
            await asyncio.sleep(RECONCILE_EVERY_S)

    async def _groups(self) -> None:
        """A follower worker's reconcile: group membership for its own
        subscriptions, and a PING, so that Redis counts as reachable only
        once it answered."""
        while True:
            await self.r.ping()
            self._ops += 1
            self.healthy = True
            await self._refresh_groups()
            await asyncio.sleep(RECONCILE_EVERY_S)

    async def reconcile_once(self) -> int:
        """Applies every vehicle whose Redis state is newer than memory, as
        the change feed and a slice of the safety scan show it (a whole pass
        at start and after a gap in the feed). Returns how many it applied."""
        applied = 0
        if self.feed_cursor is not None:
            applied += await self._read_feed()
        if self.feed_cursor is None:
            # where the feed stands now: whatever is written during the pass
            # is read from the feed afterwards
            last = await self.r.xrevrange(CHANGES, count=1)
            self._ops += 1
            self._scanner.reset()
            applied += await self._scan(None)
            self.feed_cursor = _s(last[0][0]) if last else "0-0"
        else:
            applied += await self._scan(self._scan_quota())
        self.reconciled += applied
        await self._refresh_groups()
        return applied

    async def _read_feed(self) -> int:
        """The feed from the cursor on: the newest timestamp of each vehicle
        in it, then the hashes of those newer than memory. A cursor the feed
        no longer holds (trimmed, or the key is gone) is a gap: the cursor
        is dropped, so that a whole pass follows."""
        cursor = self.feed_cursor
        latest: dict[str, int] = {}
        first = True
        while True:
            if first and cursor != "0-0":
                # the check and the first page in one script: a trim between
                # them would make a gap look like none. A script, not MULTI:
                # redis-py's cluster client runs a transaction's commands
                # through a second event loop in a thread.
                entries = await self._feed_page(keys=[CHANGES], args=[cursor, FEED_PAGE])
                self._ops += 2
                if entries is None:
                    self.feed_gaps += 1
                    log.info("change feed has a gap; reading every vehicle", extra={"fields": {"cursor": cursor}})
                    self.feed_cursor = None
                    return 0
                entries = [(i, dict(zip(f[::2], f[1::2]))) for i, f in entries]
            else:
                entries = await self.r.xrange(CHANGES, min="(" + cursor, count=FEED_PAGE)
                self._ops += 1
            first = False
            for entry_id, fields in entries:
                cursor = _s(entry_id)
                for vid, ts in _feed_pairs(fields.get(b"u") or fields.get("u")):
                    if ts > latest.get(vid, -1):
                        latest[vid] = ts
            if len(entries) < FEED_PAGE:
                break
            await asyncio.sleep(0)   # a long feed is read in pages, the loop free in between
        self.feed_vehicles += len(latest)
        applied = await self._apply_keys(self._newer(latest))
        # only now: had reading the hashes failed, the next reconcile reads
        # these entries again instead of skipping their vehicles
        self.feed_cursor = cursor
        return applied

    def _newer(self, latest: dict) -> list[str]:
        """The keys of vehicles whose timestamp in Redis (the feed's, or the
        hash's for the scan) is newer than memory, or that memory does not
        hold and are not stale; compared with numpy."""
        if not latest:
            return []
        core = self.hub.core
        vids = list(latest)
        stamps = np.fromiter(latest.values(), np.float64, len(vids))
        rows = np.fromiter(map(core.row_of, vids), np.int64, len(vids))
        known = rows >= 0
        safe = np.where(known, rows, 0)
        live = known & (core.cur["version"][safe] > 0)
        forget_before_ms = (time.time() - self.settings.stale_after_s) * 1000.0
        newer = np.where(live, core.cur["ts"][safe] < stamps, stamps >= forget_before_ms)
        return [f"vehicle:current:{vids[i]}" for i in np.flatnonzero(newer)]

    def _scan_quota(self) -> int:
        """Keys for this reconcile's slice of the safety scan: the whole
        keyspace every max(5 s, fleet / --reconcile-scan-per-s), at most
        FULL_PASS_MAX_S apart."""
        fleet = max(1, self.hub.core.n - len(self.hub.core.row_free))
        period = min(FULL_PASS_MAX_S, max(RECONCILE_EVERY_S, fleet / self.settings.reconcile_scan_per_s))
        return max(1, int(fleet * RECONCILE_EVERY_S / period + 0.999))

    async def _scan(self, quota: int | None) -> int:
        """SCANs on from where the last slice stopped, `quota` keys (None: to
        the end of the pass), and applies those newer than memory."""
        stamped: dict[str, int] = {}   # vehicle -> its hash's timestamp
        seen = 0
        from ..ingest.decode import parse_timestamp
        while quota is None or seen < quota:
            count = 1000 if quota is None else max(10, min(1000, quota - seen))
            keys = await self._scanner.step(count)
            self._ops += 1
            if keys:
                seen += len(keys)
                pipe = self.r.pipeline(transaction=False)
                for k in keys:
                    pipe.hget(k, "timestamp")
                stamps = await self._key_replies(pipe)
                self._ops += len(keys)
                for k, ts in zip(keys, stamps):
                    if ts is None:
                        continue
                    try:
                        stamped[_s(k)[len("vehicle:current:"):]] = \
                            parse_timestamp(int(ts) if ts.isdigit() else _s(ts))
                    except (Rejected, ValueError):   # written by another tool: counted, as _from_hash does
                        self.hub.stats.reject("invalid_vehicle_key")
                        continue
            if self._scanner.done:
                self.full_passes += 1
                break
        self.scanned += seen
        # a whole pass (a new instance's snapshot, a gap in the feed) is
        # history: its vehicles were heard when their timestamps say
        return await self._apply_keys(self._newer(stamped), math.inf if quota is None else 0.0)

    async def _key_replies(self, pipe, reason: str = "invalid_vehicle_key") -> list:
        """The replies of a pipeline of reads of `vehicle:current:*` (or
        registry) keys; a key of another type (WRONGTYPE: something else wrote
        it) is None and counted as `reason`, never a failure of the whole
        reconcile (which marked Redis down and refused connects)."""
        out = await pipe.execute(raise_on_error=False)
        for i, v in enumerate(out):
            if isinstance(v, ResponseError):
                self.hub.stats.reject(reason)
                out[i] = None
            elif isinstance(v, Exception):
                raise v
        return out

    async def _apply_keys(self, keys: list, aged_up_to: float = 0.0) -> int:
        """HGETALL and apply, a slice at a time: the first reconcile of a new
        instance loads the whole fleet, and ticks must go on meanwhile."""
        applied = 0
        for i in range(0, len(keys), RECONCILE_SLICE):
            chunk = keys[i:i + RECONCILE_SLICE]
            pipe = self.r.pipeline(transaction=False)
            for k in chunk:
                pipe.hgetall(k)
            updates = []
            for k, h in zip(chunk, await self._key_replies(pipe)):
                u = self._from_hash(_s(k)[len("vehicle:current:"):], h) if h else None
                if u is not None:
                    updates.append(u)
            self._ops += len(chunk)
            if updates:
                self.hub.apply_updates(updates, aged_up_to, alerts=False)
                applied += len(updates)
        return applied

    def _from_hash(self, vid: str, h: dict) -> dict | None:
        try:
            g = {_s(k): _s(v) for k, v in h.items()}
        except UnicodeDecodeError:   # written by hand: this vehicle skipped, never the whole reconcile
            self.hub.stats.reject("invalid_vehicle_key")
            return None
        ts = g.get("timestamp", "")
        obj = {"vehicle_id": vid, "timestamp": int(ts) if ts.isascii() and ts.isdigit() else ts,
               "position": {"lat": _num(g.get("lat")), "lon": _num(g.get("lon"))}}
        for f in ("speed", "course"):
            if g.get(f) not in (None, ""):
                obj[f] = _num(g[f])
        for f in ("status", "vehicle_type"):
            if g.get(f):
                obj[f] = g[f]
        for f in ("groups", "alerts", "driver", "assignment"):
            if g.get(f):
                try:
                    # msgspec, not json: json.loads takes a lone surrogate
                    # ("\ud800"), which no encoder can write out again (the
                    # core would fail on the whole reconcile slice)
                    v = _json_decode(g[f])
                    if v is not None and f in ("driver", "assignment") and too_large(v, len(g[f])):
                        # written before the bound, or by hand: the vehicle
                        # is kept without it (validate would refuse it whole)
                        self.hub.stats.reject("invalid_field")
                        continue
                    if v is not None:
                        obj[f] = v
                except (ValueError, msgspec.DecodeError):
                    pass
        try:
            return validate(obj)
        except Rejected as e:
            self.hub.stats.reject(e.reason)
            return None

    async def resolve_vehicles(self, ids) -> None:
        """Named vehicles this instance has not seen yet, from `vehicle:current:{id}`
        at once, rather than at the next reconcile (a client resuming here must
        get its snapshot)."""
        if self.healthy is False:
            return   # known down: the reconcile fills them in when it is back
        core = self.hub.core
        missing = [v for v in dict.fromkeys(ids)
                   if core.row_of(v) < 0 or core.cur[core.row_of(v)]["version"] == 0]
        if not missing:
            return
        pipe = self.r.pipeline(transaction=False)
        for v in missing:
            pipe.hgetall(f"vehicle:current:{v}")
        updates = []
        for v, h in zip(missing, await self._key_replies(pipe)):
            if h:
                u = self._from_hash(v, h)
                if u is not None:
                    updates.append(u)
        self._ops += len(missing)
        if updates:
            # the snapshot: history (hub.apply), heard when its timestamps say
            self.hub.apply_updates(updates, math.inf, alerts=False)

    async def _refresh_groups(self) -> None:
        """Group membership written by the vehicle registry, for groups in use
        (not the one no vehicle may be in: no registry set can put one there)."""
        await self.resolve_groups([g for g in self.hub.core.sel_by_group if g != NOTHING_GROUP])

    async def in_registry_group(self, vehicle_id: str, names) -> bool:
        """Whether the registry (`group:{name}:vehicles`) puts the vehicle in
        one of these groups: a read, nothing kept (GET /api/vehicles/{id}).
        StoresUnavailable when Redis cannot answer."""
        names = list(dict.fromkeys(names))
        if not names:
            return False
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.sismember(f"group:{g}:vehicles", vehicle_id)
        try:
            found = await pipe.execute(raise_on_error=False)
        except _DOWN as e:
            raise StoresUnavailable("the group registry cannot be read now") from e
        self._ops += len(names)
        return any(v is True or v == 1 for v in found)

    async def resolve_groups(self, names) -> None:
        """`group:{name}:vehicles` -> the core, before a subscription names them."""
        core = self.hub.core
        names = list(names)
        if not names or self.healthy is False:
            return
        pipe = self.r.pipeline(transaction=False)
        for g in names:
            pipe.smembers(f"group:{g}:vehicles")
        for g, members in zip(names, await self._key_replies(pipe, "invalid_group_key")):
            if members is None:   # not a set (written by hand): this group alone
                continue
            ids = [m.decode() for m in members if _utf8(m)]
            if len(ids) < len(members):
                self.hub.stats.reject("invalid_group_member", len(members) - len(ids))
            # all of the group, an empty one too: what the registry dropped leaves it
            core.set_group_members(g, ids)
        self._ops += len(names)

    # ---------------------------------------------------------------- sessions
    async def session_written(self, session_id: str, timeout: float = 2.0) -> None:
        await asyncio.sleep(0)   # the spawned save starts first (and enters _session_latest)
        deadline = time.monotonic() + timeout
        while session_id in self._session_latest and time.monotonic() < deadline:
            await asyncio.sleep(0.005)

    async def save_session(self, session_id: str, data: dict, only_if_copy: str | None = None) -> None:
        """Writes of one session land in the order they were made, the newest
        last. Concurrent SETs on different pooled connections could land in
        any order: the record written at connect (no subscription yet) then
        overwrote the one of the `subscribe` that followed it, and a client
        resumed elsewhere without its subscription, missing its events
        (found by benchmarks/bench_storm.py). One write per session is in
        flight; a newer record waits for it, and intermediate ones are skipped."""
        latest = self._session_latest
        busy = session_id in latest
        pending = latest.get(session_id)
        if isinstance(pending, tuple) and pending[0] == "delete":
            return   # deleted after all: no save brings it back
        if isinstance(pending, tuple) and pending[2] is None:
            only_if_copy = None   # a claim not yet written stays a claim
        latest[session_id] = raw = ("set", json.dumps(data, ensure_ascii=False), only_if_copy)
        if busy:
            return   # the write in flight for this session writes this one next
        try:
            pauses = iter(SESSION_RETRIES)
            while True:
                try:
                    key = f"session:{session_id}"
                    if raw[0] == "delete":   # delete_session came after this save
                        await self._delete_session(keys=[key], args=[raw[1] or ""])
                    elif raw[2] is not None:
                        await self._save_session_if(keys=[key], args=[raw[1], raw[2], SESSION_TTL_S])
                    else:
                        await self.r.set(key, raw[1], ex=SESSION_TTL_S)
                except _DOWN:
                    pause = next(pauses, None)
                    if pause is None:
                        raise
                    await asyncio.sleep(pause)   # the newest record is written on the retry
                    raw = latest[session_id]
                    continue
                self._ops += 1
                if latest[session_id] is raw:
                    del latest[session_id]
                    return
                raw = latest[session_id]
        except BaseException:
            # bounded: after the retries nothing is kept for the session; its
            # next save (a ping, a subscribe), or the next connect, writes it whole
            latest.pop(session_id, None)
            raise

    async def delete_session(self, session_id: str, copy: str | None = None) -> None:
        """The record goes (only while it names `copy`, when given), after any
        save of it still in flight, which would otherwise bring it back."""
        latest = self._session_latest
        if session_id in latest:
            latest[session_id] = ("delete", copy, None)   # the write in flight does it next
            return
        await self._delete_session(keys=[f"session:{session_id}"], args=[copy or ""])
        self._ops += 1

    async def load_sessions(self, session_ids: list[str]) -> list[dict | None]:
        """Records of many sessions, in chunks of 500 (one MGET each)."""
        out: list[dict | None] = []
        for i in range(0, len(session_ids), 500):
            chunk = session_ids[i:i + 500]
            raws = await mget(self.r, [f"session:{sid}" for sid in chunk])
            self._ops += 1
            out += [_session_record(sid, raw) for sid, raw in zip(chunk, raws)]
        return out

    async def load_session(self, session_id: str) -> dict | None:
        if self.healthy is False:   # known down: no connect waits for it
            raise StoresUnavailable("Redis is unreachable")
        raw = await self.r.get(f"session:{session_id}")
        self._ops += 1
        return _session_record(session_id, raw)

    async def client_opened(self, user_id, client_id) -> None:
        await self.presence.opened(user_id, client_id)

    async def client_closed(self, user_id, client_id, session_id, vehicles) -> None:
        # if this fails (Redis down), the presence loop removes it later
        await self.presence.closed(user_id, client_id, vehicles)

    def _live(self) -> dict[str, tuple[str, list]]:
        """client id -> (user id, subscribed vehicles) of every connection open here."""
        hub = self.hub
        if hub is None:
            return {}
        return {s.client_id: (s.claims.sub, ((s.subscription or {}).get("subscriptions") or {}).get("vehicles") or [])
                for s in hub.sessions.values() if not s.closed}

    async def _presence(self) -> None:
        """stores/presence.py: heartbeat, this instance's connections kept in
        step, dead instances' connections removed."""
        while True:
            await self.presence.beat(self._live)
            await asyncio.sleep(self.presence.every_s)

    async def set_client_vehicles(self, client_id, old, new) -> None:
        old, new = set(old), set(new)
        if old == new:
            return
        pipe = self.r.pipeline(transaction=False)
        gone, added = old - new, new - old
        for v in gone:
            pipe.srem(f"subscribers:vehicle:{v}", client_id)
        for v in added:
            pipe.sadd(f"subscribers:vehicle:{v}", client_id)
        # this client's own set in one command each way, not one per vehicle
        if gone:
            pipe.srem(f"subscriptions:client:{client_id}", *gone)
        if added:
            pipe.sadd(f"subscriptions:client:{client_id}", *added)
        await pipe.execute()
        self._ops += len(gone) + len(added) + bool(gone) + bool(added)

    def acl_in_doubt(self, user_id: str) -> bool:
        # while Redis is merely down the remembered ACL is in force, for a new
        # connection as for a new token; one known to be out of date is not
        return user_id in self._acls_behind

    async def acl(self, user_id) -> dict | None:
        """The live rights of a user. While Redis cannot answer, the last ACL
        read for them; StoresUnavailable for a user never read."""
        try:
            return await self._acl_fresh(user_id)
        except StoresUnavailable:
            if user_id in self._acls:
                return self._acls[user_id]
            raise

    async def _acl_fresh(self, user_id) -> dict | None:
        """The rights in Redis now; StoresUnavailable when it cannot answer."""
        try:
            if self.healthy is False:
                raise ConnectionError("Redis is unreachable")
            h = await self.r.hgetall(f"acl:user:{user_id}")
        except _DOWN as e:
            if not _wrong_type(e):
                raise StoresUnavailable(f"rights of {user_id!r} cannot be read: {e!r}"[:200]) from None
            h = e   # Redis answered: the key is wrong, and that restricts (_acl_read)
        self._ops += 1
        return self._acl_read(user_id, h)

    async def connect_reads(self, user_id: str, session_id: str | None, eid: str | None):
        """What a connection needs before it is admitted, in one round trip
        (a reconnect storm of 10,000 clients made these reads, one at a time,
        the pool's bottleneck): (acl as `acl` returns it, the stored session
        of `session_id` or None, where `eid` stands in the log or None).
        StoresUnavailable says which of them cannot be read now."""
        try:
            if self.healthy is False:
                raise ConnectionError("Redis is unreachable")
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(f"acl:user:{user_id}")
            if session_id:
                pipe.get(f"session:{session_id}")
                if eid:
                    pipe.xrange(STREAM, min=eid, max=eid, count=1)
                    pipe.xrange(STREAM, count=1)
            res = await pipe.execute(raise_on_error=False)
            for i, r in enumerate(res):
                if isinstance(r, _DOWN) and not (i == 0 and _wrong_type(r)):
                    raise r
        except _DOWN as e:
            acl = self._acl_when_down(user_id, e)
            if session_id:
                raise StoresUnavailable(f"session {session_id!r} cannot be read: {e!r}"[:200],
                                        why="the session cannot be resumed now") from None
            return acl, None, None
        self._ops += len(res)
        if isinstance(res[0], Exception) and not _wrong_type(res[0]):
            raise StoresUnavailable(f"rights of {user_id!r} cannot be read: {res[0]!r}"[:200])
        acl = self._acl_read(user_id, res[0])
        if not session_id:
            return acl, None, None
        raw = res[1]
        if isinstance(raw, Exception):
            raise StoresUnavailable(f"session cannot be read: {raw!r}"[:200], why="the session cannot be resumed now")
        record = _session_record(session_id, raw)
        return acl, record, (_where(eid, res[2], res[3]) if eid and record is not None else None)

    def _acl_when_down(self, user_id, e) -> dict | None:
        if user_id in self._acls:
            return self._acls[user_id]
        raise StoresUnavailable(f"rights of {user_id!r} cannot be read: {e!r}"[:200]) from None

    def _acl_read(self, user_id, h) -> dict | None:
        """HGETALL acl:user:{id} (a WRONGTYPE error for a key that is not a
        hash) as the rights it grants, remembered for when Redis cannot answer."""
        if _wrong_type(h):
            # every field unreadable: nothing granted. Refusing the user
            # instead would have them retry for ever, and treating it as an
            # outage ended the Pub/Sub listener (_acl_update)
            self.hub.stats.reject("invalid_acl")
            log.warning("unreadable ACL: the key is not a hash, nothing granted by it",
                        extra={"fields": {"user": user_id}})
            return self._remember_acl(user_id, {k: [] for k in ACL_FIELDS})
        out = {}
        for k, v in (h or {}).items():
            # a field name that is not UTF-8, or JSON nested past the
            # recursion limit, is an unreadable field like any other: raising
            # here would end the Pub/Sub listener on every restart
            key = k.decode(errors="replace") if isinstance(k, bytes) else str(k)
            try:
                val = json.loads(v)
            except (ValueError, RecursionError):
                val = None
            if isinstance(val, list) and all(isinstance(x, str) for x in val):
                out[key] = val
            elif key in ACL_FIELDS:
                # an unreadable field restricts, never widens: leaving it out
                # would hand back the token's own (wider) rights for it
                out[key] = []
                self.hub.stats.reject("invalid_acl")
                log.warning("unreadable ACL field: nothing granted by it", extra={"fields": {
                    "user": user_id, "field": key}})
        return self._remember_acl(user_id, out or None)

    def _remember_acl(self, user_id, acl: dict | None) -> dict | None:
        acls = self._acls
        acls.pop(user_id, None)
        if len(acls) >= ACLS_KEPT:
            del acls[next(iter(acls))]
        acls[user_id] = acl
        return acl


def _wrong_type(e) -> bool:
    """A WRONGTYPE error: Redis answered, and the key holds another type."""
    return isinstance(e, ResponseError) and str(e).startswith("WRONGTYPE")


def _where(eid: str, found, first) -> str:
    """stores.locate's answer from XRANGE eid eid COUNT 1 and XRANGE - + COUNT 1."""
    if isinstance(found, ResponseError):   # not an id Redis accepts
        return "unknown"
    for r in (found, first):
        if isinstance(r, Exception):
            raise r
    if found:
        return "found"
    if not first or eid_key(eid) < eid_key(_s(first[0][0])):
        return "older"
    return "unknown"


def _session_record(session_id: str, raw) -> dict | None:
    """A stored session, or None (an unknown session) for one nobody can read:
    a client must not be told "try again" for an hour over a broken record."""
    if not raw:
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        log.warning("stored session unreadable; treated as unknown", extra={"fields": {"session": session_id}})
        return None
    return record


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    f = float(text)
    if not math.isfinite(f):
        raise ValueError(f"{text[:20]} is not a finite number")
    return f


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v
