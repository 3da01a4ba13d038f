"""Inbound client messages as typed structs, validated once at the edge.

PROTOCOL §3. A text frame is JSON, a binary frame msgpack, whatever the
connection's output format. `parse` returns a struct or raises ProtocolError
with the documented error code; handlers `match` on the struct type.
"""
from __future__ import annotations

import math
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from ._core._schema import STATUSES

Lat = Annotated[float, Meta(ge=-90, le=90)]
Lon = Annotated[float, Meta(ge=-180, le=180)]
Zoom = Annotated[float, Meta(ge=0, le=30)]
Name = Annotated[str, Meta(min_length=1, max_length=128)]
StatusName = Annotated[str, Meta(pattern="^(" + "|".join(STATUSES[:4]) + ")$")]
# any JSON string or number, echoed as it came (an integer that fits 64
# bits: msgpack carries no larger one); see request_id()
ReqId = Union[str, int, float, None]
MAX_ID_CHARS = 256


class ProtocolError(Exception):
    def __init__(self, code: str, message: str, req_id=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.req_id = req_id


class Bounds(Struct, forbid_unknown_fields=False):
    north: Lat
    south: Lat
    east: Lon
    west: Lon

    def as_tuple(self):
        if self.south > self.north:
            raise ProtocolError("bad_request", "bounds: south is north of north")
        return (self.south, self.west, self.north, self.east)


class Geographic(Struct):
    bounds: Bounds | None = None
    zoom: Zoom | None = None


class Subscriptions(Struct):
    vehicles: list[Name] = []
    groups: list[Name] = []
    geographic: Geographic | None = None


class Filters(Struct):
    status: list[StatusName] | None = None
    vehicle_types: list[Name] | None = None
    show_alerts: bool = True


class Subscribe(Struct, tag="subscribe", tag_field="type"):
    id: ReqId = None
    subscriptions: Subscriptions = msgspec.field(default_factory=Subscriptions)
    filters: Filters = msgspec.field(default_factory=Filters)


class Viewport(Struct, tag="viewport", tag_field="type"):
    bounds: Bounds
    id: ReqId = None
    zoom: Zoom | None = None


class Unsubscribe(Struct, tag="unsubscribe", tag_field="type"):
    id: ReqId = None


class Get(Struct, tag="get", tag_field="type"):
    vehicle: Name
    id: ReqId = None


class Ping(Struct, tag="ping", tag_field="type"):
    id: ReqId = None


class Refresh(Struct, tag="refresh", tag_field="type"):
    token: str
    id: ReqId = None


class Auth(Struct, tag="auth", tag_field="type"):
    token: str
    id: ReqId = None


Inbound = Union[Subscribe, Viewport, Unsubscribe, Get, Ping, Refresh, Auth]
TYPES = {"subscribe": Subscribe, "viewport": Viewport, "unsubscribe": Unsubscribe, "get": Get,
         "ping": Ping, "refresh": Refresh, "auth": Auth}

_json_decoder = msgspec.json.Decoder()
_mp_decoder = msgspec.msgpack.Decoder()


def parse(data: bytes | str, binary: bool):
    """Decode and validate one inbound frame."""
    try:
        obj = _mp_decoder.decode(data) if binary else _json_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise ProtocolError("bad_request", "invalid " + ("msgpack" if binary else "JSON")) from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_request", "a message is an object with a `type`")
    req_id = _id(obj)
    if req_id is None and obj.get("id") is not None:
        raise ProtocolError("bad_request", "`id` must be a string of at most %d characters or a number "
                            "(an integer of at most 64 bits)" % MAX_ID_CHARS)
    t = obj.get("type")
    if not isinstance(t, str):
        raise ProtocolError("bad_request", "missing `type`", req_id)
    cls = TYPES.get(t)
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {t[:40]!r}", req_id)
    try:
        return msgspec.convert(obj, cls)
    except msgspec.ValidationError as e:
        raise ProtocolError("bad_request", str(e), req_id) from None


def _id(obj: dict):
    """The request's id when it can be echoed in both formats, else None."""
    v = obj.get("id")
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v if -2 ** 63 <= v < 2 ** 64 else None
    if isinstance(v, float):   # msgpack carries inf and nan, JSON does not
        return v if math.isfinite(v) else None
    # echoed in every reply's envelope: kept short, so a batch stays within 1 MiB
    return v if isinstance(v, str) and len(v) <= MAX_ID_CHARS else None


def request_id(data: bytes | str, binary: bool):
    """The id of a message that is not handled (rate limited), for its error; None if none."""
    try:
        obj = _mp_decoder.decode(data) if binary else _json_decoder.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return _id(obj) if isinstance(obj, dict) else None


# ---------------------------------------------------------------- outbound
_json_encoder = msgspec.json.Encoder()
_mp_encoder = msgspec.msgpack.Encoder()


def encode(fmt: int, obj: dict[str, Any]) -> bytes:
    return _json_encoder.encode(obj) if fmt == 0 else _mp_encoder.encode(obj)


def reply(kind: str, req_id=None, **fields) -> dict:
    d = {"type": kind}
    if req_id is not None:
        d["id"] = req_id
    d.update(fields)
    return d


def error(code: str, message: str, req_id=None) -> dict:
    return reply("error", req_id, code=code, message=message)


def http_error(code: str, message: str) -> dict:
    """An HTTP error body: §3's error message, and `error` (the code again)
    that the HTTP bodies held before they took §3's shape."""
    return {**error(code, message), "error": code}
