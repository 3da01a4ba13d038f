"""Operations and resilience (issue 5, PROTOCOL §3.3, §5): heartbeat, slow
clients, staleness, metrics, health and logs, against real server processes."""
import asyncio
import json
import os
import re
import signal
import time
import urllib.request

import pytest

from conftest import Client, Closed, RawClient, Server, ingest, rss_kb, token, update

pytestmark = pytest.mark.integration


def get(server, path):
    try:
        with urllib.request.urlopen(server.url + path, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(server, name: str) -> float:
    text = get(server, "/metrics")[1]
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def log_lines(server) -> list[dict]:
    server.log.flush()
    out = []
    for line in open(server.log.name):
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# ---------------------------------------------------------------- heartbeat
async def test_pings_go_out_and_a_silent_client_is_closed_1011_and_logged():
    s = Server("--simulate", "0", "--heartbeat-s", "1", "--pong-timeout-s", "4.5")
    try:
        mute = await RawClient.connect(s)            # reads, never answers a ping
        await mute.until("welcome")
        alive = await Client.connect(s, token())     # websockets answers pings
        await alive.recv_type("welcome")
        pings, opcode = 0, None
        while opcode != 0x8:
            _, opcode, payload = await mute.frame(timeout=10)
            pings += opcode == 0x9
        assert pings >= 2
        assert int.from_bytes(payload[:2], "big") == 1011 and b"no pong" in payload
        await alive.send({"type": "ping", "id": "p"})     # answered pings kept it open
        assert (await alive.recv_type("pong"))["id"] == "p"
        assert metric(s, "heartbeat_timeouts_total") == 1
        deadline = time.time() + 5
        while time.time() < deadline:
            lines = [x for x in log_lines(s) if x.get("event") == "disconnect"]
            if lines:
                break
            await asyncio.sleep(0.1)
        assert any("no pong" in x["reason"] for x in lines), lines
        await alive.close()
    finally:
        s.stop()


# ---------------------------------------------------------------- staleness
async def test_silent_vehicle_goes_offline_then_leaves_as_stale_and_is_forgotten(uid):
    s = Server("--simulate", "0", "--tick-ms", "20", "--offline-after-s", "1", "--stale-after-s", "3")
    try:
        v, w = uid + "quiet", uid + "chatty"
        ingest(s, [update(v, 55.0, 37.0, status="moving"), update(w, 55.0, 37.0, status="idle")])
        c = await Client.connect(s, token())
        await c.recv_type("welcome")
        _, snap = await c.subscribe(subscriptions={"vehicles": [v, w]})
        assert {m["v"] for m in snap} == {v, w}
        t0 = time.monotonic()
        seen = []
        while time.monotonic() - t0 < 30:
            ingest(s, [update(w, 55.0, 37.0, status="idle")])   # w keeps talking
            seen += await c.messages(0.5)
            if any(m["t"] == "leave" for m in seen):
                break
        mine = [m for m in seen if m["v"] == v]
        assert mine[0]["t"] == "delta" and mine[0]["ch"] == {"st": "offline"}
        assert mine[-1] == {"t": "leave", "v": v, "r": "stale"}
        assert not [m for m in seen if m["v"] == w and m["t"] == "leave"]
        status, _ = get(s, f"/api/vehicles/{v}?token={token()}")
        assert status == 404          # forgotten: as if it never reported
        assert metric(s, "vehicles_forgotten_total") == 1
        assert metric(s, "vehicles_went_offline_total") >= 1
        # back from the dead: a fresh vehicle again
        ingest(s, [update(v, 55.0, 37.0, status="moving")])
        back = await c.wait_messages(lambda m: m["v"] == v)
        assert [m for m in back if m["v"] == v][-1]["t"] == "full"
        await c.close()
    finally:
        s.stop()


async def test_idle_jitter_is_not_sent_but_a_status_change_is(server, uid):
    v = uid + "parked"
    t = int(time.time() * 1000)
    ingest(server, [update(v, 55.0, 37.0, t, status="idle")])
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    await c.subscribe(subscriptions={"vehicles": [v]})
    ingest(server, [update(v, 55.00005, 37.00005, t + 1000, status="idle")])    # ~7 m
    assert await c.messages(0.5) == []
    ingest(server, [update(v, 55.00006, 37.00005, t + 2000, status="moving", speed=12)])
    got = await c.wait_messages(lambda m: m["v"] == v)
    assert got[-1]["t"] == "delta" and got[-1]["ch"]["st"] == "moving"
    assert got[-1]["ch"]["p"] == [55.00006, 37.00005]
    await c.close()


# ---------------------------------------------------------------- slow clients
async def test_a_client_that_stops_reading_is_conflated_keeps_its_events_then_catches_up(uid):
    s = Server("--simulate", "10000", "--tick-ms", "50", "--slow-client-buffer-bytes", "65536",
               "--max-visible", "100000")
    try:
        marker = uid + "m"
        ingest(s, [update(marker, 55.0, 37.0, status="idle")])
        slow = await RawClient.connect(s, rcvbuf=4096)
        await slow.until("welcome")
        slow.send({"type": "subscribe", "id": "s", "subscriptions": {}})
        _, sub = await slow.until("subscribed")
        other = await Client.connect(s, token())
        await other.recv_type("welcome")
        await other.subscribe(subscriptions={"vehicles": [marker]})
        # the slow client reads nothing from here on; the server keeps going
        rss0 = rss_kb(s.proc.pid)
        deadline = time.monotonic() + 20
        while metric(s, "slow_client_conflations_total") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert metric(s, "slow_client_conflations_total") >= 1
        # an event while it is stalled: kept for it; the other client gets it at once
        ingest(s, [update(marker, 55.0, 37.0, status="idle", alerts=["panic"])])
        ev = await other.wait_messages(lambda m: m.get("t") == "event")
        assert [m for m in ev if m["t"] == "event"][0]["v"] == marker
        # positions keep flowing to the other client, second after second
        for _ in range(3):
            ingest(s, [update(marker, 55.0 + time.time() % 1 / 100, 37.0, status="moving")])
            assert await other.wait_messages(lambda m: m["v"] == marker and m["t"] in ("pos", "delta"),
                                              timeout=10)
            await asyncio.sleep(0.7)
        assert metric(s, "slow_client_frames_conflated_total") > 0
        assert rss_kb(s.proc.pid) - rss0 < 64 * 1024, "server memory grew with a stalled client"
        assert metric(s, "slow_client_closed_total") == 0
        # it reads again: the backlog, then one catch-up with every vehicle's
        # latest state, then the held event, then live batches
        # frames partly sent when its socket filled were finished by the
        # transport: each one whole (it parses) and in order (seq by one)
        kinds, events, seqs = set(), [], []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not events:
            _, m = await slow.message(timeout=10)
            if m.get("type") == "batch":
                seqs.append(m["seq"])
                kinds |= {x["t"] for x in m["messages"]}
                events += [x for x in m["messages"] if x["t"] == "event" and x["v"] == marker]
                full = [x for x in m["messages"] if x["t"] == "full" and x["v"] == marker]
                if full:
                    assert full[0]["st"] in ("idle", "moving")
        assert events and events[0]["e"] == "alert" and events[0]["d"] == {"alert": "panic"}
        assert "full" in kinds
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        # caught up: it leaves the conflating state once it has read what was
        # queued (10,000 moving vehicles keep coming meanwhile: read on)
        deadline = time.monotonic() + 20
        while metric(s, "slow_clients_conflating") != 0 and time.monotonic() < deadline:
            await slow.message(timeout=10)
        assert metric(s, "slow_clients_conflating") == 0
        slow.close()
        await other.close()
    finally:
        s.stop()


async def test_a_client_that_pings_and_never_reads_is_closed_not_buffered_for():
    """Each ping gets its pong; a client that sends pings and reads nothing
    would grow its write buffer without end: past --write-buffer-close-bytes
    it is closed with 1013, as for any write, and once (one log line, not
    one per ping after it)."""
    s = Server("--simulate", "0", "--write-buffer-close-bytes", "65536", "--slow-client-buffer-bytes", "16384")
    try:
        c = await RawClient.connect(s, rcvbuf=4096)
        await c.until("welcome")
        mask = os.urandom(4)
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
        chunk = (bytes((0x89, 0x80 | 125)) + mask + payload) * 1000
        sent = 0
        while sent < 200_000:   # until the server stops reading them (25 MB of pongs would be owed)
            c.writer.write(chunk)
            try:
                await asyncio.wait_for(c.writer.drain(), 2)
            except asyncio.TimeoutError:
                break
            sent += 1000
        pongs = 0
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError, Closed)):
            while True:
                _, opcode, data = await c.frame(timeout=15)
                if opcode == 0xA:
                    pongs += 1
                elif opcode == 0x8:
                    raise Closed(int.from_bytes(data[:2], "big"), "")
        assert pongs < sent
        closes = [x for x in log_lines(s) if x.get("msg") == "connection closed by the server"]
        assert [(x["code"], x["reason"]) for x in closes] == [(1013, "slow client: write buffer over limit")]
        assert get(s, "/health/live")[0] == 200
        c.writer.transport.abort()
    finally:
        s.stop()


async def test_events_that_cannot_be_kept_close_1013_and_resume_loses_none(uid):
    s = Server("--simulate", "10000", "--tick-ms", "50", "--slow-client-buffer-bytes", "65536",
               "--slow-client-max-events", "3", "--max-visible", "100000")
    try:
        v = uid + "e"
        ingest(s, [update(v, 55.0, 37.0)])
        slow = await RawClient.connect(s, rcvbuf=4096)
        _, welcome = await slow.until("welcome")
        slow.send({"type": "subscribe", "subscriptions": {}})
        # one event it does read: where its resume will start from
        ingest(s, [update(v, 55.0, 37.0, alerts=["first"])])
        last_eid = None
        while last_eid is None:
            _, m = await slow.message(timeout=10)
            for x in m.get("messages", []) if m.get("type") == "batch" else []:
                if x["t"] == "event" and x["v"] == v:
                    last_eid = x["eid"]
        # from here on it reads nothing
        deadline = time.monotonic() + 20
        while metric(s, "slow_client_conflations_total") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        for i in range(5):
            ingest(s, [update(v, 55.0, 37.0, alerts=[f"alert-{i}"])])
            await asyncio.sleep(0.1)
        with pytest.raises(Closed) as e:
            while True:
                await slow.message(timeout=10)
        assert e.value.code == 1013
        assert metric(s, "slow_client_closed_total") == 1
        slow.close()
        # PROTOCOL §3.4: it resumes from the last event it saw and gets every one after it
        again = await Client.connect(s, token(), query=f"resume={welcome['session']}&last_event={last_eid}")
        w = await again.recv_type("welcome")
        assert w["resumed"] is True
        got = await again.wait_messages(
            lambda x: x["t"] == "event" and x["v"] == v and x["d"] == {"alert": "alert-4"}, timeout=10)
        mine = [x["d"]["alert"] for x in got if x["t"] == "event" and x["v"] == v]
        assert mine == [f"alert-{i}" for i in range(5)]
        await again.close()
    finally:
        s.stop()


# ---------------------------------------------------------------- metrics, health, logs
async def test_metrics_have_the_latency_histogram_loop_lag_and_transports(server, uid):
    c = await Client.connect(server, token())
    await c.recv_type("welcome")
    await c.subscribe(subscriptions={"vehicles": [uid + "h"]})
    ingest(server, [update(uid + "h", 55.0, 37.0)])
    await c.wait_messages(lambda m: m["v"] == uid + "h")
    text = get(server, "/metrics")[1]
    count = float(re.search(r"^message_delivery_latency_ms_count (\S+)$", text, re.M).group(1))
    inf = float(re.search(r'^message_delivery_latency_ms_bucket\{le="\+Inf"\} (\S+)$', text, re.M).group(1))
    assert count >= 1 and inf == count
    assert re.search(r'^websocket_connections_active\{transport="websocket"\} [1-9]', text, re.M)
    for name in ("event_loop_lag_ms", "event_loop_lag_max_ms", "slow_operations_total",
                 "slow_client_conflations_total", "slow_client_closed_total", "process_cpu_share",
                 'websocket_connections_active{transport="sse"}'):
        assert name in text, name
    await c.close()


def test_ready_reports_load_problems_with_reasons():
    s = Server("--simulate", "0", "--ready-max-memory", "0.000001")
    try:
        status, body = get(s, "/health/ready")
        assert status == 503
        assert any(p.startswith("memory") for p in json.loads(body)["problems"])
        assert get(s, "/health/live")[0] == 200
    finally:
        s.stop()


def test_ready_when_healthy(server):
    status, body = get(server, "/health/ready")
    assert status == 200 and json.loads(body)["problems"] == []


def test_a_blocked_event_loop_is_logged_as_a_slow_operation():
    s = Server("--simulate", "0")
    try:
        os.kill(s.proc.pid, signal.SIGSTOP)    # the loop cannot run for 0.4 s
        time.sleep(0.4)
        os.kill(s.proc.pid, signal.SIGCONT)
        deadline = time.time() + 5
        while time.time() < deadline:
            slow = [x for x in log_lines(s) if x.get("event") == "slow_operation"]
            if slow:
                break
            time.sleep(0.1)
        assert slow and slow[0]["blocked_ms"] >= 300
        assert metric(s, "slow_operations_total") >= 1
    finally:
        s.stop()


async def test_connect_and_disconnect_are_logged_with_user_reason_duration_and_counts(server):
    c = await Client.connect(server, token(sub="logged-user"))
    await c.recv_type("welcome")
    await c.send({"type": "ping"})
    await c.recv_type("pong")
    await c.close()
    deadline = time.time() + 5
    while time.time() < deadline:
        lines = [x for x in log_lines(server) if x.get("user") == "logged-user"]
        if any(x["event"] == "disconnect" for x in lines):
            break
        time.sleep(0.05)
    conn = [x for x in lines if x["event"] == "connect"][0]
    assert conn["transport"] == "websocket" and conn["client"] and conn["peer"] == "127.0.0.1"
    disc = [x for x in lines if x["event"] == "disconnect"][0]
    assert disc["client"] == conn["client"] and disc["reason"].startswith("client closed")
    assert disc["messages"] == 2 and disc["bytes"] > 0 and disc["duration_s"] >= 0


# ---------------------------------------------------------------- shutdown
async def test_sigterm_stops_accepting_at_once_while_clients_drain(uid):
    """PROTOCOL §5: stop accepting first (site.stop()), then reconnect and
    drain. A client that does not read keeps the drain going for a third of
    the grace period; during it the port refuses new connections."""
    s = Server("--simulate", "10000", "--tick-ms", "50", "--slow-client-buffer-bytes", "65536",
               "--max-visible", "100000", "--shutdown-grace", "30")
    try:
        slow = await RawClient.connect(s, rcvbuf=4096)
        await slow.until("welcome")
        slow.send({"type": "subscribe", "subscriptions": {}})
        deadline = time.monotonic() + 20
        while metric(s, "slow_client_conflations_total") < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)   # its unsent bytes are piling up
        assert metric(s, "slow_client_conflations_total") >= 1
        s.proc.send_signal(signal.SIGTERM)
        refused = False
        deadline = time.monotonic() + 8       # the drain holds the process for 10 s
        while not refused and time.monotonic() < deadline:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", s.port)
                w.close()
                await asyncio.sleep(0.05)
            except ConnectionRefusedError:
                refused = True
        assert refused and s.proc.poll() is None, "still accepting while it drains"
        slow.close()
        assert await asyncio.to_thread(s.proc.wait, 20) == 0
    finally:
        s.stop()


# ---------------------------------------------------------------- bounded memory (PROTOCOL §3.5)
async def test_invented_group_names_do_not_grow_the_worker(uid):
    """Any viewer token may subscribe to names no vehicle carries, again and
    again: 20,000 of them must cost the worker nothing that stays."""
    s = Server("--simulate", "0", "--max-subscription-size", "1000")
    try:
        ingest(s, [update(uid + "v", groups=["real"])])
        c = await Client.connect(s, token())
        await c.recv_type("welcome")

        async def subscribe_names(start, count, per=500):
            for i in range(start, start + count, per):
                await c.send({"type": "subscribe",
                              "subscriptions": {"groups": [f"{uid}-{j}" for j in range(i, i + per)]}})
                assert (await c.recv_type("subscribed", timeout=10))["visible"] == 0

        await subscribe_names(0, 2_000)            # warm up: allocator, caches
        rss0 = rss_kb(s.proc.pid)
        await subscribe_names(2_000, 20_000)
        grown_kb = rss_kb(s.proc.pid) - rss0
        # measured: ~100 KB now, 11,400 KB when every name got a group row
        assert grown_kb < 2 * 1024, f"{grown_kb} KB for 20,000 invented group names"
        await c.send({"type": "subscribe", "subscriptions": {"groups": ["real"]}})
        assert (await c.recv_type("subscribed", timeout=10))["visible"] == 1
        await c.close()
    finally:
        s.stop()


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_a_client_that_stops_reading_is_let_go_not_held_for_good():
    """A client that stops reading but keeps its TCP connection (a hung app:
    its kernel advertises a zero window) is closed for slowness or for no
    pong; that close used to wait for ever in aiohttp's drain, so the
    connection, its session, its core row and its per-user slot stayed for
    the life of the process (after 50 of them the user was refused for
    good), and an SSE stream's socket stayed after its handler returned.
    A peer that takes none of the server's bytes for --pong-timeout-s is
    gone (TCP_USER_TIMEOUT on the listening socket)."""
    s = Server("--simulate", "3000", "--tick-ms", "50", "--max-visible", "100000", "--heartbeat-s", "1",
               "--pong-timeout-s", "3", "--max-connections-per-user", "1",
               "--write-buffer-close-bytes", "262144", "--slow-client-buffer-bytes", "65536")
    try:
        base = _open_fds(s.proc.pid)
        stuck = await RawClient.connect(s, rcvbuf=4096)
        await stuck.until("welcome")
        stuck.send({"type": "subscribe", "subscriptions": {}})
        # an SSE stream that is never read, beside it
        import socket as socket_
        sse = socket_.socket()
        sse.setsockopt(socket_.SOL_SOCKET, socket_.SO_RCVBUF, 4096)
        sse.connect(("127.0.0.1", s.port))
        sse.sendall(f"GET /api/realtime/stream?token={token(sub='sse')} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        # the WebSocket client neither reads nor answers pings: its slot must
        # come back, within the pong timeout and the zero window's
        deadline, admitted = time.monotonic() + 30, False
        while not admitted and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
            c = await Client.connect(s, token())
            try:
                admitted = (await c.recv(3.0)).get("type") == "welcome"
            except Exception:
                admitted = False
            await c.close()
        assert admitted, s.logs()
        # and so do the sockets of both
        deadline = time.monotonic() + 15
        while _open_fds(s.proc.pid) > base and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert _open_fds(s.proc.pid) <= base, (base, _open_fds(s.proc.pid))
        stuck.writer.transport.abort()
        sse.close()
    finally:
        s.stop()


async def test_an_idle_keep_alive_connection_is_let_go_after_the_pong_timeout():
    """A connection that made a request and then stays idle, or never sends
    a whole request, is closed after
    --pong-timeout-s (aiohttp's default held each for an hour: a socket
    apiece, with no bound per address)."""
    import socket as socket_
    s = Server("--simulate", "0", "--heartbeat-s", "1", "--pong-timeout-s", "2")
    try:
        sock = socket_.create_connection(("127.0.0.1", s.port))
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        got = b""
        while b"\r\n\r\n" not in got:
            got += sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        rest = b""
        try:
            while True:   # whatever is left of the body, then the close
                chunk = sock.recv(4096)
                if not chunk:
                    break
                rest += chunk
        except socket_.timeout:
            pytest.fail("the idle connection was still open after 10 s")
        assert 1.0 < time.monotonic() - t0 < 8   # let go, and not before it was idle that long
        sock.close()
        # nor are one that never sends a request and one that sends it a byte
        # at a time (aiohttp's timer runs from the connection, not from a request)
        silent = socket_.create_connection(("127.0.0.1", s.port))
        trickle = socket_.create_connection(("127.0.0.1", s.port))
        trickle.sendall(b"GET /health/live HTTP/1.1\r\n")
        t0 = time.monotonic()
        silent.settimeout(10)
        assert silent.recv(10) == b""
        trickle.settimeout(0.3)
        while time.monotonic() - t0 < 10:
            try:
                trickle.sendall(b"X")
                assert trickle.recv(10) == b""
                break
            except socket_.timeout:
                continue
            except OSError:   # reset: closed as well
                break
        else:
            pytest.fail("a request sent a byte at a time held its connection for 10 s")
        assert 1.0 < time.monotonic() - t0 < 8
        silent.close()
        trickle.close()
    finally:
        s.stop()
