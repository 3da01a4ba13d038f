"""The session API and long polling (PROTOCOL §4), against real server
processes: one instance alone, and two sharing Redis, where a poll lands on
the instance that does not hold the session."""
import asyncio
import json
import time

import aiohttp
import pytest
import redis.asyncio as aioredis

from conftest import Server, ingest, metric_value, token, update

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pserver():
    s = Server("--simulate", "0", "--tick-ms", "20", "--session-idle-s", "3")
    yield s
    s.stop()


async def post_session(http, server, body=None, tok=None):
    async with http.post(f"{server.url}/api/realtime/session", json=body or {},
                         headers={"Authorization": f"Bearer {tok or token()}"}) as r:
        return r.status, await r.json()


async def poll(http, server, sid, cursor=0, timeout=5, tok=None, **extra):
    q = {"session": sid, "cursor": str(cursor), "timeout": str(timeout), **extra}
    async with http.get(f"{server.url}/api/realtime/poll", params=q,
                        headers={"Authorization": f"Bearer {tok or token()}"}) as r:
        return r.status, await r.json()


def alert(name):
    """An SSE `events()` condition: a batch with the alert event `name`."""
    return lambda ev: any(e == "batch" and any(m.get("t") == "event" and m["d"].get("alert") == name
                                               for m in d["messages"]) for e, _, d in ev)


def batch_msgs(messages):
    return [m for b in messages if b.get("type") == "batch" for m in b["messages"]]


async def poll_until(http, server, sid, cursor, pred, timeout=10.0, tok=None):
    """Polls on from cursor until pred(all messages so far); (cursor, messages, resets)."""
    got, resets = [], 0
    deadline = time.monotonic() + timeout
    while not pred(got):
        assert time.monotonic() < deadline, f"timed out; got {got[-5:]}"
        status, body = await poll(http, server, sid, cursor, 1, tok)
        assert status == 200, body
        resets += bool(body.get("reset"))
        got += body["messages"]
        cursor = body["cursor"]
    return cursor, got, resets


async def test_a_session_is_made_polled_held_and_changed(pserver, uid):
    a, b = uid + "a", uid + "b"
    ingest(pserver, [update(a, 55.75, 37.62), update(b, 59.93, 30.31)])
    async with aiohttp.ClientSession() as http:
        status, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [a]}})
        assert status == 201 and made["session"].startswith("s_")
        sid = made["session"]
        assert metric_value(pserver, 'websocket_connections_active{transport="long_poll"}') >= 1
        status, first = await poll(http, pserver, sid)
        assert status == 200 and "reset" not in first
        kinds = [m["type"] for m in first["messages"]]
        assert kinds[:2] == ["welcome", "subscribed"] and first["messages"][0]["session"] == sid
        assert {m["v"] for m in batch_msgs(first["messages"]) if m["t"] == "full"} == {a}
        cursor = first["cursor"]

        # nothing new: held for `timeout`, then an empty answer with the same cursor
        t0 = time.monotonic()
        status, empty = await poll(http, pserver, sid, cursor, 0.6)
        assert status == 200 and empty == {"cursor": cursor, "messages": []}
        assert time.monotonic() - t0 >= 0.5

        # something new while a poll waits: it answers at once
        waiting = asyncio.ensure_future(poll(http, pserver, sid, cursor, 20))
        await asyncio.sleep(0.3)
        t0 = time.monotonic()
        ingest(pserver, [update(a, 55.76, 37.63)])
        status, moved = await waiting
        assert time.monotonic() - t0 < 2
        assert [m["v"] for m in batch_msgs(moved["messages"])] == [a] and moved["cursor"] > cursor

        # the answer was lost: the same cursor gets the same messages again
        status, again = await poll(http, pserver, sid, cursor, 1)
        assert again["messages"] == moved["messages"] and again["cursor"] == moved["cursor"]
        cursor = moved["cursor"]

        # PUT: `subscribed` and its batch in the stream (b comes in, a goes out)
        async with http.put(f"{pserver.url}/api/realtime/session/{sid}",
                            json={"subscriptions": {"vehicles": [b]}},
                            headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200 and (await r.json())["session"] == sid
        cursor, got, _ = await poll_until(http, pserver, sid, cursor,
                                          lambda g: any(m.get("t") == "full" for m in batch_msgs(g)))
        assert any(m["type"] == "subscribed" for m in got)
        msgs = batch_msgs(got)
        assert {m["v"] for m in msgs if m["t"] == "full"} == {b}
        assert {(m["v"], m["r"]) for m in msgs if m["t"] == "leave"} == {(a, "subscription")}

        # batches keep one gapless seq across polls (a copy's seqs start at
        # its creation time in µs, so that no two copies of a session share one)
        status, whole = await poll(http, pserver, sid, 0, 0)
        seqs = [m["seq"] for m in whole["messages"] if m["type"] == "batch"]
        assert len(seqs) >= 3 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert abs(seqs[0] / 1e6 - time.time()) < 60

        async with http.delete(f"{pserver.url}/api/realtime/session/{sid}",
                               headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 204
        status, gone = await poll(http, pserver, sid, cursor, 1)
        assert status == 410 and gone["code"] == "gone"


async def test_a_session_made_without_a_subscription_sees_nothing_until_a_put(pserver, uid):
    """POST ?subscription=none (what the browser library does before the page
    subscribes): `welcome` only, no snapshot of every vehicle; a PUT subscribes."""
    a = uid + "a"
    ingest(pserver, [update(a, 55.75, 37.62), update(uid + "other", 55.7, 37.6)])
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{pserver.url}/api/realtime/session?subscription=none", json={},
                             headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 201
            sid = (await r.json())["session"]
        status, first = await poll(http, pserver, sid, 0, 0.5)
        assert status == 200 and [m["type"] for m in first["messages"]] == ["welcome"], first
        async with http.put(f"{pserver.url}/api/realtime/session/{sid}", json={"subscriptions": {"vehicles": [a]}},
                            headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200
        _, got, _ = await poll_until(http, pserver, sid, first["cursor"],
                                     lambda g: any(m.get("t") == "full" for m in batch_msgs(g)))
        assert [m["type"] for m in got][0] == "subscribed"
        assert {m["v"] for m in batch_msgs(got) if m["t"] == "full"} == {a}


async def test_session_api_errors_are_json(pserver, uid):
    async with aiohttp.ClientSession() as http:
        status, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        # another user's session
        status, body = await poll(http, pserver, sid, tok=token("someone-else"))
        assert status == 403 and body["code"] == "forbidden"
        async with http.delete(f"{pserver.url}/api/realtime/session/{sid}",
                               headers={"Authorization": f"Bearer {token('someone-else')}"}) as r:
            assert r.status == 403
        status, body = await poll(http, pserver, "s_unknown")
        assert status == 404 and body["code"] == "not_found"
        status, body = await poll(http, pserver, sid, tok="nope")
        assert status == 401 and body["code"] == "unauthorized"
        status, body = await poll(http, pserver, sid, tok=token(permissions=[]))
        assert status == 403
        for bad in ({"cursor": "-1"}, {"cursor": "x"}, {"timeout": "61"}, {"timeout": "nan"}):
            q = {"session": sid, "cursor": "0", "timeout": "1", **bad}
            async with http.get(f"{pserver.url}/api/realtime/poll", params=q,
                                headers={"Authorization": f"Bearer {token()}"}) as r:
                assert r.status == 400 and (await r.json())["code"] == "bad_request", bad
        for body in ({"subscriptions": {"vehicles": "x"}}, [1, 2], {"type": "ping"}):
            status, got = await post_session(http, pserver, body)
            assert status == 400 and got["code"] == "bad_request", body
        async with http.post(f"{pserver.url}/api/realtime/session", data=b"{not json",
                             headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 400
        async with http.post(f"{pserver.url}/api/realtime/session", data=b"{" + b" " * 70000 + b"}",
                             headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 413


async def test_a_foreign_cursor_gets_a_reset_with_the_full_state(pserver, uid):
    ingest(pserver, [update(uid, 55.75, 37.62)])
    async with aiohttp.ClientSession() as http:
        _, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        status, first = await poll(http, pserver, sid)
        status, body = await poll(http, pserver, sid, 12345)   # not a cursor of this session's copy
        assert status == 200 and body["reset"] is True
        welcome = body["messages"][0]
        assert welcome["type"] == "welcome" and welcome["resumed"] is True and welcome["session"] == sid
        assert {m["v"] for m in batch_msgs(body["messages"]) if m["t"] == "full"} == {uid}
        # and it goes on from the new cursor
        ingest(pserver, [update(uid, 55.9, 37.7)])
        _, got, resets = await poll_until(http, pserver, sid, body["cursor"],
                                          lambda g: any(m.get("t") == "pos" for m in batch_msgs(g)))
        assert resets == 0


async def test_sessions_nobody_polls_end_and_release_everything(pserver, uid):
    async with aiohttp.ClientSession() as http:
        before = metric_value(pserver, 'websocket_connections_active{transport="long_poll"}')
        sids = [(await post_session(http, pserver, {"subscriptions": {"vehicles": [uid]}}))[1]["session"]
                for _ in range(5)]
        assert metric_value(pserver, 'websocket_connections_active{transport="long_poll"}') == before + 5
        deadline = time.monotonic() + 15   # --session-idle-s 3, swept every 0.75 s
        while metric_value(pserver, 'websocket_connections_active{transport="long_poll"}') > before:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)
        status, body = await poll(http, pserver, sids[0])
        assert status == 410


async def test_the_alerts_of_a_session_are_kept_between_polls(pserver, uid):
    """Events that come while nobody polls wait in the session's buffer."""
    async with aiohttp.ClientSession() as http:
        ingest(pserver, [update(uid)])
        _, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        _, first = await poll(http, pserver, sid)
        for i in range(3):
            ingest(pserver, [update(uid, alerts=[f"alert_{i}"])])
            ingest(pserver, [update(uid, alerts=[])])
        await asyncio.sleep(0.3)
        _, got, _ = await poll_until(http, pserver, sid, first["cursor"],
                                     lambda g: len([m for m in batch_msgs(g) if m["t"] == "event"]) >= 3)
        events = [m for m in batch_msgs(got) if m["t"] == "event"]
        assert [e["d"]["alert"] for e in events] == ["alert_0", "alert_1", "alert_2"]


# ---------------------------------------------------------------- two instances
@pytest.fixture
def pair(redis_url):
    a = Server("--simulate", "0", "--tick-ms", "20", "--redis", redis_url)
    try:
        b = Server("--simulate", "0", "--tick-ms", "20", "--redis", redis_url)
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


async def test_polls_move_between_instances_and_lose_nothing(pair, redis_url, uid):
    a, b = pair
    r = aioredis.from_url(redis_url)
    ingest(a, [update(uid, 55.75, 37.62)])
    async with aiohttp.ClientSession() as http:
        _, made = await post_session(http, a, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        cursor, got, _ = await poll_until(http, a, sid, 0, lambda g: any(m.get("t") == "full" for m in batch_msgs(g)))
        await r.publish(f"vehicle:events:{uid}", json.dumps({"type": "on_a", "n": 1}))
        cursor, got, _ = await poll_until(http, a, sid, cursor,
                                          lambda g: any(m.get("e") == "on_a" for m in batch_msgs(g)))
        # acknowledged by the next poll's cursor; then events while nobody polls
        await poll(http, a, sid, cursor, 0)
        await asyncio.sleep(1.2)   # the acknowledged event reaches the record (at most once a second)
        await poll(http, a, sid, cursor, 0)
        for n in range(3):
            await r.publish(f"vehicle:events:{uid}", json.dumps({"type": "while_away", "n": n}))
        await asyncio.sleep(0.5)
        # the next poll lands on b, which does not hold the session: it takes it
        # over and answers with a reset, the full state and the missed events
        status, body = await poll(http, b, sid, cursor, 1)
        assert status == 200 and body["reset"] is True, body
        msgs = batch_msgs(body["messages"])
        cursor, more, _ = await poll_until(
            http, b, sid, body["cursor"],
            lambda g: len([m for m in msgs + batch_msgs(g) if m.get("e") == "while_away"]) >= 3)
        msgs += batch_msgs(more)
        assert {m["v"] for m in msgs if m["t"] == "full"} == {uid}
        away = [m["d"]["n"] for m in msgs if m.get("e") == "while_away"]
        assert sorted(set(away)) == [0, 1, 2]
        welcome = body["messages"][0]
        assert welcome["type"] == "welcome" and welcome["resumed"] is True and welcome["recovered"] is True
        # and back on a: a's copy is no longer the session's; a new one there
        await r.publish(f"vehicle:events:{uid}", json.dumps({"type": "back_on_a", "n": 9}))
        cursor, got, resets = await poll_until(http, a, sid, cursor,
                                               lambda g: any(m.get("e") == "back_on_a" for m in batch_msgs(g)))
        assert resets == 1
    await r.aclose()


async def test_an_old_copy_never_undoes_a_takeover(pair, uid):
    """After b takes the session over, a's copy (still held there until it
    notices) must not write its record back: b's next polls go on without a
    reset, and a PUT done on b stays."""
    a, b = pair
    ingest(a, [update(uid), update(uid + "x", 50.0, 30.0)])
    async with aiohttp.ClientSession() as http:
        _, made = await post_session(http, a, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        cursor, _, _ = await poll_until(http, a, sid, 0, lambda g: any(m.get("t") == "full" for m in batch_msgs(g)))
        # two events acknowledged on a within a second: the second mark is
        # held back (one record write a second) for a's sweep to write
        for name in ("first", "second"):
            ingest(a, [update(uid, alerts=[name])])
            cursor, _, _ = await poll_until(http, a, sid, cursor, lambda g: any(
                m.get("t") == "event" and m["d"]["alert"] == name for m in batch_msgs(g)))
            ingest(a, [update(uid, alerts=[])])
            await poll(http, a, sid, cursor, 0)
        status, body = await poll(http, b, sid, cursor, 0)
        assert body["reset"] is True
        cursor = body["cursor"]
        async with http.put(f"{b.url}/api/realtime/session/{sid}", json={"subscriptions": {"vehicles": [uid + "x"]}},
                            headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 200
        await asyncio.sleep(6)   # a's sweep (5 s) has run: it saves what it holds, or drops its copy
        cursor, got, resets = await poll_until(http, b, sid, cursor,
                                               lambda g: any(m.get("t") == "full" for m in batch_msgs(g)))
        assert resets == 0
        msgs = batch_msgs(got)
        assert uid + "x" in {m["v"] for m in msgs if m["t"] == "full"}
        assert (uid, "subscription") in {(m["v"], m.get("r")) for m in msgs if m["t"] == "leave"}
        ingest(a, [update(uid + "x", 50.1, 30.0)])
        _, got, resets = await poll_until(http, b, sid, cursor,
                                          lambda g: any(m.get("t") == "pos" for m in batch_msgs(g)))
        assert resets == 0


async def test_what_was_read_is_not_handed_out_again_once_the_rights_narrow(pserver, uid):
    """A poll's token narrows the session's rights (it no longer names
    vehicle a): what the reader had before is not handed out again to a
    re-read (a lost answer's cursor), which gets `reset`, a new copy under
    the narrower rights. It used to hand a's `full` out again. The reader
    that goes on from its cursor is not reset: it gets a's `leave`."""
    a, b = uid + "a", uid + "b"
    both = token(sub=uid, permissions=(), vehicles=[a, b])
    only_b = token(sub=uid, permissions=(), vehicles=[b])
    ingest(pserver, [update(a, 55.75, 37.62), update(b, 59.93, 30.31)])
    async with aiohttp.ClientSession() as http:
        status, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [a, b]}}, tok=both)
        assert status == 201
        sid = made["session"]
        cursor, got, _ = await poll_until(http, pserver, sid, 0,
                                          lambda g: any(m.get("t") == "full" for m in batch_msgs(g)), tok=both)
        assert {m["v"] for m in batch_msgs(got) if m["t"] == "full"} == {a, b}

        # the same token re-reads what it had, as after a lost answer
        status, again = await poll(http, pserver, sid, 0, 0, tok=both)
        assert status == 200 and "reset" not in again and a in json.dumps(batch_msgs(again["messages"]))

        # a moves before the next poll, which carries the narrower token: it
        # gets a's move (written before the change) and a's leave, no reset
        ingest(pserver, [update(a, 55.80, 37.70)])
        await asyncio.sleep(0.3)
        lost = cursor
        cursor, got, resets = await poll_until(
            http, pserver, sid, cursor, lambda g: any(m.get("t") == "leave" for m in batch_msgs(g)), tok=only_b)
        assert resets == 0
        assert {m["v"] for m in batch_msgs(got) if m["t"] == "leave"} == {a}

        # that answer was lost: asked again, it is a new copy without a
        status, again = await poll(http, pserver, sid, lost, 0, tok=only_b)
        assert status == 200 and again.get("reset") is True, again
        assert a not in json.dumps(batch_msgs(again["messages"]))

        # a re-read from the start (of that new copy) never shows a either
        status, reread = await poll(http, pserver, sid, 0, 0, tok=only_b)
        assert status == 200
        assert a not in json.dumps(batch_msgs(reread["messages"]))
        assert {m["v"] for m in batch_msgs(reread["messages"]) if m["t"] == "full"} == {b}


async def test_bad_bounds_and_racing_polls_leave_no_session_behind(pserver, uid):
    active = 'websocket_connections_active{transport="long_poll"}'
    async with aiohttp.ClientSession() as http:
        before = metric_value(pserver, active)
        bad = {"subscriptions": {"geographic": {"bounds": {"north": 10, "south": 20, "east": 1, "west": 0},
                                                "zoom": 5}}}
        status, body = await post_session(http, pserver, bad)
        assert status == 400 and body["code"] == "bad_request"
        assert metric_value(pserver, active) == before
        _, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        # three polls at once with cursors this copy does not hold: one new copy, not three
        got = await asyncio.gather(*(poll(http, pserver, sid, 777 + i, 0) for i in range(3)))
        assert all(status == 200 for status, _ in got)
        assert metric_value(pserver, active) == before + 1
        async with http.put(f"{pserver.url}/api/realtime/session/{sid}", json=bad,
                            headers={"Authorization": f"Bearer {token()}"}) as r:
            assert r.status == 400
        assert metric_value(pserver, active) == before + 1


async def test_a_body_that_arrives_in_pieces_is_read_whole(pserver, uid):
    body = json.dumps({"subscriptions": {"vehicles": [f"{uid}{i:05d}" for i in range(400)]}}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", pserver.port)
    writer.write(b"POST /api/realtime/session HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
                 % (token().encode(), len(body)))
    for i in range(0, len(body), 1000):
        writer.write(body[i:i + 1000])
        await writer.drain()
        await asyncio.sleep(0.02)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 201"), answer[:300]


async def test_an_sse_stream_moves_to_another_instance_without_losing_events(pair, uid):
    from test_sse import events
    a, b = pair
    ingest(a, [update(uid)])
    async with aiohttp.ClientSession() as http:
        _, made = await post_session(http, a, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        auth = {"Authorization": f"Bearer {token()}"}
        async with http.get(f"{a.url}/api/realtime/stream?session={sid}", headers=auth) as resp:
            ingest(a, [update(uid, alerts=["before"])])
            got = await events(resp, alert("before"))
            last_id = max(int(i) for e, i, _ in got if e == "batch")
        ingest(a, [update(uid, alerts=[])])
        ingest(a, [update(uid, alerts=["while_away"])])
        await asyncio.sleep(0.5)
        async with http.get(f"{b.url}/api/realtime/stream?session={sid}",
                            headers={**auth, "Last-Event-ID": str(last_id)}) as resp:
            got = await events(resp, alert("while_away"))
            welcome = next(d for e, _, d in got if e == "welcome")
            assert welcome["resumed"] is True and welcome["session"] == sid
            assert any(m["t"] == "full" and m["v"] == uid for e, _, d in got if e == "batch" for m in d["messages"])


async def test_a_session_made_on_one_instance_is_polled_at_once_on_another(pair, uid):
    a, b = pair
    async with aiohttp.ClientSession() as http:
        for _ in range(5):
            status, made = await post_session(http, a, {})
            assert status == 201
            status, body = await poll(http, b, made["session"], 0, 0)   # the record is there already
            assert status == 200, body


async def test_an_sse_reader_resumes_elsewhere_from_the_batch_it_names(pair, uid):
    """The copy on a saves the marks of its newest batches when it closes (here:
    a shuts down); the stream comes back on b with Last-Event-ID and gets what
    came after that batch, not everything since the session was made."""
    from test_sse import events
    a, b = pair
    ingest(b, [update(uid)])
    async with aiohttp.ClientSession() as http:
        _, made = await post_session(http, a, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        auth = {"Authorization": f"Bearer {token()}"}
        async with http.get(f"{a.url}/api/realtime/stream?session={sid}", headers=auth) as resp:
            ingest(b, [update(uid, alerts=["before"])])
            got = await events(resp, alert("before"))
            ingest(b, [update(uid, alerts=[])])
            await asyncio.sleep(0.5)   # a tick or two after it: that batch's mark is settled
            last_id = max(int(i) for e, i, _ in got if e == "batch")
            a.proc.terminate()         # its copy closes (1001) and saves its marks
            a.proc.wait(15)
        ingest(b, [update(uid, alerts=["after"])])
        await asyncio.sleep(0.3)
        async with http.get(f"{b.url}/api/realtime/stream?session={sid}",
                            headers={**auth, "Last-Event-ID": str(last_id)}) as resp:
            got = await events(resp, alert("after"))
            welcome = next(d for e, _, d in got if e == "welcome")
            assert welcome["resumed"] is True and welcome["recovered"] is True
            names = [m["d"]["alert"] for e, _, d in got if e == "batch" for m in d["messages"] if m.get("t") == "event"]
            assert names == ["after"], names   # "before" was acknowledged by the id: not sent again


async def test_a_stream_without_an_id_on_a_session_read_before_gets_a_new_copy(pserver, uid):
    from test_sse import events
    ingest(pserver, [update(uid)])
    async with aiohttp.ClientSession() as http:
        _, made = await post_session(http, pserver, {"subscriptions": {"vehicles": [uid]}})
        sid = made["session"]
        await poll(http, pserver, sid, 0, 0)
        async with http.get(f"{pserver.url}/api/realtime/stream?session={sid}&token={token()}") as resp:
            got = await events(resp, lambda ev: any(e == "batch" for e, _, _ in ev))
            welcome = next(d for e, _, d in got if e == "welcome")
            assert welcome["resumed"] is True and welcome["session"] == sid   # a new copy: the full state
            assert any(m["t"] == "full" and m["v"] == uid for e, _, d in got if e == "batch" for m in d["messages"])
