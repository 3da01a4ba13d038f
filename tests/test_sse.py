"""SSE (PROTOCOL §4), against a real server process: headers, the `retry:`
line, `welcome`, batches with `id: <seq>`, keep-alive comments, errors."""
import asyncio
import json
import time

import aiohttp
import pytest

from conftest import Server, ingest, metric_value, token, update

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
