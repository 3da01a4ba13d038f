"""The protobuf wire format of realtime/proto/realtime/v1/realtime.proto,
written and read here directly (the format is small and stable), for two
reasons:
- "encode once, send to many": a `Batch` is its fields one after another,
  so the `messages` of a batch body shared by many clients are encoded once
  (batch_body) and each stream only prefixes its own `batch_id` and `seq`;
- no generated code and no protobuf runtime in the server, so no version of
  the two to keep in step (protobuf 7 refuses generated code from another
  major version). tests/test_grpc.py checks these bytes against classes
  generated from the .proto by grpcio-tools, both ways.
"""
from __future__ import annotations

import math
import struct

import msgpack

_double = struct.Struct("<d").pack
_SMALL = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n] if n >= 0 else varint(n & 0xFFFFFFFFFFFFFFFF)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


# tags: (field << 3) | wire type (0 varint, 1 64-bit, 2 length-delimited)
T = {(f, w): _tag(f, w) for f in range(1, 16) for w in (0, 1, 2)}


def ld(field: int, data: bytes) -> bytes:
    return T[field, 2] + varint(len(data)) + data


def s(field: int, v) -> bytes:
    """A string field; proto3 leaves out the empty string."""
    if v is None or v == "":
        return b""
    return ld(field, str(v).encode())


def d(field: int, v) -> bytes:
    return T[field, 1] + _double(float(v))


def i64(field: int, v) -> bytes:
    return T[field, 0] + varint(int(v))


def b(field: int, v: bool) -> bytes:
    return T[field, 0] + (b"\x01" if v else b"\x00")


# ---------------------------------------------------------------- google.protobuf.Struct / Value
def value(x) -> bytes:
    """A google.protobuf.Value (its body)."""
    if x is None:
        return b"\x08\x00"
    if x is True or x is False:
        return b"\x20\x01" if x else b"\x20\x00"
    if isinstance(x, (int, float)):
        f = float(x)
        return b"\x11" + _double(f if math.isfinite(f) else 0.0)
    if isinstance(x, str):
        return ld(3, x.encode())
    if isinstance(x, dict):
        return ld(5, struct_(x))
    if isinstance(x, (list, tuple)):
        return ld(6, b"".join(ld(1, value(v)) for v in x))
    return ld(3, str(x).encode())


def struct_(obj: dict) -> bytes:
    """A google.protobuf.Struct (its body): map<string, Value> fields = 1."""
    return b"".join(ld(1, ld(1, str(k).encode()) + ld(2, value(v))) for k, v in obj.items())


# ---------------------------------------------------------------- §3.1 messages
def _position(p) -> bytes:
    return d(1, p[0]) + d(2, p[1])


def _full(m: dict) -> bytes:
    out = [s(1, m.get("v")), ld(2, _position(m["p"])), d(3, m.get("s") or 0), d(4, m.get("c") or 0),
           s(5, m.get("st")), s(6, m.get("vt")), i64(7, m.get("ts") or 0)]
    out += [ld(8, str(a).encode()) for a in m.get("al") or ()]
    if isinstance(m.get("dr"), dict):
        out.append(ld(9, struct_(m["dr"])))
    if isinstance(m.get("as"), dict):
        out.append(ld(10, struct_(m["as"])))
    return b"".join(out)


def _pos(m: dict) -> bytes:
    return b"".join((s(1, m.get("v")), ld(2, _position(m["p"])), d(3, m.get("s") or 0),
                     d(4, m.get("c") or 0), i64(5, m.get("ts") or 0)))


def _delta(m: dict) -> bytes:
    ch = m.get("ch") or {}
    out = [s(1, m.get("v")), i64(2, m.get("ts") or 0)]
    if "p" in ch:
        out.append(ld(3, _position(ch["p"])))
    if "s" in ch:
        out.append(d(4, ch["s"] or 0))
    if "c" in ch:
        out.append(d(5, ch["c"] or 0))
    if "st" in ch:   # optional: present even when empty
        out.append(ld(6, str(ch["st"]).encode()))
    if "vt" in ch:
        out.append(ld(7, str(ch["vt"]).encode()))
    if "al" in ch:
        out.append(ld(8, b"".join(ld(1, str(a).encode()) for a in ch["al"] or ())))
    if "dr" in ch:
        out.append(ld(9, value(ch["dr"])))
    if "as" in ch:
        out.append(ld(10, value(ch["as"])))
    return b"".join(out)


def _leave(m: dict) -> bytes:
    return s(1, m.get("v")) + s(2, m.get("r"))


def _event(m: dict) -> bytes:
    body = m.get("d")
    return b"".join((s(1, m.get("v")), s(2, m.get("e")),
                     ld(3, struct_(body if isinstance(body, dict) else {"value": body})),
                     s(4, m.get("eid")), i64(5, m.get("ts") or 0)))


def _clusters(m: dict) -> bytes:
    out = [d(1, m.get("z") or 0)]
    for cell in m.get("cells") or ():
        body = d(1, cell[0]) + d(2, cell[1]) + i64(3, cell[2])
        if len(cell) > 3 and isinstance(cell[3], (list, tuple)):   # the status breakdown
            body += b"".join(i64(4 + k, n) for k, n in enumerate(cell[3][:4]) if n)
        out.append(ld(2, body))
    return b"".join(out)


_KINDS = {"full": (1, _full), "pos": (2, _pos), "delta": (3, _delta), "leave": (4, _leave),
          "event": (5, _event), "clusters": (6, _clusters)}


def message(m: dict) -> bytes:
    """One §3.1 message as a realtime.v1.Message (its body)."""
    field, enc = _KINDS[m["t"]]
    return ld(field, enc(m))


def batch_body(msgpack_body: bytes, pieces: dict | None = None) -> bytes:
    """The `messages` of a Batch from the core's msgpack body (an array of
    §3.1 maps): the part that clients with the same body share. With
    `pieces` (raw msgpack of one message -> its protobuf), each vehicle's
    message is converted once however many bodies carry it: clients with
    their own viewports each have a body of their own, made of the same
    per-vehicle pieces (the core encodes each once per tick)."""
    if pieces is None:
        return b"".join(ld(3, message(m)) for m in msgpack.unpackb(msgpack_body))
    u = msgpack.Unpacker()
    u.feed(msgpack_body)
    out = []
    start = None
    for _ in range(u.read_array_header()):
        start = u.tell()
        u.skip()
        raw = msgpack_body[start:u.tell()]
        pb = pieces.get(raw)
        if pb is None:
            pb = pieces[raw] = ld(3, message(msgpack.unpackb(raw)))
        out.append(pb)
    return b"".join(out)


def batch_head(batch_id: bytes, seq: int, more: bool = False) -> bytes:
    """Batch's fields before its messages; `more` (7) only when true, as proto3 does."""
    return ld(1, batch_id) + i64(2, seq) + (b(7, True) if more else b"")


def notice(obj: dict) -> bytes | None:
    """A server message other than a batch, as a Batch with seq 0 carrying
    it (`welcome`, `token_expiring`, `reconnect`); None for the others,
    which have no place on a one-way stream (replies, errors of commands)."""
    kind = obj.get("type")
    if kind == "welcome":
        return ld(4, b"".join((s(1, obj.get("client")), s(2, obj.get("session")), b(3, obj.get("resumed")),
                                b(4, obj.get("recovered")), i64(5, obj.get("heartbeat_s") or 0),
                                b(6, obj.get("restored")))))
    if kind == "token_expiring":
        return ld(5, i64(1, obj.get("in_s") or 0))
    if kind == "reconnect":
        return ld(6, s(1, obj.get("reason")) + i64(2, obj.get("after_ms") or 0))
    return None


# ---------------------------------------------------------------- reading StreamRequest
class WireError(ValueError):
    pass


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise WireError("truncated or oversized varint")
        c = data[i]
        i += 1
        n |= (c & 0x7F) << shift
        if c < 0x80:
            return n, i
        shift += 7


def fields(data: bytes):
    """(field number, wire type, value) of a message: an int for varints,
    bytes otherwise. Unknown fields are skipped by the caller, as protobuf
    readers do."""
    i, n = 0, len(data)
    while i < n:
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            v, i = _read_varint(data, i)
        elif wire == 1:
            v, i = data[i:i + 8], i + 8
        elif wire == 2:
            size, i = _read_varint(data, i)
            v, i = data[i:i + size], i + size
        elif wire == 5:
            v, i = data[i:i + 4], i + 4
        else:
            raise WireError(f"wire type {wire} is not supported")
        if i > n or field == 0:
            raise WireError("truncated message")
        yield field, wire, v


def _text(v, wire) -> str:
    if wire != 2:
        raise WireError("a string field has the wrong wire type")
    try:
        return v.decode()
    except UnicodeDecodeError:
        raise WireError("a string is not UTF-8") from None


def _num(v, wire) -> float:
    if wire != 1:
        raise WireError("a double field has the wrong wire type")
    return struct.unpack("<d", v)[0]


def stream_request(data: bytes) -> tuple[dict, str, str]:
    """StreamRequest -> (a §3 `subscribe` body as a dict, session, last_event)."""
    subs: dict = {}
    filters: dict = {}
    session = last_event = ""
    for f, w, v in fields(data):
        if f == 1 and w == 2:
            for f2, w2, v2 in fields(v):
                if f2 in (1, 2):
                    subs.setdefault("vehicles" if f2 == 1 else "groups", []).append(_text(v2, w2))
                elif f2 == 3 and w2 == 2:
                    geo: dict = {}
                    for f3, w3, v3 in fields(v2):
                        if f3 == 1 and w3 == 2:
                            names = {1: "north", 2: "south", 3: "east", 4: "west"}
                            geo["bounds"] = {k: 0.0 for k in names.values()}
                            for f4, w4, v4 in fields(v3):
                                if f4 in names:
                                    geo["bounds"][names[f4]] = _num(v4, w4)
                        elif f3 == 2:
                            geo["zoom"] = _num(v3, w3)
                    subs["geographic"] = geo
        elif f == 2 and w == 2:
            for f2, w2, v2 in fields(v):
                if f2 in (1, 2):
                    filters.setdefault("status" if f2 == 1 else "vehicle_types", []).append(_text(v2, w2))
                elif f2 == 3 and w2 == 0:
                    filters["show_alerts"] = bool(v2)
        elif f == 3:
            session = _text(v, w)
        elif f == 4:
            last_event = _text(v, w)
    return {"type": "subscribe", "subscriptions": subs, "filters": filters}, session, last_event
