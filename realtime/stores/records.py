"""Long-term records in PostgreSQL (PROTOCOL §6), written off the delivery path.

Callers append to bounded in-memory queues and return at once; one task
writes whatever is queued once a second (or sooner when a queue fills up) in
a single transaction per table, with asyncpg's executemany. While the database
is down the queues keep filling up to `MAX_PENDING` rows; past that the oldest
rows are dropped and counted (`dropped`), so an outage never stops delivery
and costs bounded memory. On shutdown `stop()` writes what is left, within the
grace period it is given.

Tables are created if missing. A connection's row is inserted when it opens
(disconnected_at NULL) and completed when it closes, so open connections show.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from datetime import datetime, timezone

log = logging.getLogger("realtime.records")

MAX_PENDING = 100_000     # rows per queue kept through an outage
WRITE_EVERY_S = 1.0
WRITE_AT = 5_000          # a queue this long is written without waiting

SCHEMA = """
CREATE TABLE IF NOT EXISTS client_connections (
    id bigserial PRIMARY KEY,
    user_id text NOT NULL,
    client_id text NOT NULL UNIQUE,
    instance_id text NOT NULL,
    connected_at timestamptz NOT NULL,
    disconnected_at timestamptz,
    reason text,
    messages_sent bigint NOT NULL DEFAULT 0,
    bytes_sent bigint NOT NULL DEFAULT 0,
    transport text NOT NULL DEFAULT 'websocket'
);
-- databases made before the fallback transports (issue 11)
ALTER TABLE client_connections ADD COLUMN IF NOT EXISTS transport text NOT NULL DEFAULT 'websocket';
-- the client's address (PROTOCOL §2: behind --trusted-proxies, from X-Forwarded-For)
ALTER TABLE client_connections ADD COLUMN IF NOT EXISTS client_address text;
CREATE TABLE IF NOT EXISTS user_subscriptions (
    user_id text NOT NULL,
    vehicle_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, vehicle_id)
);
CREATE TABLE IF NOT EXISTS realtime_events (
    id bigserial PRIMARY KEY,
    event_type text NOT NULL,
    client_id text,
    vehicle_id text,
    details jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS realtime_events_created_at ON realtime_events (created_at);
"""

# (queue, statement); written in this order, so a connection's insert goes
# before its completion when both are queued in the same second
STATEMENTS = (
    # once per client_id (a batch may be written again after a failure) without
    # ON CONFLICT, which needs client_id UNIQUE: tables made from PROTOCOL §6
    # alone do not have it, and every insert then failed
    ("opened", "INSERT INTO client_connections (user_id, client_id, instance_id, connected_at, transport, "
               "client_address) SELECT $1::text, $2::text, $3::text, $4::timestamptz, $5::text, $6::text "
               "WHERE NOT EXISTS (SELECT 1 FROM client_connections WHERE client_id = $2::text)"),
    ("closed", "UPDATE client_connections SET disconnected_at = $2, reason = $3, "
               "messages_sent = $4, bytes_sent = $5 WHERE client_id = $1"),
    ("subscriptions", "INSERT INTO user_subscriptions (user_id, vehicle_id, created_at) "
                      "VALUES ($1, $2, $3) ON CONFLICT (user_id, vehicle_id) DO NOTHING"),
    ("events", "INSERT INTO realtime_events (event_type, client_id, vehicle_id, details, created_at) "
               "VALUES ($1, $2, $3, $4::jsonb, $5)"),
)


def _ts(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


class Records:
    """The PostgreSQL writer. `NoRecords` below is the same API doing nothing."""

    def __init__(self, dsn: str, instance_id: str):
        self.dsn = dsn
        self.instance_id = instance_id
        self.queues: dict[str, deque] = {name: deque() for name, _ in STATEMENTS}
        self.written = 0
        self.refused = 0       # rows the database would not take (see _write_all)
        self._dropped_from: dict[str, int] = {}   # per queue, for _write_all
        self.healthy = False
        self._pool = None
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    # ---------------------------------------------------------------- API (sync, O(1))
    def connection_opened(self, user_id: str, client_id: str, connected_at: float,
                          transport: str = "websocket", address: str = "") -> None:
        self._put("opened", (user_id, client_id, self.instance_id, _ts(connected_at), transport,
                             address[:64] or None))

    def connection_closed(self, client_id: str, reason: str, messages: int, nbytes: int) -> None:
        self._put("closed", (client_id, _ts(time.time()), reason[:500], messages, nbytes))

    def subscribed(self, user_id: str, vehicle_ids) -> None:
        now = _ts(time.time())
        for vid in vehicle_ids:
            if "\x00" in vid:   # a name a client chose: text columns take no NUL
                vid = vid.replace("\x00", "\ufffd")
            self._put("subscriptions", (user_id, vid, now))

    def event(self, event_type: str, client_id: str | None = None, vehicle_id: str | None = None,
              **details) -> None:
        # jsonb takes no NUL character, and details can quote what a client sent
        text = json.dumps(details, ensure_ascii=False, default=str).replace("\\u0000", "\\ufffd")
        self._put("events", (event_type, client_id, vehicle_id, text, _ts(time.time())))

    @property
    def dropped(self) -> int:
        """Records dropped because their queue was full (an outage)."""
        return sum(self._dropped_from.values())

    @property
    def pending(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def _put(self, queue: str, row: tuple) -> None:
        q = self.queues[queue]
        if len(q) >= MAX_PENDING:
            q.popleft()
            self._dropped_from[queue] = self._dropped_from.get(queue, 0) + 1
        q.append(row)
        if len(q) >= WRITE_AT:
            self._wake.set()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="postgres-records")

    async def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (PROTOCOL §5 shutdown), then close."""
        from ..tasks import cancel_and_wait
        await cancel_and_wait(self._task)
        try:
            if self.pending:
                await asyncio.wait_for(self._write_all(), timeout)
        except Exception as e:
            log.warning("records not written at shutdown", extra={"fields": {
                "pending": self.pending, "error": repr(e)[:200]}})
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 2.0)
            except Exception:
                self._pool.terminate()

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), WRITE_EVERY_S)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._write_all()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if self.healthy:
                    log.warning("postgres unavailable; records are queued", extra={"fields": {
                        "pending": self.pending, "error": repr(e)[:200]}})
                self.healthy = False
                await self._drop_pool()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    async def _connect(self):
        if self._pool is None:
            import asyncpg
            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=2, timeout=5,
                                                   command_timeout=30)
            async with self._pool.acquire() as c:
                await c.execute(SCHEMA)
            if not self.healthy:
                log.info("postgres connected", extra={"fields": {"pending": self.pending}})
            self.healthy = True
        return self._pool

    async def _drop_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.terminate()

    async def _write_all(self) -> None:
        import asyncpg
        pool = await self._connect()
        unwritable = None
        for name, sql in STATEMENTS:
            q = self.queues[name]
            while q:
                rows = [q[i] for i in range(min(len(q), WRITE_AT))]
                dropped = self._dropped_from.get(name, 0)
                refused = 0
                async with pool.acquire() as c:
                    try:
                        await c.executemany(sql, rows)   # atomic: all or none
                    except asyncpg.DataError:
                        # a row the database refuses: retried for ever it
                        # would stop every record behind it
                        refused = await self._write_each(c, name, sql, rows)
                    except asyncpg.SyntaxOrAccessError as e:
                        # this table is not as we write it (a column missing,
                        # no right): its rows stay queued, the other tables
                        # are written all the same, and this is tried again
                        unwritable = unwritable or e
                        break
                # only now: a failure above leaves them queued for the next try.
                # Rows dropped from this queue meanwhile (it was full) were its
                # oldest, ours.
                for _ in range(max(0, len(rows) - (self._dropped_from.get(name, 0) - dropped))):
                    q.popleft()
                self.written += len(rows) - refused
                self.refused += refused
        if unwritable is not None:
            raise unwritable

    async def _write_each(self, c, name: str, sql: str, rows: list) -> int:
        """The batch in one transaction, each row behind a savepoint: the
        ones the database refuses are left out, the others committed
        together (a failure on the way leaves the whole batch queued, as
        executemany would). Returns how many were refused."""
        import asyncpg
        refused = []
        async with c.transaction():
            for row in rows:
                try:
                    async with c.transaction():   # a savepoint
                        await c.execute(sql, *row)
                except asyncpg.DataError as e:
                    refused.append(e)
        for e in refused[:1]:
            log.warning("record refused by the database; dropped", extra={"fields": {
                "table": name, "refused": len(refused), "error": repr(e)[:200]}})
        return len(refused)


class NoRecords:
    """No --postgres: nothing is recorded."""

    healthy = True
    pending = written = dropped = refused = 0

    def connection_opened(self, *a) -> None: ...
    def connection_closed(self, *a) -> None: ...
    def subscribed(self, *a) -> None: ...
    def event(self, *a, **k) -> None: ...
    def start(self) -> None: ...
    async def stop(self, timeout: float = 5.0) -> None: ...
