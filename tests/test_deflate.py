"""permessage-deflate on the wire (PROTOCOL §3: "permessage-deflate is offered").

A raw socket client, so the test sees the negotiated extension and each
frame's RSV1 bit; the payload is inflated exactly as RFC 7692 §7.2.2 says."""
import json
import time
import zlib

import pytest

from conftest import RawClient, Server, ingest, update
from realtime.transports import deflate

pytestmark = pytest.mark.integration


def fleet(uid, n=200):
    t0 = int(time.time() * 1000)
    return [update(f"{uid}-{i:03d}", 55.0 + i / 1000, 37.0 + i / 1000, t0, speed=30, course=90,
                   status="moving", vehicle_type="truck", groups=[uid]) for i in range(n)]


async def test_deflate_negotiated_without_context_takeover_and_big_batches_compressed(server, uid):
    assert ingest(server, fleet(uid))[0] == 200
    c = await RawClient.connect(server, "permessage-deflate; client_max_window_bits")
    assert "permessage-deflate" in c.headers and "server_no_context_takeover" in c.headers
    rsv1, welcome = await c.message()
    assert welcome["type"] == "welcome" and rsv1 is False   # small: sent as is
    c.send({"type": "subscribe", "id": "s", "subscriptions": {"groups": [uid]}})
    _, sub = await c.until("subscribed")
    assert sub["visible"] == 200
    rsv1, snap = await c.until("batch")
    assert rsv1 is True
    assert sorted(m["v"] for m in snap["messages"]) == [f"{uid}-{i:03d}" for i in range(200)]
    # a second, plain client gets the same content uncompressed
    p = await RawClient.connect(server, None)
    assert "sec-websocket-extensions" not in p.headers
    await p.until("welcome")
    p.send({"type": "subscribe", "id": "s", "subscriptions": {"groups": [uid]}})
    await p.until("subscribed")
    rsv1, plain = await p.until("batch")
    assert rsv1 is False and plain["messages"] == snap["messages"]
    # live: both receive the same tick's body; each has its own seq in the envelope
    ingest(server, [dict(u, timestamp=u["timestamp"] + 1000, position={"lat": 56.0, "lon": 38.0})
                    for u in fleet(uid)])
    (rz, bz), (rp, bp) = await c.until("batch"), await p.until("batch")
    assert rz is True and rp is False
    assert bz["messages"] == bp["messages"] and len(bz["messages"]) == 200
    assert bz["seq"] == snap["seq"] + 1 and bp["seq"] == plain["seq"] + 1
    c.close()
    p.close()


async def test_deflate_off_is_never_negotiated(uid):
    s = Server("--simulate", "0", "--ws-deflate", "off")
    try:
        c = await RawClient.connect(s, "permessage-deflate")
        assert "sec-websocket-extensions" not in c.headers
        rsv1, w = await c.message()
        assert w["type"] == "welcome" and rsv1 is False
        c.close()
    finally:
        s.stop()


def test_envelope_around_a_shared_compressed_body_inflates_to_the_whole_message():
    body = json.dumps([{"t": "pos", "v": f"v{i}", "p": [55.0, 37.0]} for i in range(100)]).encode()
    for prefix, suffix in ((b'{"seq":1,"messages":', b"}"), (b"\x82\xa3seq\x01\xa8messages", b"")):
        payload = deflate.envelope_message(prefix, body, suffix)
        assert len(payload) < len(body) / 3
        out = zlib.decompressobj(-15).decompress(payload + b"\x00\x00\xff\xff")
        assert out == prefix + body + suffix
    whole = deflate.message(b"x" * 1000)
    assert zlib.decompressobj(-15).decompress(whole + b"\x00\x00\xff\xff") == b"x" * 1000


@pytest.mark.parametrize("bits,accepted", [(9, False), (10, True), (12, True)])
async def test_the_clients_server_max_window_bits_is_honoured_or_the_offer_declined(server, uid, bits, accepted):
    """RFC 7692 §7.1.2.1: the server must not use a larger window than the
    client allows. Bodies are compressed once for every client with a 1 KB
    window (deflate.WBITS): a client that allows less is served uncompressed."""
    assert ingest(server, fleet(uid))[0] == 200
    c = await RawClient.connect(server, f"permessage-deflate; server_max_window_bits={bits}")
    assert ("permessage-deflate" in c.headers) is accepted
    if accepted:
        assert f"server_max_window_bits={bits}" in c.headers
    await c.until("welcome")
    c.send({"type": "subscribe", "id": "s", "subscriptions": {"groups": [uid]}})
    await c.until("subscribed")
    rsv1, _, payload = await c.frame()
    assert rsv1 is accepted
    if accepted:   # inflates within the window the client allowed
        data = zlib.decompressobj(-bits).decompress(payload + b"\x00\x00\xff\xff")
        assert len(json.loads(data)["messages"]) == 200
    c.close()


async def test_a_snapshot_in_parts_is_compressed_part_by_part_and_what_follows_waits_behind_it(server, uid):
    """A snapshot of several batches (§3.4) is compressed one part per turn of
    the event loop, so that a big one does not hold every other client's tick
    (test_large_work). What the client is sent meanwhile waits behind it: two
    subscribes in one read get their replies and snapshots in order, each
    snapshot whole and in parts (`more` on all but its last), seqs consecutive."""
    n = 1800   # two parts; under --max-visible's 2000, which would cluster the view
    assert ingest(server, fleet(uid, n)) == (200, {"accepted": n, "rejected": []})
    c = await RawClient.connect(server, "permessage-deflate; client_max_window_bits")
    await c.until("welcome")
    # one write: the server reads both at once, and the second reply comes
    # while the first snapshot's second part still waits to be compressed
    c.send(*({"type": "subscribe", "id": rid, "subscriptions": {"groups": [uid]}} for rid in ("a", "b")))
    got = []
    while sum(len(m.get("messages", ())) for _, m in got) < 2 * n:
        got.append(await c.message())
    kinds = [(m["type"], m.get("id"), m.get("more", False)) for _, m in got]
    assert kinds == [("subscribed", "a", False), ("batch", None, True), ("batch", None, False),
                     ("subscribed", "b", False), ("batch", None, True), ("batch", None, False)]
    batches = [m for _, m in got if m["type"] == "batch"]
    assert all(rsv1 for rsv1, m in got if m["type"] == "batch")
    assert [b["seq"] for b in batches] == list(range(batches[0]["seq"], batches[0]["seq"] + 4))
    want = sorted(f"{uid}-{i:03d}" for i in range(n))
    for snap in (batches[:2], batches[2:]):
        assert sorted(m["v"] for b in snap for m in b["messages"] if m["t"] == "full") == want
    c.close()
