"""Connecting to Redis: one server, or a Redis Cluster (issue 14 part 3).

`--redis` takes `redis://`, `rediss://` and `unix://` URLs for one server, and
`redis+cluster://[user:password@]host:port[,host:port…]` (`rediss+cluster://`
with TLS) for a cluster, any of its nodes as seeds (PROTOCOL §7). The stores
talk to either through the same redis.asyncio API; what differs is here:

- the pool. For one server, a BlockingConnectionPool: a request waits up to
  --redis-pool-timeout-s for one of --redis-pool-size connections. redis-py's
  cluster client instead fails at once when a node's connections run out, so
  a reconnect storm would fail connects that only had to wait. The cluster
  client is bounded the same way here: at most --redis-pool-size requests in
  flight (each uses at most one connection per node), the rest wait.
- SCAN, which a cluster answers per node: `Scanner` walks every primary.
- MGET across keys of different slots, and TIME (which node's clock).

Keys used together in one script or transaction share a slot: the event
log's dedupe keys carry the log's name as their hash tag (stores/redis.py).
Pub/Sub is cluster-wide in Redis Cluster (a PUBLISH reaches subscribers on
every node), so one subscription on any node hears every channel.
"""
from __future__ import annotations

import asyncio
import contextvars
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def cluster_url(url: str) -> tuple[list[tuple[str, int]], dict]:
    """(seed nodes, client options) of a redis+cluster:// URL; ValueError
    saying what is wrong with it."""
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in CLUSTER_SCHEMES:
        raise ValueError("is not a redis+cluster:// URL")
    u = urlsplit("redis://" + rest)
    if u.query or u.fragment:
        raise ValueError("takes no ?options: redis+cluster://host:port[,host:port…]")
    if u.path.strip("/") not in ("", "0"):
        raise ValueError("names a database: a Redis Cluster has only database 0")
    netloc = u.netloc
    opts: dict = {"ssl": scheme.lower() == "rediss+cluster"}
    if "@" in netloc:
        # as redis-py reads redis://user:password@host and redis://user@host
        auth, netloc = netloc.rsplit("@", 1)
        user, colon, password = auth.partition(":")
        if user:
            opts["username"] = unquote(user)
        if colon:
            opts["password"] = unquote(password)
    seeds = []
    for part in netloc.split(","):
        part = part.strip()
        if part.startswith("["):          # [IPv6]:port
            host, _, rest = part[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ValueError(f"has a node that is not host:port ({part!r})")
            port = rest[1:]
        elif part.count(":") > 1:
            raise ValueError(f"has an IPv6 node without brackets ({part!r}): write [::1]:7000")
        else:
            host, _, port = part.partition(":")
        if not host:
            raise ValueError("needs host:port for every node: redis+cluster://host:port[,host:port…]")
        if port and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"has a port that is not from 1 to 65535 ({part!r})")
        seeds.append((host, int(port) if port else 6379))
    return seeds, opts


# Redis unreachable or failing: a server or cluster that cannot be reached,
# or a cluster with a slot no node serves (what every loop backs off on)
DOWN = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)

_holding = contextvars.ContextVar("redis_permit", default=False)


class _Permits:
    """At most `n` requests in flight, the others waiting up to `wait_s`:
    the blocking pool's behaviour for the cluster client. `waits` and
    `timeouts` feed redis_pool_waits_total and redis_pool_timeouts_total."""

    def __init__(self, n: int, wait_s: float):
        self._sem = asyncio.Semaphore(n)
        self.wait_s = wait_s
        self.waits = 0
        self.timeouts = 0

    async def run(self, coro_fn, *args, **kwargs):
        if _holding.get():   # a redirect inside a pipeline: its permit covers it
            return await coro_fn(*args, **kwargs)
        sem = self._sem
        if sem.locked():
            self.waits += 1
            try:
                async with asyncio.timeout(self.wait_s):
                    await sem.acquire()
            except TimeoutError:
                self.timeouts += 1
                raise RedisConnectionError("no free Redis Cluster connection in time") from None
        else:
            await sem.acquire()   # free: taken at once, without a timer
        token = _holding.set(True)
        try:
            return await coro_fn(*args, **kwargs)
        finally:
            _holding.reset(token)
            sem.release()


class _BoundedPipeline(ClusterPipeline):
    async def execute(self, *args, **kwargs):
        return await self.cluster_client.permits.run(super().execute, *args, **kwargs)


class BoundedCluster(RedisCluster):
    """RedisCluster whose commands and pipelines wait for a permit."""

    permits: _Permits

    async def execute_command(self, *args, **kwargs):
        return await self.permits.run(super().execute_command, *args, **kwargs)

    def pipeline(self, transaction=None, shard_hint=None):
        super().pipeline(transaction, shard_hint)   # its checks
        return _BoundedPipeline(self, transaction)


class CountingPool(aioredis.BlockingConnectionPool):
    """The bounded pool, counting the requests that had to wait for a free
    connection and those that gave up (redis_pool_waits_total and
    redis_pool_timeouts_total): how close the pool size is to too small."""

    waits = 0
    timeouts = 0

    async def get_connection(self, *args, **kwargs):
        if not self.can_get_connection():
            self.waits += 1
        try:
            return await super().get_connection(*args, **kwargs)
        except aioredis.ConnectionError as e:
            if isinstance(e.__cause__, asyncio.TimeoutError):
                self.timeouts += 1
            raise


def connect(url: str, *, max_connections: int, wait_s: float, name: str):
    """A client for `url` with at most `max_connections` requests in flight
    (per node, on a cluster), each waiting at most `wait_s` for its turn.
    `client.pool` has the waits and timeouts counters."""
    common = dict(socket_timeout=5, socket_connect_timeout=3, health_check_interval=10, client_name=name)
    if not is_cluster(url):
        pool = CountingPool.from_url(url, max_connections=max_connections, timeout=wait_s, **common)
        r = aioredis.Redis(connection_pool=pool)
        r.pool = pool
        return r
    seeds, opts = cluster_url(url)
    # each permit holds at most one connection per node: the nodes' own
    # limit is never what a request runs into
    r = BoundedCluster(startup_nodes=[ClusterNode(h, p) for h, p in seeds],
                       max_connections=max_connections + 4, **opts, **common)
    r.permits = r.pool = _Permits(max_connections, wait_s)
    return r


def clustered(r) -> bool:
    return isinstance(r, RedisCluster)


async def mget(r, keys: list) -> list:
    """MGET of keys that may lie in different slots."""
    if clustered(r):
        return await r.mget_nonatomic(keys)
    return await r.mget(keys)


async def server_time_ms(r, key: str) -> int:
    """Redis's clock in ms: on a cluster, the clock of the node holding
    `key`, so that every instance comparing times stored there reads the same one."""
    if clustered(r):
        await r.initialize()   # the slots map, which get_node_from_key reads (a no-op once known)
        sec, usec = await r.time(target_nodes=r.get_node_from_key(key))
    else:
        sec, usec = await r.time()
    return sec * 1000 + usec // 1000


class Scanner:
    """SCAN MATCH in slices, over a server or every primary of a cluster.
    `await step(count)` returns the next keys; `done` says that the pass
    that step belonged to has covered every key, and the next step starts
    a new one. On a cluster, a pass counts only if the slot map stayed the
    same from its start to its end: keys that moved between nodes meanwhile
    may have been missed, so the pass starts again on the new map."""

    def __init__(self, r, match: str):
        self.r, self.match = r, match
        self._nodes: list[str] = []    # the cluster's primaries for this pass
        self._layout = None            # the slot map this pass started with
        self._node = 0
        self._cursor = 0
        self.done = False
        self.restarts = 0              # passes begun again after the slot map changed

    def reset(self) -> None:
        self._nodes, self._layout, self._node, self._cursor, self.done = [], None, 0, 0, False

    async def step(self, count: int) -> list:
        if self.done:
            self.reset()
        r = self.r
        if not clustered(r):
            self._cursor, keys = await r.scan(self._cursor, match=self.match, count=count)
            self.done = self._cursor == 0
            return keys
        await r.initialize()   # the topology, before get_primaries (a no-op once known)
        layout = _layout(r)
        if layout != self._layout:
            if self._layout is not None:
                self.restarts += 1
            self._layout, self._node, self._cursor = layout, 0, 0
            self._nodes = sorted(n.name for n in r.get_primaries())
        node = r.get_node(node_name=self._nodes[self._node])
        if node is None:   # gone since the map was read: the next step sees the new map
            self._layout = ()
            return []
        cursor, keys = _one(await r.scan(self._cursor, match=self.match, count=count, target_nodes=node))
        self._cursor = cursor
        if cursor == 0:
            self._node += 1
            if self._node >= len(self._nodes):
                self.done = True
        return keys


def _layout(r) -> tuple:
    """Which primary serves each slot, as ranges: equal while no slot moved
    and no primary changed."""
    out, last = [], None
    for slot, nodes in sorted(r.nodes_manager.slots_cache.items()):
        name = nodes[0].name if nodes else None
        if name != last:
            out.append((slot, name))
            last = name
    return tuple(out)


def _one(res):
    """redis-py's cluster SCAN with one target node answers
    ({node name: cursor}, keys)."""
    cursors, keys = res
    if isinstance(cursors, dict):
        (cursor,) = cursors.values()
        return int(cursor), keys
    return int(cursors), keys


async def run_ids(r) -> dict[str, str] | None:
    """Each primary's run_id (one server: its own), or None when one cannot
    be read. A run_id changes when a server restarts, and a primary's name
    when a replica takes over: either may have lost writes, which the writer
    then makes again. None (a node unreachable, INFO not allowed to this
    user) never stops the writer; the next answer differs from it, so a
    rewrite follows once the nodes answer again."""
    try:
        if not clustered(r):
            return {"": str((await r.info("server")).get("run_id"))}
        await r.initialize()
        out = {}
        for node in r.get_primaries():
            info = await r.info("server", target_nodes=node)
            if isinstance(info, dict) and node.name in info and isinstance(info[node.name], dict):
                info = info[node.name]   # some versions answer {node: info}
            out[node.name] = str(info.get("run_id"))
        return out
    except DOWN:
        return None
