"""Integration: real server process, real WebSocket clients (PROTOCOL §2, §3)."""
import asyncio
import json
import time

import msgpack
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import Client, Server, ingest, metric_value, token, update

pytestmark = pytest.mark.integration


async def closed_with(client: Client, timeout=5.0) -> int:
    try:
        while True:
            await client.recv(timeout)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


# ---------------------------------------------------------------- auth
async def test_auth_by_query_header_and_first_message(server):
    c = await Client.connect(server, token())
    w = await c.recv()
    assert w["type"] == "welcome" and w["resumed"] is False and w["heartbeat_s"] == 30
    assert w["client"] and w["session"]
    await c.close()
    ws = await websockets.connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token()}"})
    assert json.loads(await ws.recv())["type"] == "welcome"
    await ws.close()
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps({"type": "auth", "token": token()}))
    assert json.loads(await ws.recv())["type"] == "welcome"
    await ws.close()


@pytest.mark.parametrize("bad", [
    "not-a-jwt",
    token(ttl=-10),                          # expired
    token(secret="another-secret-of-32-bytes-or-more!"),          # wrong signature
])
async def test_bad_token_closes_4001(server, bad):
    c = await Client.connect(server, bad)
    assert await closed_with(c) == 4001


async def test_no_token_within_timeout_closes_4001(server):
    ws = await websockets.connect(server.ws_url)
    with pytest.raises(ConnectionClosed) as e:
        await asyncio.wait_for(ws.recv(), 5)
    assert e.value.rcvd.code == 4001


async def test_token_without_any_rights_closes_4003(server):
    c = await Client.connect(server, token(permissions=[]))
    assert await closed_with(c) == 4003


# ---------------------------------------------------------------- subscriptions
async def test_subscribe_by_vehicles_then_pos_delta_leave_and_silence(server, uid):
    a, b = uid + "a", uid + "b"
    t0 = int(time.time() * 1000)
    ingest(server, [update(a, 55.70, 37.50, t0, speed=10, course=90, status="moving", vehicle_type="truck"),
                    update(b, 55.71, 37.51, t0, status="idle")])
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    sub, msgs = await c.subscribe(id="s1", subscriptions={"vehicles": [a]})
    assert sub == {"type": "subscribed", "id": "s1", "visible": 1}
    assert msgs == [{"t": "full", "v": a, "p": [55.7, 37.5], "s": 10, "c": 90, "st": "moving",
                     "vt": "truck", "ts": t0, "al": []}]
    # the same state again, and a newer timestamp alone: nothing
    ingest(server, [update(a, 55.70, 37.50, t0), update(a, 55.70, 37.50, t0 + 1)])
    assert await c.messages(0.4) == []
    # position and speed: pos
    ingest(server, [update(a, 55.701, 37.502, t0 + 2, speed=20)])
    assert await c.messages(0.4) == [{"t": "pos", "v": a, "p": [55.701, 37.502], "s": 20, "c": 90,
                                      "ts": t0 + 2}]
    # status: delta with the changed keys only
    ingest(server, [update(a, 55.701, 37.502, t0 + 3, status="stopped")])
    assert await c.messages(0.4) == [{"t": "delta", "v": a, "ch": {"st": "stopped"}, "ts": t0 + 3}]
    # an older update is ignored
    ingest(server, [update(a, 10, 10, t0 - 1000)])
    assert await c.messages(0.4) == []
    # b is not subscribed
    ingest(server, [update(b, 55.9, 37.9, t0 + 5)])
    assert await c.messages(0.3) == []
    # a second subscribe: `full` for every visible vehicle, not only the one that came in
    sub, msgs = await c.subscribe(id="s2", subscriptions={"vehicles": [a, b]})
    assert sub == {"type": "subscribed", "id": "s2", "visible": 2}
    assert sorted((m["t"], m["v"]) for m in msgs) == [("full", a), ("full", b)]
    # and a narrower one: `full` for a, `leave` for b
    sub, msgs = await c.subscribe(subscriptions={"vehicles": [a]})
    assert sub["visible"] == 1
    assert sorted((m["t"], m["v"], m.get("r", "")) for m in msgs) == [("full", a, ""), ("leave", b, "subscription")]
    # unsubscribe: leave for everything
    await c.send({"type": "unsubscribe", "id": 7})
    assert await c.recv_type("unsubscribed") == {"type": "unsubscribed", "id": 7}
    assert (await c.recv_type("batch"))["messages"] == [{"t": "leave", "v": a, "r": "subscription"}]
    await c.close()


async def test_subscribe_by_groups_and_filters(server, uid):
    g = uid + "fleet"
    ingest(server, [update(uid + "1", status="moving", vehicle_type="truck", groups=[g]),
                    update(uid + "2", status="idle", vehicle_type="truck", groups=[g]),
                    update(uid + "3", status="moving", vehicle_type="van", groups=[g]),
                    update(uid + "4", status="moving", vehicle_type="truck")])
    c = await Client.connect(server, token())
    sub, msgs = await c.subscribe(subscriptions={"groups": [g]},
                                  filters={"status": ["moving"], "vehicle_types": ["truck"]})
    assert sub["visible"] == 1 and [m["v"] for m in msgs] == [uid + "1"]
    # 1 stops: it leaves by filter; 3 turns into a truck: it comes in
    ingest(server, [update(uid + "1", status="stopped"), update(uid + "3", vehicle_type="truck")])
    got = await c.wait_messages(lambda m: m["t"] == "full")
    got += await c.messages(0.2)
    assert {"t": "leave", "v": uid + "1", "r": "filter"} in got
    assert any(m["t"] == "full" and m["v"] == uid + "3" for m in got)
    # 4 joins the group (a group named in an update is added)
    ingest(server, [update(uid + "4", groups=[g])])
    got = await c.wait_messages(lambda m: m.get("v") == uid + "4")
    assert got[-1]["t"] == "full"
    await c.close()


async def test_viewport_subscription_and_diff(server, uid):
    # a corner of the world no other test uses
    ingest(server, [update(uid + "w", -40.0, 100.0, status="moving"),
                    update(uid + "m", -40.0, 101.0, status="moving"),
                    update(uid + "e", -40.0, 102.0, status="moving")])
    c = await Client.connect(server, token())
    bounds = {"north": -39.5, "south": -40.5, "west": 99.5, "east": 101.5}
    sub, msgs = await c.subscribe(subscriptions={"geographic": {"bounds": bounds, "zoom": 13}})
    assert sub["visible"] == 2 and sorted(m["v"] for m in msgs) == [uid + "m", uid + "w"]
    await c.send({"type": "viewport", "id": "vp", "bounds": {"north": -39.5, "south": -40.5,
                                                             "west": 100.5, "east": 102.5}, "zoom": 13})
    b = await c.recv_type("batch")
    assert b["id"] == "vp"
    assert sorted((m["t"], m["v"]) for m in b["messages"]) == [("full", uid + "e"), ("leave", uid + "w")]
    assert [m["r"] for m in b["messages"] if m["t"] == "leave"] == ["viewport"]
    # a vehicle drives out of the viewport
    ingest(server, [update(uid + "m", -40.0, 99.0)])
    got = await c.wait_messages(lambda m: m.get("v") == uid + "m")
    assert got[-1] == {"t": "leave", "v": uid + "m", "r": "viewport"}
    await c.close()


async def test_zoomed_out_viewport_gets_clusters_then_vehicles_again(server, uid):
    ingest(server, [update(uid + str(i), -60.0 + i * 0.001, -120.0, status="moving") for i in range(5)]
           + [update(uid + "far", -61.5, -121.5, status="moving")])
    c = await Client.connect(server, token())
    bounds = {"north": -59, "south": -62, "west": -122, "east": -119}
    sub, msgs = await c.subscribe(subscriptions={"geographic": {"bounds": bounds, "zoom": 6}})
    assert sub["visible"] == 6
    assert len(msgs) == 1 and msgs[0]["t"] == "clusters" and msgs[0]["z"] == 6
    cells = msgs[0]["cells"]
    assert sorted(cell[2] for cell in cells) == [1, 5]
    big = next(cell for cell in cells if cell[2] == 5)
    assert abs(big[0] - -59.998) < 1e-6 and big[1] == -120.0
    assert big[3] == [5, 0, 0, 0]   # the status breakdown: moving, idle, stopped, offline
    # while clustered, individual updates are folded into the next clusters message
    ingest(server, [update(uid + "far", -60.0, -120.0)])
    got = await c.wait_messages(lambda m: m["t"] == "clusters", timeout=3)
    assert {m["t"] for m in got} == {"clusters"} and [cell[2] for cell in got[-1]["cells"]] == [6]
    # zooming in: an empty `clusters` (drop the cells), then the vehicles, one `full` each
    await c.send({"type": "viewport", "bounds": bounds, "zoom": 14})
    b = await c.recv_type("batch")
    assert b["messages"][0] == {"t": "clusters", "z": 14, "cells": []}
    assert sorted(m["t"] for m in b["messages"][1:]) == ["full"] * 6
    # zoomed out again, then in over an empty area: the empty `clusters` alone
    await c.send({"type": "viewport", "bounds": bounds, "zoom": 6})
    await c.wait_messages(lambda m: m["t"] == "clusters" and m["cells"], timeout=3)
    empty = {"north": 10, "south": 9, "west": 9, "east": 10}
    await c.send({"type": "viewport", "bounds": empty, "zoom": 14})
    got = await c.wait_messages(lambda m: m["t"] == "clusters" and m["cells"] == [], timeout=3)
    assert got[-1] == {"t": "clusters", "z": 14, "cells": []}
    await c.close()


async def test_leaving_clusters_in_msgpack_keeps_the_batch_whole(server, uid):
    """The empty `clusters` is put in front of the encoded msgpack body: the
    array header must count it (fixarray, and array16 past 15 messages)."""
    vids = [uid + str(i) for i in range(20)]
    ingest(server, [update(v, -50.0 + i * 0.001, -110.0, status="moving") for i, v in enumerate(vids)])
    c = await Client.connect(server, token(), "format=msgpack")
    bounds = {"north": -49, "south": -51, "west": -111, "east": -109}
    sub, msgs = await c.subscribe(subscriptions={"geographic": {"bounds": bounds, "zoom": 6}})
    assert msgs[0]["t"] == "clusters"
    await c.send({"type": "viewport", "bounds": bounds, "zoom": 14})
    b = await c.recv_type("batch")
    assert b["messages"][0]["t"] == "clusters" and b["messages"][0]["cells"] == []
    assert sorted(m["v"] for m in b["messages"][1:]) == sorted(vids)
    await c.close()


async def test_permission_isolation_and_phone_redaction(server, uid):
    mine, other = uid + "mine", uid + "other"
    driver = {"name": "Иванов И.И.", "phone": "+79161234567"}
    ingest(server, [update(mine, driver=driver, groups=[uid + "g"]), update(other, driver=driver)])
    limited = await Client.connect(server, token(sub="lim", permissions=[], groups=[uid + "g"]))
    boss = await Client.connect(server, token(sub="boss", permissions=["view_all_vehicles",
                                                                         "view_driver_contacts"]))
    sub, msgs = await limited.subscribe(subscriptions={"vehicles": [mine, other]})
    assert sub["visible"] == 1 and [m["v"] for m in msgs] == [mine]
    assert msgs[0]["dr"] == {"name": "Иванов И.И."}
    _, msgs = await boss.subscribe(subscriptions={"vehicles": [mine, other]})
    assert sorted(m["v"] for m in msgs) == [mine, other]
    assert all(m["dr"]["phone"] == "+79161234567" for m in msgs)
    # `get` and the HTTP long form honour the same rights
    await limited.send({"type": "get", "vehicle": other, "id": 1})
    assert (await limited.recv_type("error"))["code"] == "forbidden"
    await limited.send({"type": "get", "vehicle": mine, "id": 2})
    lf = await limited.recv_type("vehicle_update")
    assert lf["vehicle_id"] == mine and lf["driver"] == {"name": "Иванов И.И."} and lf["id"] == 2
    # a phone change reaches only the client that may see phones
    ingest(server, [update(mine, driver={"name": "Иванов И.И.", "phone": "+70000000000"})])
    got = await boss.wait_messages(lambda m: m.get("v") == mine)
    assert got[-1]["ch"]["dr"]["phone"] == "+70000000000"
    assert await limited.messages(0.4) == []
    await limited.close()
    await boss.close()


async def test_msgpack_frames(server, uid):
    vid = uid + "mp"
    ingest(server, [update(vid, 55.1, 37.1, speed=5.5, status="moving", alerts=["overspeed:65/60 км/ч"])])
    for query, sub in (("format=msgpack", None), ("", ["realtime.v1.msgpack"])):
        c = await Client.connect(server, token(), query, subprotocols=sub)
        raw = await c.ws.recv()
        assert isinstance(raw, bytes) and msgpack.unpackb(raw)["type"] == "welcome"
        # msgpack in, too
        await c.send({"type": "subscribe", "subscriptions": {"vehicles": [vid]}}, binary=True)
        assert (await c.recv_type("subscribed"))["visible"] == 1
        raw = await c.ws.recv()
        batch = msgpack.unpackb(raw)
        assert batch["type"] == "batch" and batch["seq"] == 1
        assert batch["messages"][0]["al"] == ["overspeed:65/60 км/ч"]
        assert batch["messages"][0]["p"] == [55.1, 37.1]
        await c.close()


async def test_events_reach_clients_with_alerts_first(server, uid):
    vid = uid + "ev"
    ingest(server, [update(vid, status="moving")])
    c = await Client.connect(server, token())
    await c.subscribe(subscriptions={"vehicles": [vid]})
    ingest(server, [update(vid, 55.76, status="moving", alerts=["overspeed:90/60"])])
    got = await c.wait_messages(lambda m: m["t"] == "delta")
    assert [m["t"] for m in got] == ["event", "delta"]
    assert got[0]["e"] == "alert" and got[0]["d"] == {"alert": "overspeed:90/60"} and got[0]["eid"]
    await c.close()


async def test_seq_grows_by_one_per_batch(server, uid):
    vid = uid + "seq"
    ingest(server, [update(vid)])
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    await c.send({"type": "subscribe", "subscriptions": {"vehicles": [vid]}})
    seqs = []
    for i in range(4):
        ingest(server, [update(vid, 55 + i / 100)])
        seqs.append((await c.recv_type("batch"))["seq"])
    assert seqs == list(range(1, len(seqs) + 1))
    await c.close()


# ---------------------------------------------------------------- requests
async def test_ping_get_refresh(server, uid):
    c = await Client.connect(server, token(sub="u9"))
    await c.send({"type": "ping", "id": "p"})
    pong = await c.recv_type("pong")
    assert pong["id"] == "p" and abs(pong["ts"] - time.time() * 1000) < 5000
    await c.send({"type": "get", "vehicle": uid + "nothing", "id": 3})
    e = await c.recv_type("error")
    assert e["code"] == "bad_request" and e["id"] == 3
    new = token(sub="u9", ttl=7200)
    await c.send({"type": "refresh", "token": new, "id": "r"})
    r = await c.recv_type("refreshed")
    assert r["id"] == "r" and r["exp"] > time.time() + 7000
    await c.send({"type": "refresh", "token": token(sub="someone-else")})
    assert (await c.recv_type("error"))["code"] == "forbidden"
    await c.send({"type": "refresh", "token": "garbage"})
    assert (await c.recv_type("error"))["code"] == "unauthorized"
    await c.close()


async def test_token_expiring_then_close_4001(server):
    c = await Client.connect(server, token(ttl=2))
    m = await c.recv_type("token_expiring", timeout=5)
    assert 0 <= m["in_s"] <= 2
    assert await closed_with(c, 5) == 4001


async def test_refresh_keeps_connection_past_first_exp(server):
    c = await Client.connect(server, token(sub="r1", ttl=2))
    await c.recv_type("token_expiring", timeout=5)
    await c.send({"type": "refresh", "token": token(sub="r1", ttl=600)})
    await c.recv_type("refreshed")
    await asyncio.sleep(2.5)
    await c.send({"type": "ping"})
    assert (await c.recv_type("pong"))["type"] == "pong"
    await c.close()


# ---------------------------------------------------------------- bad input (§3.3)
@pytest.mark.parametrize("payload,code", [
    ("{not json", "bad_request"),
    ("[1,2,3]", "bad_request"),
    ('{"no_type": 1}', "bad_request"),
    ('{"type": "teleport"}', "unknown_type"),
    ('{"type": "subscribe", "subscriptions": {"vehicles": "truck_1"}}', "bad_request"),
    ('{"type": "subscribe", "filters": {"status": ["flying"]}}', "bad_request"),
    ('{"type": "viewport", "bounds": {"north": 95, "south": 0, "east": 1, "west": 0}}', "bad_request"),
    ('{"type": "viewport", "bounds": {"north": 0, "south": 10, "east": 1, "west": 0}}', "bad_request"),
    ('{"type": "get"}', "bad_request"),
])
async def test_bad_messages_get_an_error_and_the_connection_stays(server, payload, code):
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    await c.ws.send(payload)
    e = await c.recv_type("error")
    assert e["code"] == code and e["message"]
    await c.send({"type": "ping", "id": 1})
    assert (await c.recv_type("pong"))["id"] == 1
    await c.close()


async def test_invalid_msgpack_is_bad_request(server):
    c = await Client.connect(server, token(), "format=msgpack")
    await c.recv_type("welcome")
    await c.ws.send(b"\xc1\xc1\xc1")
    assert (await c.recv_type("error"))["code"] == "bad_request"
    await c.close()


@pytest.mark.parametrize("compression", ["deflate", None])
async def test_message_over_64k_closes_1009(server, compression):
    """§3.3: at most 64 KiB: exactly that is taken, one byte more closes 1009,
    in plain frames and in compressed ones (permessage-deflate)."""
    def of_size(n, rid):
        msg = json.dumps({"type": "ping", "id": rid, "pad": ""})
        return msg.replace('"pad": ""', '"pad": "' + "x" * (n - len(msg)) + '"')
    c = await Client.connect(server, token(), compression=compression)
    await c.recv_type("welcome")
    msg = of_size(64 * 1024, "edge")
    assert len(msg.encode()) == 64 * 1024
    await c.ws.send(msg)
    assert (await c.recv_type("pong"))["id"] == "edge"
    await c.ws.send(of_size(64 * 1024 + 1, "over"))
    assert await closed_with(c) == 1009


async def test_any_string_or_number_id_is_echoed_and_another_is_refused_alone(server):
    """§3: any request may carry `id`, echoed in its reply: a string, an
    integer, a fraction. One that cannot be echoed in both formats (true, a
    list, an integer past 64 bits) is `bad_request` without it, and the
    connection goes on, in msgpack too."""
    for query, binary in (("", False), ("format=msgpack", True)):
        c = await Client.connect(server, token(), query)
        await c.recv_type("welcome")
        for rid in ("a", 7, 1.5, -3, 2 ** 63 - 1):
            await c.send({"type": "ping", "id": rid}, binary)
            assert (await c.recv_type("pong"))["id"] == rid
        for bad in ('{"type":"ping","id":true}', '{"type":"ping","id":[1]}', json.dumps({"type": "ping", "id": "x" * 257}),
                    '{"type":"ping","id":123456789012345678901234567890}'):
            await c.ws.send(bad)   # a text frame is JSON whatever the output format
            e = await c.recv_type("error")
            assert e["code"] == "bad_request" and "id" not in e and "`id`" in e["message"]
        await c.send({"type": "ping", "id": "still"}, binary)
        assert (await c.recv_type("pong"))["id"] == "still"
        await c.close()


async def test_rate_limit_errors_then_closes_1008(server):
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    for i in range(150):
        await c.send({"type": "ping", "id": i})
    got = []
    try:
        while True:
            got.append(await c.recv(2))
    except asyncio.TimeoutError:
        pass
    limited = [m for m in got if m.get("code") == "rate_limited"]
    assert limited and all(isinstance(m.get("id"), int) for m in limited)   # the refused request's id
    assert sum(1 for m in got if m["type"] == "pong") >= 100
    # keep flooding: the server gives up on the client
    try:
        for _ in range(2000):
            await c.send({"type": "ping"})
            await asyncio.sleep(0)
    except ConnectionClosed:
        pass
    await closed_with(c)
    assert c.ws.close_code == 1008


async def test_subscription_size_limit(server):
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    names = [f"v{i}" for i in range(30)]  # the test server allows 50
    await c.send({"type": "subscribe", "subscriptions": {"vehicles": names, "groups": names}})
    e = await c.recv_type("error")
    assert e["code"] == "bad_request" and "at most" in e["message"]
    await c.close()


async def test_sigterm_sends_reconnect_then_closes_1001_and_exits_0(uid):
    import signal as _signal

    from conftest import Server
    s = Server("--simulate", "0", "--shutdown-grace", "4")
    try:
        clients = []
        for _ in range(3):
            c = await Client.connect(s, token())
            await c.recv_type("welcome")
            clients.append(c)
        t0 = time.monotonic()
        s.proc.send_signal(_signal.SIGTERM)
        delays = []
        for c in clients:
            m = await c.recv_type("reconnect", timeout=5)
            assert m["reason"] == "shutdown" and m["after_ms"] > 0
            delays.append(m["after_ms"])
            assert await closed_with(c, 5) == 1001
        assert len(set(delays)) > 1  # jittered, so that they do not all return at once
        assert s.proc.wait(10) == 0
        assert time.monotonic() - t0 < 4 + 3   # the grace period, and room for a busy test machine
        # no new connections are accepted once shutdown began
        with pytest.raises(OSError):
            await websockets.connect(s.ws_url + "?token=" + token(), open_timeout=2)
    finally:
        s.stop()


async def test_nearby_zoomed_out_views_share_one_computed_view(uid):
    """Issue 14 part 1: clustered clients whose viewports snap to the same
    cells (and who have the same rights and filters) get the same `clusters`
    message, computed and encoded once per refresh; cells carry their status
    breakdown."""
    s = Server("--simulate", "0", "--tick-ms", "20")
    try:
        ingest(s, [update(f"{uid}m{i}", 40.0 + i * 0.01, 10.0, status="moving") for i in range(4)]
               + [update(f"{uid}s{i}", 40.02, 10.0 + i * 0.01, status="stopped") for i in range(2)]
               + [update(uid + "o", 40.5, 10.5, status="offline")])
        views = [{"north": 41.0, "south": 39.5, "west": 9.5, "east": 11.0},
                 {"north": 41.1, "south": 39.6, "west": 9.6, "east": 11.1}]   # a little panned
        clients, firsts = [], []
        for bounds in views:
            c = await Client.connect(s, token())
            await c.recv_type("welcome")
            _, msgs = await c.subscribe(subscriptions={"geographic": {"bounds": bounds, "zoom": 5}})
            clients.append(c)
            firsts.append(msgs)
        assert firsts[0] == firsts[1] and firsts[0][0]["t"] == "clusters"
        cells = firsts[0][0]["cells"]
        assert sum(cell[2] for cell in cells) == 7
        assert [sum(cell[3][k] for cell in cells) for k in range(4)] == [4, 0, 2, 1]
        refreshes, views_before = metric_value(s, "cluster_refreshes_total"), metric_value(s, "cluster_views_total")
        ingest(s, [update(f"{uid}m0", 40.3, 10.2, status="idle")])
        got = [await c.wait_messages(lambda m: m["t"] == "clusters", timeout=3) for c in clients]
        assert got[0][-1] == got[1][-1]
        assert [sum(cell[3][k] for cell in got[0][-1]["cells"]) for k in range(4)] == [3, 1, 2, 1]
        refreshes = metric_value(s, "cluster_refreshes_total") - refreshes
        views = metric_value(s, "cluster_views_total") - views_before
        assert refreshes >= 1 and views <= refreshes, "one view per refresh for both clients"
        for c in clients:
            await c.close()
    finally:
        s.stop()


async def _frames(c, seconds: float) -> list:
    """The batch frames that arrive within `seconds`."""
    out = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            m = await c.recv(left)
        except asyncio.TimeoutError:
            break
        if m.get("type") == "batch":
            out.append(m)
    return out


@pytest.mark.parametrize("fmt", ["json", "msgpack"])
async def test_a_clustered_client_gets_its_event_and_its_new_cells_in_one_frame(uid, fmt):
    """Issue 14 part 1: at most one frame per client per tick. The clusters
    refresh rides in the tick's frame: a clustered client whose tick carries
    an event gets the event, then its new cells, in one batch (the arrays
    joined, in both formats); a clustered client whose cells change with no
    event gets them alone. In process, so that the update, the event and
    the tick happen together."""
    import types as _types

    from conftest import in_process
    from realtime.ingest.decode import validate
    from realtime.stores.base import Event
    app, runner, port = await in_process(tick_ms=20)
    hub = app["hub"]
    srv = _types.SimpleNamespace(ws_url=f"ws://127.0.0.1:{port}/ws")
    try:
        vids = [f"{uid}{i}" for i in range(20)]   # 20: msgpack's array16 once joined
        hub.apply_updates([validate(update(v, 40.0 + i * 0.001, 10.0, status="moving"))
                           for i, v in enumerate(vids)])
        query = "format=msgpack" if fmt == "msgpack" else ""
        views = [{"north": 41.0, "south": 39.5, "west": 9.5, "east": 11.0},   # every vehicle
                 {"north": 51.0, "south": 49.0, "west": 29.0, "east": 31.0}]  # none, until one comes
        clients = [await Client.connect(srv, token(), query) for _ in views]
        for c, bounds in zip(clients, views):
            await c.recv_type("welcome")
            _, msgs = await c.subscribe(subscriptions={"geographic": {"bounds": bounds, "zoom": 5}})
            assert msgs[0]["t"] == "clusters"
        hub.flush(rebuild=True, clusters=True)   # a refresh: the cells are current
        for c in clients:
            await _frames(c, 0.3)
        # one vehicle drives into the second view; an event for another; one tick with the refresh
        now = int(time.time() * 1000)
        hub.apply_updates([validate(update(vids[0], 50.0, 30.0, status="stopped"))])
        hub.deliver_event(Event(f"{now}-0-local", vids[1], "note", {"x": 1}, now, False))
        hub.flush(rebuild=True, clusters=True)
        whole, part = [await _frames(c, 0.5) for c in clients]
        assert len(whole) == 1 and [m["t"] for m in whole[0]["messages"]] == ["event", "clusters"]
        assert whole[0]["messages"][0]["v"] == vids[1]
        assert sum(cell[2] for cell in whole[0]["messages"][1]["cells"]) == 19
        assert len(part) == 1 and [m["t"] for m in part[0]["messages"]] == ["clusters"]
        assert sum(cell[2] for cell in part[0]["messages"][0]["cells"]) == 1
        for c in clients:
            await c.close()
    finally:
        await runner.cleanup()


async def test_a_clusters_refresh_that_fails_costs_the_tick_nothing(uid, monkeypatch):
    """The refresh runs inside the tick, after the core gave the tick's
    messages out: a bug in it must not take the events with it."""
    import types as _types

    from conftest import in_process
    from realtime.ingest.decode import validate
    from realtime.stores.base import Event
    app, runner, port = await in_process(tick_ms=20)
    hub = app["hub"]
    try:
        vid = uid + "v"
        hub.apply_updates([validate(update(vid, 40.0, 10.0, status="moving"))])
        c = await Client.connect(_types.SimpleNamespace(ws_url=f"ws://127.0.0.1:{port}/ws"), token())
        await c.recv_type("welcome")
        await c.subscribe(subscriptions={"vehicles": [vid]})
        await _frames(c, 0.3)

        def broken():
            raise RuntimeError("a bug in the refresh")
        monkeypatch.setattr(hub, "refresh_clusters", broken)
        now = int(time.time() * 1000)
        hub.deliver_event(Event(f"{now}-0-local", vid, "note", {"x": 1}, now, False))
        hub.flush(rebuild=True, clusters=True)
        got = [m for f in await _frames(c, 0.5) for m in f["messages"]]
        assert [m["t"] for m in got] == ["event"] and got[0]["v"] == vid
        await c.close()
    finally:
        await runner.cleanup()
