"""SSE (PROTOCOL §4), against a real server process: headers, the `retry:`
line, `welcome`, batches with `id: <seq>`, keep-alive comments, errors."""
import asyncio
import json
import time

import aiohttp
import pytest

from conftest import Server, ingest, metric_value, rss_kb, token, update

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def sserver():
    s = Server("--simulate", "0", "--tick-ms", "20", "--heartbeat-s", "1", "--pong-timeout-s", "5")
    yield s
    s.stop()


async def events(resp, until, timeout=10.0):
    """Parsed SSE events [(event, id, data)] (comments as ("comment", None, text)) until until(events)."""
    out, buf = [], b""
    deadline = time.monotonic() + timeout
    while not until(out):
        assert time.monotonic() < deadline, f"timed out; got {out[-5:]}"
        chunk = await asyncio.wait_for(resp.content.readany(), max(0.05, deadline - time.monotonic()))
        assert chunk, "the stream ended"
        buf += chunk
        while b"\n\n" in buf:
            block, buf = buf.split(b"\n\n", 1)
            fields = {}
            for line in block.decode().split("\n"):
                if line.startswith(":"):
                    out.append(("comment", None, line[1:].strip()))
                elif ":" in line:
                    k, v = line.split(":", 1)
                    fields[k] = v[1:] if v.startswith(" ") else v
            if "data" in fields:
                out.append((fields.get("event", "message"), fields.get("id"), json.loads(fields["data"])))
            elif "retry" in fields:
                out.append(("retry", None, fields["retry"]))
    return out


async def test_sse_streams_batches_with_ids_after_a_welcome(sserver, uid):
    ingest(sserver, [update(uid + "a")])
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sserver.url}/api/realtime/stream?token={token()}") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Accel-Buffering"] == "no"
            got = await events(resp, lambda ev: any(e == "batch" for e, _, _ in ev))
            assert got[0] == ("retry", None, "3000")
            assert got[1][0] == "welcome" and got[1][2]["type"] == "welcome"
            batch = next(x for x in got if x[0] == "batch")
            assert batch[1] == "1" and batch[2]["seq"] == 1 and batch[2]["type"] == "batch"
            # without a session: every vehicle the token allows, then live changes
            assert uid + "a" in {m["v"] for m in batch[2]["messages"] if m["t"] == "full"}
            assert metric_value(sserver, 'websocket_connections_active{transport="sse"}') >= 1
            ingest(sserver, [update(uid + "a", 55.8)])
            more = await events(resp, lambda ev: any(e == "batch" and any(m.get("v") == uid + "a" for m in d["messages"])
                                                     for e, _, d in ev))
            ids = [int(i) for e, i, _ in got + more if e == "batch"]
            assert ids == list(range(1, len(ids) + 1))      # seq is the event id, gapless
            # comments keep proxies from closing an idle stream (--heartbeat-s 1 here)
            await events(resp, lambda ev: any(e == "comment" for e, _, _ in ev), timeout=5)


async def test_sse_refuses_bad_tokens_with_json_errors(sserver):
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sserver.url}/api/realtime/stream?token=nope") as resp:
            assert resp.status == 401 and (await resp.json())["code"] == "unauthorized"
        async with http.get(f"{sserver.url}/api/realtime/stream",
                            headers={"Authorization": f"Bearer {token(permissions=[])}"}) as resp:
            assert resp.status == 403 and (await resp.json())["code"] == "forbidden"


async def test_a_slow_sse_reader_is_conflated_not_buffered_then_catches_up():
    """PROTOCOL §4: a slow SSE reader is conflated like a slow WebSocket:
    no position batches while it is behind, memory flat, then one catch-up
    with every vehicle's latest state, and `id`s (its seq) without a gap."""
    import re
    import socket
    s = Server("--simulate", "10000", "--tick-ms", "50", "--slow-client-buffer-bytes", "65536",
               "--max-visible", "100000")
    try:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", s.port))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 22)
        writer.write(f"GET /api/realtime/stream?token={token()} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await writer.drain()
        rss0 = rss_kb(s.proc.pid)
        deadline = time.monotonic() + 30   # it reads nothing; the server keeps going
        while metric_value(s, "slow_client_conflations_total") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert metric_value(s, "slow_client_conflations_total") >= 1
        await asyncio.sleep(2)
        assert metric_value(s, "slow_client_frames_conflated_total") > 0
        assert rss_kb(s.proc.pid) - rss0 < 64 * 1024, "server memory grew with a stalled reader"
        assert metric_value(s, "slow_client_closed_total") == 0
        # it reads again, quickly now: the backlog, then the catch-up of `full`s
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        behind_ms = (time.time() - 1) * 1000   # while it was conflated: what the catch-up brings is newer

        def catch_ups(data):   # batches of `full`s of the latest state: (nearly) the whole fleet
            batches = [json.loads(d)["messages"] for d in re.findall(rb"\ndata: (.*)\n", data)
                       if d.startswith(b'{"type":"batch"')]
            return [m for m in batches if sum(x["t"] == "full" and x["ts"] >= behind_ms for x in m) > 100]
        data = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and sum(map(len, catch_ups(data))) < 5000:
            data += await asyncio.wait_for(reader.read(1 << 20), 10)
        assert sum(map(len, catch_ups(data))) >= 5000, "no catch-up with every vehicle's latest state"
        assert max(map(len, catch_ups(data))) <= 1000   # §3.4: in batches of at most 1,000
        # each part but the last says `more`; the next part (when read by now) is of the same batch
        batches = [json.loads(d) for d in re.findall(rb"\ndata: (.*)\n", data) if d.startswith(b'{"type":"batch"')]
        parted = [i for i, b in enumerate(batches) if b.get("more") is True]
        assert len(parted) >= 4 and all(batches[i + 1]["batch_id"] == batches[i]["batch_id"]
                                        for i in parted if i + 1 < len(batches))
        ids = [int(x) for x in re.findall(rb"\nid: (\d+)\n", data)]
        assert ids == list(range(1, len(ids) + 1)), "seq has a gap"
        writer.close()
    finally:
        s.stop()


async def _post_session(http, server, body):
    async with http.post(f"{server.url}/api/realtime/session", json=body,
                         headers={"Authorization": f"Bearer {token()}"}) as r:
        assert r.status == 201
        return (await r.json())["session"]


def _has_pos(uid):
    return lambda ev: any(e == "batch" and any(m.get("v") == uid and m["t"] in ("pos", "full")
                                                for m in d["messages"]) for e, _, d in ev)


async def test_an_sse_stream_reads_a_session_and_resumes_by_last_event_id(sserver, uid):
    """PROTOCOL §4: `session=` streams a session made by the session API;
    a reconnect with Last-Event-ID gets every batch after that id, kept in
    the session's buffer, with no reset and no repeat."""
    ingest(sserver, [update(uid, 55.75, 37.62)])
    async with aiohttp.ClientSession() as http:
        sid = await _post_session(http, sserver, {"subscriptions": {"vehicles": [uid]}})
        url = f"{sserver.url}/api/realtime/stream?token={token()}&session={sid}"
        async with http.get(url) as resp:
            assert resp.status == 200
            got = await events(resp, _has_pos(uid))
            kinds = [e for e, _, _ in got if e != "comment"]
            assert kinds[:4] == ["retry", "welcome", "subscribed", "batch"]
            assert got[1][2]["session"] == sid and got[1][2]["resumed"] is False
            last_id = max(int(i) for e, i, _ in got if e == "batch")
            assert metric_value(sserver, 'websocket_connections_active{transport="sse"}') >= 1
        # while it is away: three moves
        for k in range(3):
            ingest(sserver, [update(uid, 55.80 + k / 100, 37.62)])
            await asyncio.sleep(0.1)
        async with http.get(url, headers={"Last-Event-ID": str(last_id)}) as resp:
            got = await events(resp, lambda ev: any(e == "batch" and any(
                m.get("v") == uid and m.get("p", [0])[0] == 55.82 for m in d["messages"]) for e, _, d in ev))
            welcome = next(d for e, _, d in got if e == "welcome")
            assert welcome["resumed"] is True and welcome["recovered"] is True
            ids = [int(i) for e, i, _ in got if e == "batch"]
            assert ids == list(range(last_id + 1, last_id + 1 + len(ids)))   # no gap, no repeat
            lats = [m["p"][0] for e, _, d in got if e == "batch" for m in d["messages"] if m.get("v") == uid]
            assert lats == [55.80, 55.81, 55.82]
        # an id the buffer does not hold: a new copy, the full state
        async with http.get(url, headers={"Last-Event-ID": "999999"}) as resp:
            got = await events(resp, _has_pos(uid))
            welcome = next(d for e, _, d in got if e == "welcome")
            assert welcome["resumed"] is True and welcome["session"] == sid
            full = [m for e, _, d in got if e == "batch" for m in d["messages"] if m["t"] == "full"]
            assert [m["v"] for m in full] == [uid] and full[0]["p"][0] == 55.82


async def test_a_put_reaches_the_sse_stream_of_its_session(sserver, uid):
    a, b = uid + "a", uid + "b"
    ingest(sserver, [update(a), update(b, 59.9, 30.3)])
    async with aiohttp.ClientSession() as http:
        sid = await _post_session(http, sserver, {"subscriptions": {"vehicles": [a]}})
        async with http.get(f"{sserver.url}/api/realtime/stream?session={sid}",
                            headers={"Authorization": f"Bearer {token()}"}) as resp:
            await events(resp, _has_pos(a))
            async with http.put(f"{sserver.url}/api/realtime/session/{sid}", json={"subscriptions": {"vehicles": [b]}},
                                headers={"Authorization": f"Bearer {token()}"}) as r:
                assert r.status == 200
            got = await events(resp, _has_pos(b))
            msgs = [m for e, _, d in got if e == "batch" for m in d["messages"]]
            assert {(m["v"], m["t"]) for m in msgs} >= {(a, "leave"), (b, "full")}
            assert any(e == "subscribed" for e, _, _ in got)
            async with http.delete(f"{sserver.url}/api/realtime/session/{sid}",
                                   headers={"Authorization": f"Bearer {token()}"}) as r:
                assert r.status == 204
            # the stream ends with an `error` event: the session is gone
            got = await events(resp, lambda ev: any(e == "error" for e, _, _ in ev))
            err = next(d for e, _, d in got if e == "error")
            assert err["close_code"] == 4410
        async with http.get(f"{sserver.url}/api/realtime/stream?session={sid}&token={token()}") as resp:
            assert resp.status == 410
