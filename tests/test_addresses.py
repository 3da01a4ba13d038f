"""Client addresses behind a proxy (PROTOCOL §2, --trusted-proxies), against
real server processes: X-Forwarded-For is believed only from trusted peers,
the right-most untrusted hop is the client, and the per-IP limit, the
security log and the PostgreSQL records use that address. Sockets waiting
for their `auth` message count against it too."""
import asyncio
import json
import time

import asyncpg
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from conftest import Server, token
from realtime.address import Addresses, parse_networks
from test_records import DSN, db  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration


def test_the_right_most_untrusted_hop_is_the_client():
    a = Addresses(parse_networks("127.0.0.1/32, 10.0.0.0/8, ::1"))
    assert a.client("127.0.0.1", ["203.0.113.7"]) == "203.0.113.7"
    # what the client wrote itself (left of the first untrusted hop) is not believed
    assert a.client("127.0.0.1", ["1.1.1.1, 203.0.113.7, 10.1.2.3"]) == "203.0.113.7"
    assert a.client("127.0.0.1", ["1.1.1.1", "203.0.113.7"]) == "203.0.113.7"   # two header lines
    # an untrusted peer's header is ignored: a client cannot choose its address
    assert a.client("198.51.100.1", ["203.0.113.7"]) == "198.51.100.1"
    # every hop a trusted proxy: the left-most; none at all: the peer
    assert a.client("127.0.0.1", ["10.0.0.1, 10.0.0.2"]) == "10.0.0.1"
    assert a.client("127.0.0.1", []) == "127.0.0.1"
    # garbage from a trusted hop: the last trusted hop is what is known
    assert a.client("127.0.0.1", ["203.0.113.7, not-an-ip"]) == "127.0.0.1"
    assert a.client("127.0.0.1", ["[2001:db8::1]:443"]) == "2001:db8::1"
    assert a.client("::ffff:127.0.0.1", ["203.0.113.9:5555"]) == "203.0.113.9"
    # without --trusted-proxies the header means nothing
    assert Addresses(()).client("127.0.0.1", ["203.0.113.7"]) == "127.0.0.1"
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/8,proxy.example")


async def _open(server, xff=None, tok=None):
    headers = {"X-Forwarded-For": xff} if xff else {}
    ws = await websockets.connect(f"{server.ws_url}?token={tok or token()}", additional_headers=headers)
    try:
        return json.loads(await asyncio.wait_for(ws.recv(), 5))["type"], ws
    except ConnectionClosed as e:
        return e.rcvd.code, ws


async def test_the_per_ip_limit_counts_the_forwarded_address():
    s = Server("--simulate", "0", "--trusted-proxies", "127.0.0.0/8", "--max-connections-per-ip", "2",
               "--max-connections-per-user", "100")
    plain = Server("--simulate", "0", "--max-connections-per-ip", "2", "--max-connections-per-user", "100")
    try:
        open_ = []
        for _ in range(2):
            kind, ws = await _open(s, "203.0.113.7")
            assert kind == "welcome"
            open_.append(ws)
        kind, _ = await _open(s, "203.0.113.7")
        assert kind == 1008   # the third from that client
        # other clients behind the same proxy are not refused with it
        for i in range(3):
            kind, ws = await _open(s, f"203.0.113.{20 + i}")
            assert kind == "welcome"
            open_.append(ws)
        # a client that writes its own X-Forwarded-For before the proxy's does not escape
        kind, _ = await _open(s, "198.51.100.99, 203.0.113.7")
        assert kind == 1008
        # without --trusted-proxies the header is ignored: every socket is 127.0.0.1
        p = [await _open(plain, f"203.0.113.{i}") for i in range(3)]
        assert [k for k, _ in p] == ["welcome", "welcome", 1008]
        for _, ws in p:
            await ws.close()
        for ws in open_:
            await ws.close()
    finally:
        s.stop()
        plain.stop()


async def test_sockets_waiting_for_auth_count_against_their_address():
    s = Server("--simulate", "0", "--max-connections-per-ip", "3", "--auth-timeout-s", "5")
    try:
        silent = [await websockets.connect(s.ws_url) for _ in range(3)]   # no token: waiting for `auth`
        await asyncio.sleep(0.3)
        kind, _ = await _open(s)
        assert kind == 1008   # the fourth socket of this address, although the others hold no session
        await silent[0].close()
        deadline = time.monotonic() + 10
        while True:   # the slot comes back once the server has seen the close
            kind, ws = await _open(s)
            if kind == "welcome" or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert kind == "welcome"
        await ws.close()
        # a socket whose auth fails gives its slot back
        for w in silent[1:]:
            await w.send(json.dumps({"type": "auth", "token": "bad"}))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(w.recv(), 5)
        opened = [await _open(s) for _ in range(3)]
        assert [k for k, _ in opened] == ["welcome"] * 3
        for _, w in opened:
            await w.close()
    finally:
        s.stop()


async def test_logs_and_records_carry_the_forwarded_address(db, uid):
    """The connect log line, the security log and client_connections."""
    s = Server("--simulate", "0", "--trusted-proxies", "127.0.0.1", "--postgres", DSN)
    try:
        kind, ws = await _open(s, "203.0.113.77", token(sub=uid + "u"))
        assert kind == "welcome"
        await ws.close()
        bad = await websockets.connect(s.ws_url + "?token=forged", additional_headers={"X-Forwarded-For": "203.0.113.78"})
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(bad.recv(), 5)
        deadline = time.monotonic() + 15
        row = None
        while row is None and time.monotonic() < deadline:
            try:
                row = await db.fetchrow("SELECT client_address FROM client_connections WHERE user_id = $1",
                                        uid + "u")
            except (asyncpg.UndefinedColumnError, asyncpg.UndefinedTableError):
                pass   # the server has not made the table (a new database) or added the column yet
            await asyncio.sleep(0.3)
        assert row is not None and row["client_address"] == "203.0.113.77"
        logs = s.logs()
        connect = [json.loads(line) for line in logs.splitlines() if '"event": "connect"' in line]
        assert connect and connect[-1]["peer"] == "203.0.113.77"
        assert "203.0.113.78" in logs and "forged" not in logs   # the address is logged, the token never
    finally:
        s.stop()
