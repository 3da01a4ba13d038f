"""Security events and secrets (issue 13 parts 4 and 5, docs/security.md).

Every kind of security event, on every transport that can cause it, is a JSON
log line and a `realtime_events` row with user, address, transport and reason,
and is counted in /metrics; the log's rate limit holds lines back but never
their count. Then the whole run is audited: no token used against the server,
good or bad, appears in its log, in PostgreSQL or in Redis.

Real server processes, real PostgreSQL and Redis, real clients."""
import asyncio
import json
import time

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
import websockets
from grpc import aio
from websockets.exceptions import ConnectionClosed

from conftest import Server, free_port, ingest, metric_value, token, update
from test_grpc import pb  # noqa: F401  (the generated gRPC client, a fixture)
from test_records import DSN, db, rows_eventually  # noqa: F401  (db: a fixture)

pytestmark = pytest.mark.integration

ORIGIN = "https://dispatch.example"
USED: list[str] = []   # every token this module sent: the audit looks for each


def used(tok: str) -> str:
    USED.append(tok)
    return tok


@pytest.fixture(scope="module")
def sec(redis_url):
    gport = free_port()
    s = Server("--simulate", "0", "--tick-ms", "20", "--redis", redis_url, "--postgres", DSN,
               "--grpc-port", str(gport), "--allowed-origins", ORIGIN,
               "--max-connections-per-user", "2", "--max-messages-per-s", "5",
               "--max-message-bytes", "1024", "--token-expiry-warning-s", "1")
    s.grpc = f"127.0.0.1:{gport}"
    s.redis_url = redis_url
    yield s
    s.stop()


def lines(server, msg="security event"):
    out = []
    server.log.flush()
    for line in open(server.log.name).read().splitlines():
        if line.startswith("{") and f'"msg": "{msg}"' in line:
            out.append(json.loads(line))
    return out


def find_line(server, timeout=5.0, reason_part="", **want):
    deadline = time.monotonic() + timeout
    while True:
        for d in lines(server):
            if all(d.get(k) == v for k, v in want.items()) and reason_part in d.get("reason", ""):
                return d
        if time.monotonic() > deadline:
            raise AssertionError(f"no security line with {want}: {lines(server)[-5:]}")
        time.sleep(0.05)


async def find_row(db, user, kind, transport, reason_part=""):
    rows = await rows_eventually(
        db, "SELECT details, client_id FROM realtime_events WHERE event_type = 'security' "
            "AND details->>'user' = $1 AND details->>'kind' = $2 AND details->>'transport' = $3 "
            "AND strpos(details->>'reason', $4) > 0",
        user, kind, transport, reason_part, timeout=15)
    assert rows, f"no realtime_events row for {user} {kind} {transport}"
    return json.loads(rows[0]["details"]), rows[0]["client_id"]


async def expect(db, server, user, kind, transport, reason_part=""):
    """The line and the row of one event, with all their fields."""
    line = find_line(server, reason_part=reason_part, user=user, kind=kind, transport=transport)
    assert line["address"] == "127.0.0.1" and line["level"] == "warning"
    details, _ = await find_row(db, user, kind, transport, reason_part)
    assert details["address"] == "127.0.0.1"
    return line


async def closed_code(url, send=None, **kw):
    ws = await websockets.connect(url, **kw)
    try:
        if send is not None:
            await ws.send(send)
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


async def test_bad_expired_and_forbidden_tokens_on_every_transport(sec, db, uid, pb):
    realtime_pb2, realtime_pb2_grpc = pb
    u = uid + "tok"
    expired = used(token(sub=u, ttl=-60))
    nothing = used(token(sub=u + "none", permissions=[]))
    # bad tokens carry no user: each is found by its transport and reason
    assert await closed_code(f"{sec.ws_url}?token={used('forged.' + uid)}") == 4001
    assert await closed_code(sec.ws_url, json.dumps({"type": "auth", "token": expired})) == 4001
    assert await closed_code(f"{sec.ws_url}?token={nothing}") == 4003
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sec.url}/api/realtime/stream", params={"token": expired}) as r:
            assert r.status == 401
        async with http.get(f"{sec.url}/api/realtime/poll", params={"session": "s_x", "cursor": "0"},
                            headers={"Authorization": f"Bearer {used('forged2.' + uid)}"}) as r:
            assert r.status == 401
        async with http.post(f"{sec.url}/api/realtime/session", json={},
                             headers={"Authorization": f"Bearer {expired}"}) as r:
            assert r.status == 401
        viewer = used(token(sub=u, permissions=[], vehicles=["only_" + uid]))
        async with http.get(f"{sec.url}/api/vehicles/other_{uid}", headers={"Authorization": f"Bearer {viewer}"}) as r:
            assert r.status == 403
    status, _ = ingest(sec, [update("v_" + uid)], tok=viewer)    # no `ingest` permission
    assert status == 403
    async with aio.insecure_channel(sec.grpc) as ch:
        stub = realtime_pb2_grpc.RealtimeStub(ch)
        with pytest.raises(aio.AioRpcError) as e:
            async for _ in stub.Stream(realtime_pb2.StreamRequest(),
                                       metadata=(("authorization", f"Bearer {expired}"),)):
                pass
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED

    await expect(db, sec, u + "none", "forbidden", "websocket", "grants no vehicles")
    await expect(db, sec, u, "forbidden", "http", "vehicle outside the rights")
    await expect(db, sec, u, "forbidden", "http", "needs ingest")
    for transport in ("websocket", "sse", "http", "grpc"):
        line = find_line(sec, kind="expired_token", transport=transport)
        assert line["reason"] == "token expired" and line["address"] == "127.0.0.1"
    for transport in ("websocket", "long_poll"):
        line = find_line(sec, kind="bad_token", transport=transport)
        assert "invalid token" in line["reason"]
    rows = await rows_eventually(db, "SELECT details FROM realtime_events WHERE event_type = 'security' "
                                     "AND details->>'kind' = 'bad_token' AND details->>'transport' = 'long_poll'",
                                 timeout=15)
    assert rows and json.loads(rows[0]["details"])["address"] == "127.0.0.1"
    text = (await _metrics(sec))
    assert 'security_events_total{kind="expired_token",transport="grpc"}' in text


def test_log_lines_never_carry_credentials():
    """The last line of defence, on every log line (realtime/logs.py)."""
    from realtime.logs import JsonFormatter, redact
    tok = token()
    for line in (f"GET /ws?token={tok}&format=json HTTP/1.1", f"authorization: BEARER  {tok}",
                 f"b'GET /x?token={tok[:5]}\\x01{tok[5:]} HTTP/1.1'", f"Bearer opaque-{tok[-30:]}",
                 f"{{\"token\": \"{tok}\"}}"):
        out = redact(line)
        assert tok not in out and tok.split(".")[2] not in out and "<redacted>" in out, out
    assert redact("a vehicle named key.eyJ-not.a-token? no: 'they' and 'keys'") == \
        "a vehicle named key.eyJ-not.a-token? no: 'they' and 'keys'"
    import logging
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "token=%s", (tok,), None)
    assert tok not in JsonFormatter().format(record)


async def _metrics(server) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(server.url + "/metrics") as r:
            return await r.text()


async def test_origin_limits_and_forbidden_messages(sec, db, uid):
    u = uid + "lim"
    tok = used(token(sub=u))
    assert await closed_code(f"{sec.ws_url}?token={tok}", origin="https://evil.example") == 4003
    line = find_line(sec, kind="origin_refused", transport="websocket")
    assert line["reason"] == "origin https://evil.example"
    rows = await rows_eventually(db, "SELECT details FROM realtime_events WHERE event_type = 'security' "
                                     "AND details->>'kind' = 'origin_refused'", timeout=15)
    assert rows

    # connections per user (2 here), then messages per second (5), message size (1 KiB)
    a = await websockets.connect(f"{sec.ws_url}?token={tok}")
    b = await websockets.connect(f"{sec.ws_url}?token={tok}")
    for w in (a, b):
        assert json.loads(await w.recv())["type"] == "welcome"
    assert await closed_code(f"{sec.ws_url}?token={tok}") == 1008
    await expect(db, sec, u, "limit", "websocket", "connections")
    for i in range(12):
        await a.send(json.dumps({"type": "ping", "id": str(i)}))
    await expect(db, sec, u, "limit", "websocket", "messages per second")
    # a `get` of a vehicle outside the rights, on a connection of a restricted user
    narrow = used(token(sub=u + "n", permissions=[], vehicles=["mine_" + uid]))
    n = await websockets.connect(f"{sec.ws_url}?token={narrow}")
    assert json.loads(await n.recv())["type"] == "welcome"
    await n.send(json.dumps({"type": "get", "vehicle": "theirs_" + uid, "id": "g"}))
    while (m := json.loads(await asyncio.wait_for(n.recv(), 5))).get("id") != "g":
        pass
    assert m["type"] == "error" and m["code"] == "forbidden"
    line = await expect(db, sec, u + "n", "forbidden", "websocket", "theirs_" + uid)
    assert line["client"].startswith("c_")
    # a refresh with someone else's token, and with a bad one
    await n.send(json.dumps({"type": "refresh", "token": used(token(sub=u + "x")), "id": "r"}))
    await n.send(json.dumps({"type": "refresh", "token": used("forged3." + uid), "id": "r2"}))
    await expect(db, sec, u + "n", "forbidden", "websocket", "another user's token")
    await expect(db, sec, u + "n", "bad_token", "websocket", "refresh: invalid token")
    assert await closed_code(f"{sec.ws_url}?token={narrow}", "x" * 2000) == 1009
    await expect(db, sec, u + "n", "limit", "websocket", "message size")
    # a NUL in a name the client chose: the event's row and the subscription's
    # have it replaced (PostgreSQL takes no NUL in text or jsonb)
    await n.send(json.dumps({"type": "get", "vehicle": "nul\u0000" + uid, "id": "g2"}))
    await expect(db, sec, u + "n", "forbidden", "websocket", "nul?" + uid)
    await n.send(json.dumps({"type": "subscribe", "id": "s", "subscriptions": {"vehicles": ["nul\u0000" + uid]}}))
    rows = await rows_eventually(db, "SELECT vehicle_id FROM user_subscriptions WHERE user_id = $1", u + "n",
                                 timeout=15)
    assert [r["vehicle_id"] for r in rows] == ["nul\ufffd" + uid]
    for w in (a, b, n):
        await w.close()
    # an oversized first `auth` message is a limit, and a refused CORS preflight an origin event
    assert await closed_code(sec.ws_url, json.dumps({"type": "auth", "token": "x" * 2000})) in (1009, 4001)
    find_line(sec, kind="limit", transport="websocket", reason_part="auth message is over the size limit")
    async with aiohttp.ClientSession() as http:
        async with http.options(f"{sec.url}/api/realtime/poll", headers={
                "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}) as r:
            assert r.status == 403
        async with http.post(f"{sec.url}/api/realtime/session", data=b"{" + b" " * 2000 + b"}",
                             headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}) as r:
            assert r.status == 413
    line = find_line(sec, kind="origin_refused", transport="long_poll")
    assert line["reason"] == "preflight from origin https://evil.example"
    await expect(db, sec, u, "limit", "http", "request body size")


async def test_a_ping_before_auth_is_answered_and_auth_still_counts(sec, uid):
    ws = await websockets.connect(sec.ws_url)
    try:
        pong = await ws.ping(b"before-auth")
        await asyncio.wait_for(pong, 5)
        await ws.send(json.dumps({"type": "auth", "token": used(token(sub=uid + "ping"))}))
        assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "welcome"
    finally:
        await ws.close()


async def test_an_unrefreshed_token_closing_and_an_acl_applied(sec, db, uid):
    u = uid + "acl"
    short = used(token(sub=u + "short", ttl=2))
    assert await closed_code(f"{sec.ws_url}?token={short}") == 4001
    await expect(db, sec, u + "short", "expired_token", "websocket", "closed at exp")

    tok = used(token(sub=u))
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{sec.url}/api/realtime/session", json={},
                             headers={"Authorization": f"Bearer {tok}"}) as r:
            assert r.status == 201
            sid = (await r.json())["session"]
        ws = await websockets.connect(f"{sec.ws_url}?token={tok}")
        assert json.loads(await ws.recv())["type"] == "welcome"
        r = aioredis.from_url(sec.redis_url)
        try:
            await r.hset(f"acl:user:{u}", mapping={"permissions": "[]", "vehicles": json.dumps(["v1_" + uid])})
            await r.publish("acl:updates", u)
            line = await expect(db, sec, u, "acl_applied", "websocket", "view_all_vehicles revoked")
            assert "vehicles 0 -> 1" in line["reason"]
            await expect(db, sec, u, "acl_applied", "long_poll", "view_all_vehicles revoked")
        finally:
            await r.delete(f"acl:user:{u}")
            await r.aclose()
        await ws.close()
        async with http.delete(f"{sec.url}/api/realtime/session/{sid}",
                               headers={"Authorization": f"Bearer {tok}"}) as resp:
            assert resp.status == 204


async def test_a_flood_is_rate_limited_in_the_log_but_fully_counted(db, uid):
    s = Server("--simulate", "0", "--postgres", DSN, "--trusted-proxies", "127.0.0.1")
    try:
        n = 120
        async with aiohttp.ClientSession() as http:
            async def bad(i, address="198.51.100.7"):
                async with http.get(f"{s.url}/api/realtime/stream", headers={"X-Forwarded-For": address},
                                    params={"token": used(f"flood{i}.{uid}")}) as r:
                    assert r.status == 401
            await asyncio.gather(*(bad(i) for i in range(n)))
            # one address's flood does not hide another's event of the same kind
            await bad(n, "203.0.113.50")
        assert metric_value(s, "security_events_total") == n + 1
        shown = [d for d in lines(s) if d.get("kind") == "bad_token"]
        assert len(shown) <= 15, "the log is rate-limited"
        assert [d["address"] for d in shown].count("203.0.113.50") == 1
        # within the summary period the rest comes out as a count
        deadline = time.monotonic() + 20
        while True:
            summaries = [d for d in lines(s, "security events suppressed") if d.get("kind") == "bad_token"]
            told = len(shown) + sum(d["suppressed"] for d in summaries)
            if told == n + 1 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert told == n + 1, (len(shown), summaries)
        assert summaries[0]["addresses"] == {"198.51.100.7": summaries[0]["suppressed"]}
        rows = await rows_eventually(db, "SELECT details FROM realtime_events WHERE event_type = 'security' "
                                         "AND details ? 'suppressed' AND created_at > now() - interval '1 minute'",
                                     timeout=15)
        assert any(json.loads(r["details"])["kind"] == "bad_token" for r in rows)
    finally:
        s.stop()


async def test_no_token_is_ever_logged_or_stored(sec, db, uid, pb):
    """Runs last in this module: every token used above, plus the usual ways in
    with good ones (query, header, first message, refresh, gRPC metadata),
    then the log, every PostgreSQL table and the test's Redis database are
    searched for each token and for its signature alone."""
    realtime_pb2, realtime_pb2_grpc = pb
    u = uid + "audit"
    q, h, m, f = (used(token(sub=u, ttl=3600 + i)) for i in range(4))
    ws = await websockets.connect(f"{sec.ws_url}?token={q}&resume=s_unknown&last_event=1-0")
    assert json.loads(await ws.recv())["type"] == "welcome"
    await ws.send(json.dumps({"type": "refresh", "token": f, "id": "r"}))
    await ws.send(json.dumps({"type": "subscribe", "id": "s", "subscriptions": {"vehicles": ["a_" + uid]}}))
    await asyncio.sleep(0.3)
    await ws.close()
    ws = await websockets.connect(sec.ws_url)
    await ws.send(json.dumps({"type": "auth", "token": m}))
    assert json.loads(await ws.recv())["type"] == "welcome"
    await ws.close()
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sec.url}/api/realtime/stream", headers={"Authorization": f"Bearer {h}"}) as r:
            assert r.status == 200
            await r.content.readline()
        async with http.post(f"{sec.url}/api/realtime/session", json={},
                             headers={"Authorization": f"Bearer {h}"}) as r:
            sid = (await r.json())["session"]
        async with http.get(f"{sec.url}/api/realtime/poll", params={"session": sid, "cursor": "0", "timeout": "0",
                                                                     "token": q}) as r:
            assert r.status == 200
    assert ingest(sec, [update("audit_" + uid)], tok=used(token("feeder" + uid, ["ingest"])))[0] == 200
    async with aio.insecure_channel(sec.grpc) as ch:
        stub = realtime_pb2_grpc.RealtimeStub(ch)
        g = used(token(sub=u + "g"))   # its own user: the per-user limit here is 2
        call = stub.Stream(realtime_pb2.StreamRequest(), metadata=(("authorization", f"Bearer {g}"),))
        async for batch in call:
            assert batch.welcome.session
            break
        call.cancel()
    # requests aiohttp cannot parse: it logs them, quoting the bad line
    import socket
    bad_line = used(token(sub=u + "raw"))
    for raw in (b"GET /api/realtime/stream?token=" + bad_line.encode() + b" HTTP/1.1\x01\r\nHost: x\r\n\r\n",
                b"GET /api/realtime/stream HTTP/1.1\r\nHost: x\r\nAuthorization : Bearer " + bad_line.encode()
                + b"\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", sec.port), timeout=5) as c:
            c.sendall(raw)
            assert c.recv(100).startswith(b"HTTP/1.")
    await rows_eventually(db, "SELECT 1 FROM client_connections WHERE user_id = $1", u, n=4, timeout=15)
    await rows_eventually(db, "SELECT 1 FROM client_connections WHERE user_id = $1", u + "g", timeout=15)
    await asyncio.sleep(1.0)   # the records' batches of what just closed

    secrets = set()
    for t in USED:
        secrets.add(t)
        parts = t.split(".")
        if len(parts) == 3 and len(parts[2]) >= 16:
            secrets.add(parts[2])    # a signature alone is as good as a leak
    assert len(USED) >= 7

    sec.log.flush()
    log_text = open(sec.log.name).read()
    found = [t[:20] for t in secrets if t in log_text]
    assert not found, f"tokens in the server's log: {found}"
    assert '"msg": "bad HTTP request"' in log_text, "the unparsable requests were logged, without their bytes"

    tables = [r["tablename"] for r in await db.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
    assert {"client_connections", "realtime_events", "user_subscriptions"} <= set(tables)
    for table in tables:
        text = "\n".join(str(tuple(r)) for r in await db.fetch(f'SELECT * FROM "{table}"'))
        found = [t[:20] for t in secrets if t in text]
        assert not found, f"tokens in PostgreSQL table {table}: {found}"

    r = aioredis.from_url(sec.redis_url)   # bytes: some values are msgpack (the change feed)
    try:
        blobs: list[bytes] = []
        async for key in r.scan_iter(count=1000):
            kind = (await r.type(key)).decode()
            if kind == "string":
                blobs.append(await r.get(key) or b"")
            elif kind == "hash":
                blobs += [k + b"=" + v for k, v in (await r.hgetall(key)).items()]
            elif kind == "set":
                blobs += list(await r.smembers(key))
            elif kind == "zset":
                blobs += list(await r.zrange(key, 0, -1))
            elif kind == "list":
                blobs += list(await r.lrange(key, 0, -1))
            elif kind == "stream":
                for _, fields in await r.xrange(key, count=100000):
                    blobs += [k + b"=" + v for k, v in fields.items()]
            blobs.append(key)
        text = b"\n".join(blobs)
        assert b"session" in text
        found = [t[:20] for t in secrets if t.encode() in text]
        assert not found, f"tokens in Redis: {found}"
    finally:
        await r.aclose()
