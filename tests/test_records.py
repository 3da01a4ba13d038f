"""PostgreSQL records (PROTOCOL §6): written off the delivery path, kept
through an outage, flushed at shutdown. Real PostgreSQL; the outage is a real
TCP proxy in front of it that the test takes down and brings back."""
import asyncio
import os
import signal
import uuid
from urllib.parse import urlsplit

import asyncpg
import pytest

from conftest import Client, Server, free_port, ingest, require, stop_process, token, update

pytestmark = pytest.mark.integration

# A role and database that belong to the suite: scripts/services.sh makes them
# (password login, so Debian's default scram-sha-256 on 127.0.0.1 works too).
DSN = os.environ.get("REALTIME_TEST_POSTGRES",
                     "postgresql://realtime_test:realtime_test@127.0.0.1:5432/realtime_test")
PG_HOST, PG_PORT = urlsplit(DSN).hostname, urlsplit(DSN).port or 5432


async def _db():
    try:
        return await asyncpg.connect(DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
        return None


@pytest.fixture
async def db():
    conn = await _db()
    require(f"PostgreSQL at {DSN}", conn is not None)
    yield conn
    await conn.close()


async def rows_eventually(db, sql, *args, n=1, timeout=10.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            rows = await db.fetch(sql, *args)
        except asyncpg.UndefinedTableError:
            rows = []
        if len(rows) >= n or loop.time() > deadline:
            return rows
        await asyncio.sleep(0.1)


class Proxy:
    """A TCP forwarder to PostgreSQL that can go down (closing every
    connection through it) and come back on the same port."""

    def __init__(self, port: int, target=(PG_HOST, PG_PORT)):
        self.port, self.target = port, target
        self.server = None
        self.writers = set()

    async def up(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def down(self):
        self.server.close()
        for w in list(self.writers):
            w.close()
        await self.server.wait_closed()

    async def _handle(self, r1, w1):
        r2, w2 = await asyncio.open_connection(*self.target)
        self.writers |= {w1, w2}

        async def pipe(r, w):
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                w.close()
        await asyncio.gather(pipe(r1, w2), pipe(r2, w1))


async def test_connections_subscriptions_and_events_are_recorded(db, uid):
    s = Server("--simulate", "0", "--postgres", DSN)
    try:
        user = "rec-" + uuid.uuid4().hex[:8]
        c = await Client.connect(s, token(sub=user))
        client = (await c.recv_type("welcome"))["client"]
        await c.subscribe(subscriptions={"vehicles": [uid + "a", uid + "b"]})
        rows = await rows_eventually(db, "SELECT * FROM client_connections WHERE client_id=$1", client)
        assert rows and rows[0]["user_id"] == user and rows[0]["disconnected_at"] is None
        await c.close()
        rows = await rows_eventually(
            db, "SELECT * FROM client_connections WHERE client_id=$1 AND disconnected_at IS NOT NULL", client)
        assert rows[0]["reason"].startswith("client closed") and rows[0]["messages_sent"] >= 3
        assert rows[0]["bytes_sent"] > 0 and rows[0]["connected_at"] < rows[0]["disconnected_at"]
        subs = await rows_eventually(db, "SELECT vehicle_id FROM user_subscriptions WHERE user_id=$1",
                                     user, n=2)
        assert sorted(r["vehicle_id"] for r in subs) == [uid + "a", uid + "b"]
        ev = await rows_eventually(db, "SELECT * FROM realtime_events WHERE client_id=$1 "
                                       "AND event_type='subscribe'", client)
        assert ev and '"vehicles": 2' in ev[0]["details"]
    finally:
        s.stop()


async def test_connection_rows_and_metrics_name_the_transport(db, uid):
    """Issue 11 part 7: client_connections.transport, and the per-transport
    counters of /metrics, for WebSocket, SSE and a long-polling session."""
    import aiohttp
    from conftest import metric_value
    s = Server("--simulate", "0", "--postgres", DSN)
    try:
        user = "tr-" + uuid.uuid4().hex[:8]
        auth = {"Authorization": f"Bearer {token(sub=user)}"}
        c = await Client.connect(s, token(sub=user))
        ws_client = (await c.recv_type("welcome"))["client"]
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{s.url}/api/realtime/session", json={}, headers=auth) as r:
                sid = (await r.json())["session"]
            async with http.get(f"{s.url}/api/realtime/poll", params={"session": sid, "timeout": "0"},
                                headers=auth) as r:
                poll_client = (await r.json())["messages"][0]["client"]
            async with http.get(f"{s.url}/api/realtime/stream", headers=auth) as resp:
                head = b""
                while b"event: welcome" not in head or b"\n\n" not in head.split(b"event: welcome", 1)[1]:
                    head += await resp.content.readany()
                import json
                line = head.split(b"event: welcome\ndata: ", 1)[1].split(b"\n", 1)[0]
                sse_client = json.loads(line)["client"]
                for kind in ("websocket", "sse", "long_poll"):
                    assert metric_value(s, f'websocket_connections_active{{transport="{kind}"}}') == 1, kind
                    assert metric_value(s, f'transport_connections_opened_total{{transport="{kind}"}}') == 1, kind
                    assert metric_value(s, f'transport_messages_sent_total{{transport="{kind}"}}') >= 1, kind
                    assert metric_value(s, f'transport_bytes_sent_total{{transport="{kind}"}}') > 0, kind
        await c.close()
        for client, kind in ((ws_client, "websocket"), (poll_client, "long_poll"), (sse_client, "sse")):
            rows = await rows_eventually(db, "SELECT transport FROM client_connections WHERE client_id=$1", client)
            assert [r["transport"] for r in rows] == [kind]
    finally:
        s.stop()


async def test_an_outage_queues_records_and_delivery_goes_on(db, uid):
    proxy = Proxy(free_port())           # down: nothing listens on its port yet
    s = Server("--simulate", "0", "--postgres", DSN.replace(f"{PG_HOST}:{PG_PORT}", f"127.0.0.1:{proxy.port}"))
    try:
        user = "out-" + uuid.uuid4().hex[:8]
        c = await Client.connect(s, token(sub=user))
        client = (await c.recv_type("welcome"))["client"]
        await c.subscribe(subscriptions={"vehicles": [uid + "v"]})
        ingest(s, [update(uid + "v", 55.0, 37.0)])
        assert await c.wait_messages(lambda m: m["v"] == uid + "v")      # delivery is not held up
        import urllib.request
        text = urllib.request.urlopen(s.url + "/metrics", timeout=5).read().decode()
        assert "postgres_records_pending 0.0" not in text
        assert urllib.request.urlopen(s.url + "/health/ready", timeout=5).status == 200
        await proxy.up()                  # the database comes back: the queue is written
        rows = await rows_eventually(db, "SELECT * FROM client_connections WHERE client_id=$1",
                                     client, timeout=20)
        assert rows and rows[0]["user_id"] == user
        subs = await rows_eventually(db, "SELECT * FROM user_subscriptions WHERE user_id=$1", user)
        assert [r["vehicle_id"] for r in subs] == [uid + "v"]
        await c.close()
    finally:
        s.stop()
        if proxy.server:
            await proxy.down()


async def test_records_are_flushed_at_shutdown(db):
    s = Server("--simulate", "0", "--postgres", DSN)
    user = "bye-" + uuid.uuid4().hex[:8]
    c = await Client.connect(s, token(sub=user))
    client = (await c.recv_type("welcome"))["client"]
    assert await rows_eventually(db, "SELECT 1 FROM client_connections WHERE client_id=$1",
                                 client, timeout=20)   # the open row is written
    await c.close()
    s.proc.send_signal(signal.SIGTERM)    # before the next once-a-second write
    assert await asyncio.to_thread(s.proc.wait, 15) == 0
    s.log.close()
    rows = await db.fetch("SELECT * FROM client_connections WHERE client_id=$1 "
                          "AND disconnected_at IS NOT NULL", client)
    assert rows and rows[0]["user_id"] == user
    stop_process(s.proc)


async def test_a_row_the_database_refuses_is_dropped_alone(db, uid):
    """A record PostgreSQL cannot take (here a lone surrogate, which has no
    UTF-8 form) must not stall the records queued with it or after it: it is
    dropped and counted, the rest of its batch is written, once."""
    from realtime.stores.records import Records
    records = Records(DSN, "test-" + uid)
    records.start()
    records.event("refusal_test", None, "before_" + uid)
    records.event("refusal_test", None, "bad_\ud800" + uid)
    records.event("refusal_test", None, "after_" + uid)
    await records.stop(10)
    rows = await db.fetch("SELECT vehicle_id FROM realtime_events WHERE event_type = 'refusal_test' "
                          "AND vehicle_id LIKE $1", "%" + uid)
    assert sorted(r["vehicle_id"] for r in rows) == ["after_" + uid, "before_" + uid]
    assert (records.refused, records.written, records.pending) == (1, 2, 0)


async def test_tables_made_from_protocol_section_6_alone_are_written(db, uid):
    """Tables made by someone else from §6's columns alone: no UNIQUE on
    client_id (the insert used ON CONFLICT on it, and every write failed,
    the other tables' too). Each row is written once, batches retried after
    a failure included, and a table we cannot write does not stop the others."""
    from realtime.stores.records import Records
    schema = "p6_" + uid.strip("_").lower()
    await db.execute(f"CREATE SCHEMA {schema}")
    try:
        await db.execute(f"""
            CREATE TABLE {schema}.client_connections (id bigserial PRIMARY KEY, user_id text, client_id text,
                instance_id text, connected_at timestamptz, disconnected_at timestamptz, reason text,
                messages_sent bigint, bytes_sent bigint);
            CREATE TABLE {schema}.user_subscriptions (user_id text, vehicle_id text, created_at timestamptz,
                UNIQUE (user_id, vehicle_id));
            CREATE TABLE {schema}.realtime_events (id bigserial PRIMARY KEY, event_type text, client_id text,
                vehicle_id text, details jsonb, created_at timestamptz);""")
        records = Records(DSN + f"?search_path={schema}", "test-" + uid)
        records.start()
        records.connection_opened("u", "c1", 1.0e9, "websocket", "127.0.0.1")
        records.connection_opened("u", "c1", 1.0e9, "websocket", "127.0.0.1")   # the same again: once
        records.subscribed("u", ["v1", "v2"])
        records.event("t6", "c1", "v1")
        records.connection_closed("c1", "client closed", 3, 100)
        await records.stop(10)
        got = await db.fetch(f"SELECT client_id, reason, transport FROM {schema}.client_connections")
        assert [tuple(r) for r in got] == [("c1", "client closed", "websocket")]
        assert await db.fetchval(f"SELECT count(*) FROM {schema}.user_subscriptions") == 2
        assert await db.fetchval(f"SELECT count(*) FROM {schema}.realtime_events WHERE event_type='t6'") == 1
        # a table that cannot be written (its column gone): the others still are
        await db.execute(f"ALTER TABLE {schema}.client_connections DROP COLUMN instance_id")
        records = Records(DSN + f"?search_path={schema}", "test-" + uid)
        records.start()
        records.connection_opened("u", "c2", 1.0e9)
        records.event("t6b", "c2", "v1")
        deadline = asyncio.get_running_loop().time() + 10
        while not await db.fetchval(f"SELECT count(*) FROM {schema}.realtime_events WHERE event_type='t6b'"):
            assert asyncio.get_running_loop().time() < deadline, "the events table waited for the other"
            await asyncio.sleep(0.1)
        assert records.pending == 1   # the connection's row, kept for when the table is fixed
        await records.stop(1)
    finally:
        await db.execute(f"DROP SCHEMA {schema} CASCADE")
