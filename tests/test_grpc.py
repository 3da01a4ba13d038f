"""gRPC streaming (PROTOCOL §4) against a real server process, with a client
generated at test time by grpcio-tools from the .proto the package ships."""
import asyncio
import importlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc import aio

from conftest import ROOT, Server, free_port, ingest, metric_value, token, update

pytestmark = pytest.mark.integration

PROTO = Path(ROOT) / "realtime" / "proto" / "realtime" / "v1" / "realtime.proto"


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """(realtime_pb2, realtime_pb2_grpc) generated from the shipped .proto."""
    d = tmp_path_factory.mktemp("grpc_client")
    shutil.copy(PROTO, d / "realtime.proto")
    from grpc_tools import protoc
    import grpc_tools
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    rc = protoc.main(["protoc", f"-I{d}", f"-I{include}", f"--python_out={d}", f"--grpc_python_out={d}",
                      str(d / "realtime.proto")])
    assert rc == 0, "the .proto does not compile"
    sys.path.insert(0, str(d))
    try:
        yield importlib.import_module("realtime_pb2"), importlib.import_module("realtime_pb2_grpc")
    finally:
        sys.path.remove(str(d))


@pytest.fixture(scope="module")
def gserver():
    gport = free_port()
    s = Server("--simulate", "0", "--tick-ms", "20", "--grpc-port", str(gport))
    s.grpc = f"127.0.0.1:{gport}"
    yield s
    s.stop()


def meta(tok=None):
    return (("authorization", f"Bearer {tok or token()}"),)


async def take(call, n_batches=None, until=None, timeout=10.0):
    """Batches from a call until `until(batches)` (or n of them)."""
    got = []

    async def run():
        async for b in call:
            got.append(b)
            if (until and until(got)) or (n_batches and len(got) >= n_batches):
                return
    await asyncio.wait_for(run(), timeout)
    return got


def kinds(batches):
    return [(m.WhichOneof("kind"), getattr(m, m.WhichOneof("kind"))) for b in batches for m in b.messages]


async def test_a_stream_carries_typed_batches(gserver, pb, uid):
    realtime_pb2, realtime_pb2_grpc = pb
    ingest(gserver, [update(uid, 55.75, 37.62, status="moving", vehicle_type="truck", speed=42.5,
                            driver={"name": "Ann", "phone": "+100"})])
    async with aio.insecure_channel(gserver.grpc) as ch:
        stub = realtime_pb2_grpc.RealtimeStub(ch)
        req = realtime_pb2.StreamRequest(subscriptions=realtime_pb2.Subscriptions(vehicles=[uid]))
        call = stub.Stream(req, metadata=meta())
        first = await take(call, 2)
        assert first[0].seq == 0 and first[0].welcome.session.startswith("s_")
        assert first[0].welcome.resumed is False and first[0].welcome.heartbeat_s > 0
        assert first[1].seq == 1 and first[1].batch_id
        (kind, full), = kinds(first[1:])
        assert kind == "full" and full.vehicle == uid and full.status == "moving"
        assert (full.position.lat, full.position.lon) == (55.75, 37.62) and full.vehicle_type == "truck"
        assert full.speed == 42.5 and full.driver.fields["name"].string_value == "Ann"
        assert metric_value(gserver, 'websocket_connections_active{transport="grpc"}') == 1
        ingest(gserver, [update(uid, 55.76, 37.63, status="moving", vehicle_type="truck", speed=42.5)])
        more = await take(call, until=lambda bs: any(k == "pos" for k, _ in kinds(bs)))
        (kind, pos), = [(k, m) for k, m in kinds(more) if k == "pos"]
        assert pos.vehicle == uid and pos.position.lat == 55.76
        assert [b.seq for b in first[1:] + more] == list(range(1, len(more) + 2))
        ingest(gserver, [update(uid, 55.76, 37.63, status="idle", vehicle_type="truck", speed=0,
                                alerts=["overspeed"])])
        more = await take(call, until=lambda bs: any(k == "event" for k, _ in kinds(bs)))
        events = [m for k, m in kinds(more) if k == "event"]
        assert events[0].type == "alert" and events[0].eid and events[0].body.fields["alert"].string_value == "overspeed"
        call.cancel()
    for _ in range(50):
        if metric_value(gserver, 'websocket_connections_active{transport="grpc"}') == 0:
            break
        await asyncio.sleep(0.1)
    assert metric_value(gserver, 'websocket_connections_active{transport="grpc"}') == 0


async def test_a_snapshot_in_parts_is_converted_as_the_stream_takes_it_and_stays_in_order(gserver, pb, uid):
    """A snapshot of several batches (§3.4) is converted to protobuf part by
    part as the stream writes it (GrpcOutlet.take), not all at once; a tick
    that moves its vehicles meanwhile still reaches the client after it."""
    realtime_pb2, realtime_pb2_grpc = pb
    n = 1800   # two parts, under --max-visible's 2000
    t0 = int(time.time() * 1000)
    fleet = [update(f"{uid}-{i:04d}", 55.0 + i / 1e4, 37.0, t0, groups=[uid]) for i in range(n)]
    assert ingest(gserver, fleet) == (200, {"accepted": n, "rejected": []})
    async with aio.insecure_channel(gserver.grpc) as ch:
        stub = realtime_pb2_grpc.RealtimeStub(ch)
        req = realtime_pb2.StreamRequest(subscriptions=realtime_pb2.Subscriptions(groups=[uid]))
        call = stub.Stream(req, metadata=meta())
        welcome = await take(call, 1)
        assert welcome[0].welcome.session
        ingest(gserver, [dict(u, timestamp=t0 + 1000, position={"lat": 56.0, "lon": 38.0}) for u in fleet])
        at: dict[str, tuple] = {}   # each vehicle's latest position, as the client sees it

        def seen(batches) -> bool:   # take() calls it after each batch
            for kind, v in kinds(batches[-1:]):
                if kind == "full":
                    assert v.vehicle not in at, "a vehicle's full came twice or after a change"
                elif kind == "pos":
                    assert v.vehicle in at, "a change came before the vehicle's snapshot"
                if kind in ("full", "pos"):
                    at[v.vehicle] = (v.position.lat, v.position.lon)
            return len(at) == n and set(at.values()) == {(56.0, 38.0)}
        batches = await take(call, until=seen)
        assert [b.seq for b in batches] == list(range(1, 1 + len(batches)))
        assert [b.more for b in batches[:2]] == [True, False]
        assert sum(k == "full" for k, _ in kinds(batches[:2])) == n
        call.cancel()


async def test_a_stream_whose_reader_takes_nothing_is_let_go(pb):
    """A client that keeps its connection but stops taking messages (HTTP/2
    flow control: the server's write never completes) is closed after
    --pong-timeout-s, as a WebSocket client that answers no ping: its session,
    core row and per-user slot come back. It used to hold them for as long as
    it kept the connection (grpc's write cannot be cancelled, and the call's
    status waits behind it)."""
    realtime_pb2, realtime_pb2_grpc = pb
    gport = free_port()
    s = Server("--simulate", "3000", "--grpc-port", str(gport), "--heartbeat-s", "1", "--pong-timeout-s", "3",
               "--max-visible", "100000", "--max-connections-per-user", "1")
    grpc_active = 'websocket_connections_active{transport="grpc"}'
    try:
        # no BDP probing: the window stays small, and the stream fills it at once
        async with aio.insecure_channel(f"127.0.0.1:{gport}", options=[("grpc.http2.bdp_probe", 0)]) as ch:
            stub = realtime_pb2_grpc.RealtimeStub(ch)
            stuck = stub.Stream(realtime_pb2.StreamRequest(subscriptions=realtime_pb2.Subscriptions()),
                                metadata=meta())
            assert (await take(stuck, 1))[0].welcome.session   # then it reads nothing more
            assert metric_value(s, grpc_active) == 1
            for _ in range(150):
                if metric_value(s, grpc_active) == 0:
                    break
                await asyncio.sleep(0.1)
            assert metric_value(s, grpc_active) == 0, "the stalled stream is still held"
            assert '"reason": "no pong for 3 s"' in s.logs(None)
            # grpc keeps the call until the client reads (it counts against the address)
            assert metric_value(s, "grpc_calls_lingering") == 1
            # the user's one slot is free again: a new stream is served
            async with aio.insecure_channel(f"127.0.0.1:{gport}") as ch2:
                fresh = realtime_pb2_grpc.RealtimeStub(ch2).Stream(
                    realtime_pb2.StreamRequest(subscriptions=realtime_pb2.Subscriptions(vehicles=["sim-00001"])),
                    metadata=meta())
                assert (await take(fresh, 1))[0].welcome.session
                fresh.cancel()
            # reading again, the stalled client gets what was in flight, then the status
            with pytest.raises(aio.AioRpcError) as ended:
                await take(stuck, until=lambda bs: False, timeout=20)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == "no pong for 3 s"
            for _ in range(50):
                if metric_value(s, "grpc_calls_lingering") == 0:
                    break
                await asyncio.sleep(0.1)
            assert metric_value(s, "grpc_calls_lingering") == 0
        assert "Traceback" not in s.logs(None)
    finally:
        s.stop()


async def test_grpc_status_codes(gserver, pb):
    realtime_pb2, realtime_pb2_grpc = pb
    async with aio.insecure_channel(gserver.grpc) as ch:
        stub = realtime_pb2_grpc.RealtimeStub(ch)
        for md, code in ((meta("nope"), grpc.StatusCode.UNAUTHENTICATED),
                         ((), grpc.StatusCode.UNAUTHENTICATED),
                         (meta(token(ttl=-10)), grpc.StatusCode.UNAUTHENTICATED),
                         (meta(token(permissions=[])), grpc.StatusCode.PERMISSION_DENIED)):
            with pytest.raises(aio.AioRpcError) as e:
                await take(stub.Stream(realtime_pb2.StreamRequest(), metadata=md), 1)
            assert e.value.code() == code
        # bytes that are not a StreamRequest, and a bounding box out of range
        raw = ch.unary_stream("/realtime.v1.Realtime/Stream", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
        with pytest.raises(aio.AioRpcError) as e:
            await take(raw(b"\x0a\xff\xff", metadata=meta()), 1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        bad = realtime_pb2.StreamRequest(subscriptions=realtime_pb2.Subscriptions(geographic=realtime_pb2.Geographic(
            bounds=realtime_pb2.Bounds(north=95, south=0, east=1, west=0))))
        with pytest.raises(aio.AioRpcError) as e:
            await take(stub.Stream(bad, metadata=meta()), 1)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_stream_resumes_with_session_and_last_event(gserver, pb, uid):
    realtime_pb2, realtime_pb2_grpc = pb
    ingest(gserver, [update(uid)])
    async with aio.insecure_channel(gserver.grpc) as ch:
        stub = realtime_pb2_grpc.RealtimeStub(ch)
        call = stub.Stream(realtime_pb2.StreamRequest(subscriptions=realtime_pb2.Subscriptions(vehicles=[uid])),
                           metadata=meta())
        got = await take(call, 2)
        session = got[0].welcome.session
        ingest(gserver, [update(uid, alerts=["first"])])
        got = await take(call, until=lambda bs: any(k == "event" for k, _ in kinds(bs)))
        last = [m for k, m in kinds(got) if k == "event"][-1].eid
        call.cancel()
        await asyncio.sleep(0.2)
        # while it is away
        ingest(gserver, [update(uid, alerts=[])])
        ingest(gserver, [update(uid, alerts=["second"])])
        await asyncio.sleep(0.3)
        call = stub.Stream(realtime_pb2.StreamRequest(session=session, last_event=last), metadata=meta())
        got = await take(call, until=lambda bs: any(k == "event" for k, _ in kinds(bs)))
        assert got[0].welcome.resumed is True and got[0].welcome.recovered is True
        assert got[0].welcome.session == session
        events = [m.body.fields["alert"].string_value for k, m in kinds(got) if k == "event"]
        assert events == ["second"]
        assert any(k == "full" and m.vehicle == uid for k, m in kinds(got))   # the subscription came back
        call.cancel()


def test_the_wire_encoding_matches_the_proto(pb):
    """grpc_wire's bytes, read by protobuf's own classes: every kind and field."""
    import msgpack
    from realtime.transports import grpc_wire as wire
    realtime_pb2, _ = pb
    msgs = [
        {"t": "full", "v": "v1", "p": [55.5, -37.25], "s": 12.5, "c": 270.0, "st": "moving", "vt": "van",
         "ts": 1764460000123, "al": ["a", "b"], "dr": {"name": "Ann", "n": 3, "ok": True, "x": None,
                                                      "l": [1, "two", {"k": False}]},
         "as": {"route": "R1"}},
        {"t": "pos", "v": "v2", "p": [1.0, 2.0], "s": 0, "c": 0, "ts": 5},
        {"t": "delta", "v": "v3", "ch": {"st": "offline", "al": [], "dr": None, "s": 0}, "ts": -1},
        {"t": "leave", "v": "v4", "r": "stale"},
        {"t": "event", "v": "v5", "e": "geofence_enter", "d": {"zone": "dock"}, "eid": "17-0", "ts": 9},
        {"t": "clusters", "z": 5, "cells": [[10.5, 20.25, 300, [250, 0, 40, 10]], [1, 2, 3, {"moving": 1}]]},
    ]
    packed = msgpack.packb(msgs)
    assert wire.batch_body(packed, {}) == wire.batch_body(packed)   # per-vehicle pieces: the same bytes
    data = wire.batch_head(b"inst-7", 42) + wire.batch_body(packed)
    b = realtime_pb2.Batch.FromString(data)
    assert b.batch_id == "inst-7" and b.seq == 42 and len(b.messages) == 6 and b.more is False
    # a part of a split snapshot that is not the last
    assert realtime_pb2.Batch.FromString(wire.batch_head(b"inst-7", 43, True) + wire.batch_body(packed)).more is True
    full = b.messages[0].full
    assert (full.vehicle, full.position.lat, full.position.lon, full.speed, full.course) == ("v1", 55.5, -37.25, 12.5, 270.0)
    assert (full.status, full.vehicle_type, full.ts, list(full.alerts)) == ("moving", "van", 1764460000123, ["a", "b"])
    from google.protobuf.json_format import MessageToDict
    assert MessageToDict(full.driver) == msgs[0]["dr"] and MessageToDict(full.assignment) == {"route": "R1"}
    pos = b.messages[1].pos
    assert (pos.vehicle, pos.position.lat, pos.ts) == ("v2", 1.0, 5)
    delta = b.messages[2].delta
    assert delta.HasField("status") and delta.status == "offline" and delta.HasField("alerts")
    assert list(delta.alerts.alerts) == [] and delta.driver.WhichOneof("kind") == "null_value"
    assert delta.HasField("speed") and delta.speed == 0 and not delta.HasField("course") and delta.ts == -1
    assert not delta.HasField("position") and not delta.HasField("assignment")
    assert (b.messages[3].leave.vehicle, b.messages[3].leave.reason) == ("v4", "stale")
    ev = b.messages[4].event
    assert (ev.vehicle, ev.type, ev.eid, ev.ts, MessageToDict(ev.body)) == ("v5", "geofence_enter", "17-0", 9, {"zone": "dock"})
    cl = b.messages[5].clusters
    assert cl.zoom == 5 and [(c.lat, c.lon, c.count) for c in cl.cells] == [(10.5, 20.25, 300), (1, 2, 3)]
    assert [(c.moving, c.idle, c.stopped, c.offline) for c in cl.cells] == [(250, 0, 40, 10), (0, 0, 0, 0)]
    w = realtime_pb2.Batch.FromString(wire.notice({"type": "welcome", "client": "c_1", "session": "s_1",
                                                   "resumed": True, "recovered": False, "heartbeat_s": 30,
                                                   "restored": True}))
    assert (w.seq, w.welcome.session, w.welcome.resumed, w.welcome.recovered, w.welcome.heartbeat_s,
            w.welcome.restored) == (0, "s_1", True, False, 30, True)
    r = realtime_pb2.Batch.FromString(wire.notice({"type": "reconnect", "reason": "shutdown", "after_ms": 750}))
    assert (r.reconnect.reason, r.reconnect.after_ms) == ("shutdown", 750)
    assert wire.notice({"type": "pong"}) is None
    # and the other way: a StreamRequest made by protobuf, read by grpc_wire
    req = realtime_pb2.StreamRequest(
        subscriptions=realtime_pb2.Subscriptions(vehicles=["a", "b"], groups=["g"], geographic=realtime_pb2.Geographic(
            bounds=realtime_pb2.Bounds(north=56, south=55, east=38, west=37), zoom=11)),
        filters=realtime_pb2.Filters(status=["moving"], vehicle_types=["van"], show_alerts=False),
        session="s_x", last_event="5-1")
    body, session, last_event = wire.stream_request(req.SerializeToString())
    assert (session, last_event) == ("s_x", "5-1")
    assert body["subscriptions"] == {"vehicles": ["a", "b"], "groups": ["g"], "geographic": {
        "bounds": {"north": 56.0, "south": 55.0, "east": 38.0, "west": 37.0}, "zoom": 11.0}}
    assert body["filters"] == {"status": ["moving"], "vehicle_types": ["van"], "show_alerts": False}
    assert wire.stream_request(b"") == ({"type": "subscribe", "subscriptions": {}, "filters": {}}, "", "")
    for bad in (b"\x0a\x05ab", b"\x0f", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x1a\x02\xff\xfe"):
        with pytest.raises(wire.WireError):
            wire.stream_request(bad)


async def test_grpc_over_tls(tmp_path, pb, uid):
    realtime_pb2, realtime_pb2_grpc = pb
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    gport = free_port()
    s = Server("--simulate", "0", "--grpc-port", str(gport), "--tls-cert", str(cert), "--tls-key", str(key),
               scheme="https")
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with aio.secure_channel(f"127.0.0.1:{gport}", creds) as ch:
            stub = realtime_pb2_grpc.RealtimeStub(ch)
            got = await take(stub.Stream(realtime_pb2.StreamRequest(), metadata=meta()), 2)
            assert got[0].welcome.session and got[1].seq == 1
        async with aio.insecure_channel(f"127.0.0.1:{gport}") as ch:   # plaintext is refused
            stub = realtime_pb2_grpc.RealtimeStub(ch)
            with pytest.raises(aio.AioRpcError) as e:
                await take(stub.Stream(realtime_pb2.StreamRequest(), metadata=meta()), 1, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE

        # SIGHUP: a renewed certificate for new gRPC connections too (docs/security.md)
        new_cert, new_key = tmp_path / "new.pem", tmp_path / "new.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(new_key), "-out", str(new_cert)], check=True, capture_output=True)
        old_cert = cert.read_bytes()
        key.write_bytes(new_key.read_bytes())
        cert.write_bytes(new_cert.read_bytes())
        s.proc.send_signal(signal.SIGHUP)
        deadline = asyncio.get_running_loop().time() + 10
        while "TLS certificate reloaded" not in s.logs():
            assert asyncio.get_running_loop().time() < deadline, s.logs()
            await asyncio.sleep(0.1)
        creds = grpc.ssl_channel_credentials(root_certificates=new_cert.read_bytes())
        async with aio.secure_channel(f"127.0.0.1:{gport}", creds) as ch:
            stub = realtime_pb2_grpc.RealtimeStub(ch)
            got = await take(stub.Stream(realtime_pb2.StreamRequest(), metadata=meta()), 1)
            assert got[0].welcome.session
        creds = grpc.ssl_channel_credentials(root_certificates=old_cert)
        async with aio.secure_channel(f"127.0.0.1:{gport}", creds) as ch:   # the old one is gone
            stub = realtime_pb2_grpc.RealtimeStub(ch)
            with pytest.raises(aio.AioRpcError) as e:
                await take(stub.Stream(realtime_pb2.StreamRequest(), metadata=meta()), 1, timeout=5)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.stop()


async def test_a_shutdown_says_reconnect_then_unavailable(pb):
    realtime_pb2, realtime_pb2_grpc = pb
    gport = free_port()
    s = Server("--simulate", "0", "--grpc-port", str(gport), "--shutdown-grace", "4")
    try:
        async with aio.insecure_channel(f"127.0.0.1:{gport}") as ch:
            stub = realtime_pb2_grpc.RealtimeStub(ch)
            call = stub.Stream(realtime_pb2.StreamRequest(), metadata=meta())
            await take(call, 2)
            s.proc.terminate()
            got = []
            with pytest.raises(aio.AioRpcError) as e:
                async for b in call:
                    got.append(b)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert [b.reconnect.reason for b in got if b.HasField("reconnect")] == ["shutdown"]
            assert 100 <= got[-1].reconnect.after_ms
        assert s.proc.wait(10) == 0
    finally:
        s.stop()


def test_the_grpc_address_brackets_an_ipv6_host():
    from realtime.transports.grpc_stream import grpc_address
    assert grpc_address("127.0.0.1", 50051) == "127.0.0.1:50051"
    assert grpc_address("::1", 50051) == "[::1]:50051"
    assert grpc_address("[::1]", 50051) == "[::1]:50051"
    assert grpc_address("localhost", 1) == "localhost:1"


def test_the_body_cache_is_bounded_by_the_bytes_it_holds():
    """The conversion cache of the gRPC transport is emptied past BYTES by
    what it really holds: pieces were counted as 200 bytes each, so 16 KiB
    events (or pieces with a driver and an assignment) could make the
    "32 MB" cache hold gigabytes before it was emptied."""
    import msgpack
    from realtime.transports.grpc_stream import BodyCache
    cache = BodyCache()
    cache.BYTES = 4 << 20
    held = 0
    for i in range(2000):   # ~64 MB of pieces, each body of its own (kept whole: over BODY_MAX)
        body = msgpack.packb([{"t": "event", "v": f"v{i}-{k}", "e": "note", "d": {"text": "x" * 16000},
                               "eid": f"{i}-{k}", "ts": i} for k in range(5)])
        assert cache.get(body)
        real = sum(len(k) + len(v) for k, v in cache.pieces.items()) + \
            sum(len(k) + len(v) for k, v in cache.bodies.items())
        held = max(held, real)
    assert held <= cache.BYTES + 200_000   # at most one body past the bound
