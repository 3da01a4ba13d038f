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
        def catch_ups(data):   # batches after the first that bring (nearly) the whole fleet
            return [b for b in re.split(rb"event: batch\nid: ", data)[2:] if b.count(b'"t":"full"') > 5000]
        data = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not catch_ups(data):
            data += await asyncio.wait_for(reader.read(1 << 20), 10)
        assert catch_ups(data), "no catch-up with every vehicle's latest state"
        ids = [int(x) for x in re.findall(rb"\nid: (\d+)\n", data)]
        assert ids == list(range(1, len(ids) + 1)), "seq has a gap"
        writer.close()
    finally:
        s.stop()
