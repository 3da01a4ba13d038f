"""Who is connected where, in Redis, and cleaning up after instances that die.

PROTOCOL §1.3 keeps `user:connections:{user}` (a user's live client ids) and
`subscribers:vehicle:{id}` / `subscriptions:client:{client}` (explicit vehicle
subscriptions, both ways). A connection adds itself when it opens and removes
itself when it closes. Two things can leave an entry behind for good:

- the instance is SIGKILLed (or its host dies): nobody runs the removals;
- Redis is unreachable when a connection closes: the removal fails.

So each instance also registers the connections it holds, and everything is
kept in step:

- `realtime:instances` (sorted set): presence id -> last heartbeat (ms).
- `instance:clients:{presence id}` (hash): client id -> user id, for every
  connection the instance holds.

Every `--instance-timeout-s`/6 an instance renews its heartbeat and compares
its hash with the connections it really has: entries whose connection is gone
are removed (with their user and vehicle entries), and connections missing
from it are added again. An instance whose heartbeat is older than
`--instance-timeout-s` is dead: a survivor takes a lease on it and removes
everything its hash names, in chunks, then the hash and the registry entry.

The presence id is the instance id plus a random suffix: two hosts whose
workers have the same pid never share (and so never clean up) each other's
connections.
"""
from __future__ import annotations

import logging
import secrets

from .redis_conn import server_time_ms

log = logging.getLogger("realtime.presence")

INSTANCES = "realtime:instances"
CHUNK = 500   # connections removed per pipeline, so that one sweep never blocks Redis long


def clients_key(presence: str) -> str:
    return f"instance:clients:{presence}"


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Presence:
    def __init__(self, r, instance_id: str, timeout_s: float):
        self.r = r
        self.id = f"{instance_id}.{secrets.token_hex(4)}"
        self.timeout_s = timeout_s
        self.ops = 0
        self.swept = 0      # connections removed for dead instances, or after failed closes

    @property
    def every_s(self) -> float:
        return max(0.5, self.timeout_s / 6)

    # ------------------------------------------------------------ one connection
    async def opened(self, user_id: str, client_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(clients_key(self.id), client_id, user_id)
        pipe.sadd(f"user:connections:{user_id}", client_id)
        await pipe.execute()
        self.ops += 2

    async def closed(self, user_id: str, client_id: str, vehicles) -> None:
        await self.forget(self.id, [(client_id, user_id)], vehicles)

    async def forget(self, presence: str, clients: list[tuple[str, str]], vehicles=()) -> None:
        """Remove connections (client id, user id) of an instance: from their
        user's set, from the subscriber sets of every vehicle they subscribed
        to (as `subscriptions:client:{client}` says, plus `vehicles`), and
        from the instance's hash."""
        if not clients:
            return
        pipe = self.r.pipeline(transaction=False)
        for client, _ in clients:
            pipe.smembers(f"subscriptions:client:{client}")
        subscribed = await pipe.execute()
        pipe = self.r.pipeline(transaction=False)
        n = len(clients) + 1
        for (client, user), vs in zip(clients, subscribed):
            pipe.srem(f"user:connections:{user}", client)
            for v in {_s(v) for v in vs} | set(vehicles):
                pipe.srem(f"subscribers:vehicle:{v}", client)
                n += 1
            pipe.delete(f"subscriptions:client:{client}")
            n += 2
        pipe.hdel(clients_key(presence), *[c for c, _ in clients])
        await pipe.execute()
        self.ops += n

    # ------------------------------------------------------------ every every_s
    async def beat(self, live) -> None:
        """Renew the heartbeat, bring this instance's hash in step with
        live() (client id -> (user id, subscribed vehicles) of its open
        connections), and sweep dead instances. Times are Redis's own
        (TIME), so that hosts whose clocks differ never sweep a live one."""
        now_ms = await server_time_ms(self.r, INSTANCES)
        await self.r.zadd(INSTANCES, {self.id: now_ms})
        self.ops += 2
        await self._reconcile_own(live)
        dead = await self.r.zrangebyscore(INSTANCES, "-inf", now_ms - int(self.timeout_s * 1000))
        self.ops += 1
        for presence in map(_s, dead):
            if presence != self.id:
                await self.sweep(presence)

    async def _reconcile_own(self, live) -> None:
        key = clients_key(self.id)
        held: dict[str, str] = {}
        async for client, user in self.r.hscan_iter(key, count=CHUNK):
            held[_s(client)] = _s(user)
        self.ops += 1 + len(held) // CHUNK
        # which connections are open is asked now, after the scan: one that
        # opened meanwhile is live (not gone), one that closed meanwhile has
        # its own removal running; removing one twice is harmless
        now = live()
        gone = [(c, u) for c, u in held.items() if c not in now]
        for i in range(0, len(gone), CHUNK):
            await self.forget(self.id, gone[i:i + CHUNK])
        self.swept += len(gone)
        missing = [(c, uv) for c, uv in now.items() if c not in held]
        for i in range(0, len(missing), CHUNK):
            # an open whose write failed: its entries, and its subscriptions
            pipe = self.r.pipeline(transaction=False)
            part = missing[i:i + CHUNK]
            pipe.hset(key, mapping={c: u for c, (u, _) in part})
            n = 1
            for client, (user, vehicles) in part:
                pipe.sadd(f"user:connections:{user}", client)
                n += 1
                if vehicles:
                    pipe.sadd(f"subscriptions:client:{client}", *vehicles)
                    for v in vehicles:
                        pipe.sadd(f"subscribers:vehicle:{v}", client)
                    n += 1 + len(vehicles)
            await pipe.execute()
            self.ops += n

    async def sweep(self, presence: str) -> None:
        """Remove every connection of a dead instance. The lease keeps two
        survivors from doing it at once; if this one dies half-way, the lease
        lapses and another finishes the job."""
        lease = f"realtime:sweep:{presence}"
        if not await self.r.set(lease, self.id, nx=True, px=int(max(10.0, self.timeout_s) * 2000)):
            return
        n = 0
        pairs: list[tuple[str, str]] = []
        # HSCAN returns every field present from start to end, also while
        # fields are deleted behind it
        async for client, user in self.r.hscan_iter(clients_key(presence), count=CHUNK):
            pairs.append((_s(client), _s(user)))
            if len(pairs) >= CHUNK:
                await self.forget(presence, pairs)
                n, pairs = n + len(pairs), []
        if pairs:
            await self.forget(presence, pairs)
            n += len(pairs)
        self.ops += 1 + n // CHUNK
        await self.r.zrem(INSTANCES, presence)
        await self.r.delete(lease)
        self.ops += 2
        self.swept += n
        log.info("connections of a dead instance removed", extra={"fields": {
            "instance": presence, "connections": n, "by": self.id}})

    async def leave(self, live) -> None:
        """At a graceful stop: every connection of this instance is closed by
        now, so the hash is emptied as for a dead instance, and the entry goes."""
        await self._reconcile_own(live)
        await self.r.zrem(INSTANCES, self.id)
        self.ops += 1
