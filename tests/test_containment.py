"""A fault in one client stays with that client (issue 10, part 5).

The server runs in this process, on real sockets with real clients, so that
one connection's transport can be made to fail: its `write` raises, as
uvloop's does on a handle that is already closed. Every other client must
still get that tick and the next ones, and the failing client is closed (it
resumes to a full snapshot), not silently left without the tick's messages.
"""
import asyncio
import json
import time
import types

import aiohttp
import websockets
import pytest

from conftest import Client, in_process, token, update
from realtime.session import Session


class Broken:
    """A transport whose writes raise; everything else is the real one's."""

    def __init__(self, real):
        self._real = real
        self.calls = 0

    def write(self, data):
        self.calls += 1
        raise RuntimeError("unable to perform operation on <TCPTransport closed=True>")

    def __getattr__(self, name):
        return getattr(self._real, name)


@pytest.fixture
async def inproc():
    app, runner, port = await in_process(tick_ms=20)
    srv = types.SimpleNamespace(url=f"http://127.0.0.1:{port}", ws_url=f"ws://127.0.0.1:{port}/ws",
                                hub=app["hub"])
    async with aiohttp.ClientSession() as http:
        async def post(updates):
            async with http.post(srv.url + "/api/ingest", data=json.dumps(updates),
                                 headers={"Authorization": f"Bearer {token('feeder', ['ingest'])}"}) as r:
                assert r.status in (200, 202), await r.text()
        srv.ingest = post
        try:
            yield srv
        finally:
            await runner.cleanup()


def _session(hub, client_id) -> Session:
    [s] = [s for s in hub.sessions.values() if s.client_id == client_id]
    return s


@pytest.mark.parametrize("deflate", [False, True], ids=["compiled-fan-out", "deflate-writer"])
async def test_a_write_that_raises_closes_that_client_only(inproc, uid, deflate):
    ext = {"compression": "deflate"} if deflate else {"compression": None}
    victim = await Client.connect(inproc, token(), **ext)
    others = [await Client.connect(inproc, token(), **ext) for _ in range(3)]
    welcome = await victim.recv_type("welcome")
    for c in [victim, *others]:
        await c.subscribe(subscriptions={"vehicles": [], "groups": []})
    s = _session(inproc.hub, welcome["client"])
    assert s.transport.deflate is deflate
    before = Session.write_errors
    broken = Broken(s.transport.transport)
    s.transport.transport = broken
    await inproc.ingest([update(f"{uid}-{i}") for i in range(3)])
    for c in others:
        seen = await c.wait_messages(lambda m: m.get("v") == f"{uid}-2")
        assert {m["v"] for m in seen if m.get("t") == "full"} >= {f"{uid}-{i}" for i in range(3)}
    assert broken.calls == 1, "the failing client was written once, then closed"
    assert s.closed and s.close_reason == "write failed: resume"
    assert Session.write_errors == before + 1
    # the tick goes on: later updates reach everybody else
    await inproc.ingest([update(f"{uid}-late")])
    for c in others:
        await c.wait_messages(lambda m: m.get("v") == f"{uid}-late")
    assert broken.calls == 1
    # and the closed client's connection is gone from the hub
    for _ in range(100):
        if s.row < 0:
            break
        await asyncio.sleep(0.05)
    assert s.row < 0 and all(x is not s for x in inproc.hub.sessions.values())
    for c in [victim, *others]:
        await c.close()


async def test_a_reply_write_that_raises_closes_that_client_only(inproc, uid):
    victim = await Client.connect(inproc, token())
    other = await Client.connect(inproc, token())
    welcome = await victim.recv_type("welcome")
    await other.recv_type("welcome")
    s = _session(inproc.hub, welcome["client"])
    s.transport.transport = Broken(s.transport.transport)
    await victim.send({"type": "ping", "id": "p1"})   # the pong's write raises
    for _ in range(100):
        if s.closed:
            break
        await asyncio.sleep(0.02)
    assert s.closed and s.close_reason == "write failed: resume"
    await other.send({"type": "ping", "id": "p2"})
    assert (await other.recv_type("pong"))["id"] == "p2"
    await other.close()
    await victim.close()


async def test_a_resume_past_what_this_instance_read_is_refused_not_repeated(inproc, uid):
    """A client that got further in the log than this instance has read
    (its tail is behind) is told to try again (1013): a replay would be empty
    and the events in between would reach it a second time."""
    hub = inproc.hub
    c = await Client.connect(inproc, token())
    w = await c.recv_type("welcome")
    await inproc.ingest([update(uid)])
    await c.subscribe(subscriptions={"vehicles": [uid]})
    for n in range(2):
        await hub.stores.publish_event(uid, "e", {"n": n}, 0, False)
    got = await c.wait_messages(lambda m: m.get("t") == "event" and m["d"]["n"] == 1)
    last = [m for m in got if m.get("t") == "event"][-1]["eid"]
    await c.close()
    behind = [m for m in got if m.get("t") == "event"][0]["eid"]
    hub.last_eid = behind             # as if this instance's tail lagged
    c2 = await Client.connect(inproc, token(), f"resume={w['session']}&last_event={last}")
    with pytest.raises(websockets.ConnectionClosed) as e:
        await c2.recv_type("welcome", timeout=10)
    assert e.value.rcvd.code == 1013 and "behind the event log" in e.value.rcvd.reason


async def test_events_held_during_a_replay_keep_to_rights_narrowed_meanwhile(inproc, uid):
    """While a resume's replay runs, the hub holds the client's live events.
    A refresh that takes vehicle a away meanwhile sends a's `leave` at once;
    the catch-up after the replay sends b's held event and not a's (it used
    to send a's after the `leave`, outside the rights in force)."""
    hub = inproc.hub
    a, b = uid + "a", uid + "b"
    c = await Client.connect(inproc, token(sub=uid, permissions=(), vehicles=[a, b]))
    w = await c.recv_type("welcome")
    await inproc.ingest([update(a), update(b, 59.93, 30.31)])
    _, first = await c.subscribe(subscriptions={"vehicles": [a, b]})
    if {m["v"] for m in first if m["t"] == "full"} != {a, b}:
        await c.wait_messages(lambda m: m.get("t") == "full")
    s = _session(hub, w["client"])
    hub.hold_for_replay(s)            # as a resume's replay does (replay.run)
    for vid in (a, b):
        await hub.stores.publish_event(vid, "e", {"of": vid}, 0, False)
    for _ in range(200):
        if len(s.held) == 2:
            break
        await asyncio.sleep(0.02)
    assert len(s.held) == 2           # one event of each, held

    await c.send({"type": "refresh", "token": token(sub=uid, permissions=(), vehicles=[b]), "id": "r"})
    seen = await c.wait_messages(lambda m: m.get("t") == "leave")
    assert {m["v"] for m in seen if m["t"] == "leave"} == {a}

    hub.replay_done(s)
    got = await c.wait_messages(lambda m: m.get("t") == "event")
    got += await c.messages(0.5)
    assert [m["d"]["of"] for m in got if m.get("t") == "event"] == [b]
    await c.close()


async def test_a_replay_does_not_send_what_it_chose_before_the_rights_narrowed(inproc, uid, monkeypatch):
    """A replay read from the stores keeps the events it chose from a page
    until its batch is full; rights that narrow while it waits for the next
    page send their `leave`, and what it had chosen for the vehicle taken
    away must not follow (it did). The next page's read is held until the
    refresh has been applied."""
    from realtime import replay
    hub = inproc.hub
    a, b = uid + "a", uid + "b"
    c = await Client.connect(inproc, token(sub=uid, permissions=(), vehicles=[a, b]))
    w = await c.recv_type("welcome")
    await inproc.ingest([update(a), update(b, 59.93, 30.31)])
    await c.subscribe(subscriptions={"vehicles": [a, b]})
    s = _session(hub, w["client"])
    start = hub.last_eid or "0-0"
    for vid in (a, b, b):
        await hub.stores.publish_event(vid, "e", {"of": vid}, 0, False)
    for _ in range(200):
        if len(hub.stores.log) >= 3 and hub.last_eid == hub.stores.log[-1].eid:
            break
        await asyncio.sleep(0.02)
    log = hub.stores.log[-3:]
    await c.messages(0.3)                         # the live copies of the three

    gate = asyncio.Event()
    reads = []

    async def events_page(after, upto, limit):
        reads.append(after)
        if len(reads) == 1:
            return log[:2]                        # a's and the first b's
        await gate.wait()                         # the refresh lands meanwhile
        return log[2:]
    monkeypatch.setattr(hub.stores, "events_page", events_page)
    monkeypatch.setattr(hub.recent, "between", lambda after, upto: None)   # read from the stores
    hub.hold_for_replay(s)
    task = asyncio.ensure_future(replay.run(hub, s, start, log[-1].eid))
    while len(reads) < 2:
        await asyncio.sleep(0.01)
    await c.send({"type": "refresh", "token": token(sub=uid, permissions=(), vehicles=[b]), "id": "r"})
    seen = await c.wait_messages(lambda m: m.get("t") == "leave")
    assert {m["v"] for m in seen if m["t"] == "leave"} == {a}
    gate.set()
    await task
    got = await c.messages(1.0)
    replayed = [m["d"]["of"] for m in got if m.get("t") == "event"]
    assert replayed == [b, b], replayed
    await c.close()


async def test_sessions_by_user_follow_connections_and_are_released(inproc):
    """The hub's index of sessions by user (what an ACL update reaches)
    holds exactly the attached sessions, and nothing once they are gone."""
    hub = inproc.hub
    users = ["alice", "bob", "carol"]
    clients = []
    for i in range(30):
        c = await Client.connect(inproc, token(users[i % 3]))
        await c.recv_type("welcome")
        clients.append(c)
    for u in users:
        assert {s.client_id for s in hub._by_user[u]} == \
            {s.client_id for s in hub.sessions.values() if s.claims.sub == u}
        assert len(hub._by_user[u]) == 10
    for c in clients[:15]:
        await c.close()
    deadline = time.monotonic() + 10
    while sum(len(v) for v in hub._by_user.values()) > 15 and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert sum(len(v) for v in hub._by_user.values()) == 15 == len(hub.sessions)
    for c in clients[15:]:
        await c.close()
    deadline = time.monotonic() + 10
    while hub._by_user and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert hub._by_user == {} and not hub.sessions
