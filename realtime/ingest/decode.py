"""Validation of vehicle updates (PROTOCOL §1.1), shared by every input.

Every input is checked against one schema, `UpdateIn`, and `_finish`; a bad
one raises Rejected with a reason code from REASONS (the `reason` label of
ingest_rejected_total) and a human-readable detail.
- Redis reconcile snapshots go through `validate`, which returns a
  normalised dict (relayed and re-produced as such), and `to_batch` builds
  the core's columnar UpdateBatch from those. HTTP ingest bodies are split
  into items and each item decoded as a Kafka record is, then made that dict.
- Kafka records, the bulk input, are scanned a poll at a time by the
  compiled decoder (_core/_ingest.pyx) straight into the core's columns;
  what it does not take on goes through `decode_record`, which decodes
  into UpdateIn with msgspec and is the definition of what is valid.
  `batch_of_records` builds a batch from its structs.
"""
from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from typing import Annotated, Any, Union

import msgspec
from msgspec import Meta, Struct

from .._core._schema import KEEP, MAX_AHEAD_MS, MAX_ID_LEN, ST_UNKNOWN, STATUS_CODE, UpdateBatch

REASONS = ("invalid_json", "invalid_msgpack", "not_object", "missing_field", "invalid_vehicle_id",
           "invalid_timestamp", "invalid_position", "invalid_field")


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


Name = Annotated[str, Meta(min_length=1, max_length=MAX_ID_LEN)]
Finite = Annotated[float, Meta(ge=-1e12, le=1e12)]


# gc=False: decoded JSON/msgpack cannot form reference cycles, and untracked
# structs are cheaper to make and keep the GC out of the ingest path
class Position(Struct, gc=False):
    lat: Annotated[float, Meta(ge=-90, le=90)]
    lon: Annotated[float, Meta(ge=-180, le=180)]


class UpdateIn(Struct, forbid_unknown_fields=False, gc=False):
    vehicle_id: Name
    timestamp: Union[int, float, str]
    position: Position
    speed: Annotated[float, Meta(ge=0, le=10000)] | None = None
    course: Finite | None = None
    heading: Finite | None = None
    status: Annotated[str, Meta(max_length=64)] | None = None
    vehicle_type: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
    groups: Annotated[list[Name], Meta(max_length=256)] | None = None
    driver: dict[str, Any] | None = None
    assignment: dict[str, Any] | None = None
    alerts: Annotated[list[Annotated[str, Meta(max_length=256)]], Meta(max_length=64)] | None = None


def parse_timestamp(value) -> int:
    """ISO 8601 text or epoch milliseconds -> epoch milliseconds."""
    if isinstance(value, bool):
        raise Rejected("invalid_timestamp", "timestamp must be ISO 8601 or epoch milliseconds")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0 or value > 1e14:
            raise Rejected("invalid_timestamp", "epoch milliseconds out of range")
        return int(value)
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise Rejected("invalid_timestamp", f"not ISO 8601: {value[:40]!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    ms = int(round(dt.timestamp() * 1000))
    if not 0 <= ms <= 100_000_000_000_000:   # as epoch milliseconds are held
        raise Rejected("invalid_timestamp", "timestamp before 1970 or after the year 5138")
    return ms


def iso_ms(ts_ms: int) -> str:
    dt = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"


def _reason_of(e: msgspec.ValidationError) -> str:
    text = str(e)
    if "missing required field" in text:
        return "missing_field"
    if "$.vehicle_id" in text:
        return "invalid_vehicle_id"
    if "$.timestamp" in text:
        return "invalid_timestamp"
    if "$.position" in text:
        return "invalid_position"
    return "invalid_field"


_mp_encode = msgspec.msgpack.Encoder().encode


_JSON_TYPES = (str, int, float, bool, type(None))


# objects or arrays nested below a driver or assignment object: every input
# (and the relay between workers) holds them to this
MAX_DEPTH = 32
# a driver or assignment object as compact JSON: each goes out in every
# snapshot and `full` of its vehicle, to every client that sees it, so one
# vehicle's megabyte (a Kafka record may be that large) cost every one of
# them that megabyte, and the Redis hash, the relay and the core held it
MAX_OBJECT_BYTES = 16 << 10
# how much longer a value can get as compact JSON than the bytes it was read
# from: msgpack's 1-byte false is `false,`, a NUL in a string is `\u0000`;
# JSON's `1e15` is written back as `1000000000000000.0` (4.5x)
MAX_GROWTH = 6
_json_encode = msgspec.json.Encoder().encode


def too_large(value, raw_size: int | None) -> bool:
    """Whether a driver or assignment is over MAX_OBJECT_BYTES as compact
    JSON. `raw_size`: the bytes of what it was read from (None: unknown);
    what MAX_GROWTH times that cannot reach the bound is not encoded (a
    record of a few hundred bytes, nearly always)."""
    return (raw_size is None or raw_size * MAX_GROWTH > MAX_OBJECT_BYTES) and \
        len(_json_encode(value)) > MAX_OBJECT_BYTES


def _plain(value, depth: int = 0) -> bool:
    """JSON's own types only (no bytes, no non-string keys), at most
    MAX_DEPTH deep: what both the JSON and the msgpack encoders of every
    client, the Redis hash and the relay between workers carry."""
    if isinstance(value, _JSON_TYPES):
        return not isinstance(value, float) or math.isfinite(value)
    if depth > MAX_DEPTH:
        return False
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v, depth + 1) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain(v, depth + 1) for v in value)
    return False


def _json_object_fault(value) -> str | None:
    """Why a driver or assignment read from JSON cannot be kept (None: it
    can), for _finish and the compiled decoder alike. Free-form objects go
    to msgpack clients as they are: an integer msgpack cannot carry (beyond
    64 bits) would fail there, in the core, for the whole batch. From JSON
    `_plain` can only fail on the depth."""
    try:
        _mp_encode(value)
    except (OverflowError, TypeError, ValueError, RecursionError):
        return "holds a value msgpack cannot carry (an integer beyond 64 bits)"
    if not _plain(value):
        return f"nested more than {MAX_DEPTH} levels below it, or holds what JSON cannot"
    return None


def _finish(u: UpdateIn, json_numbers: bool = True, raw_size: int | None = None) -> UpdateIn:
    """What msgspec's types cannot say. Afterwards `timestamp` is epoch
    milliseconds and `course` (or `heading`) is in [0, 360). (NaN and
    infinities fail the types' bounds already: NaN >= x is false.)"""
    course = u.course if u.course is not None else u.heading
    if course is not None:
        u.course = course % 360.0
        if u.course >= 360.0:   # a tiny negative: -1e-20 % 360.0 is 360.0
            u.course = 0.0
    ts = u.timestamp
    u.timestamp = ts if type(ts) is int and 0 <= ts <= 100_000_000_000_000 else parse_timestamp(ts)
    if u.timestamp > time.time() * 1000 + MAX_AHEAD_MS:
        raise Rejected("invalid_timestamp", "more than an hour ahead of the server's clock")
    for name, value in (("driver", u.driver), ("assignment", u.assignment)):
        # only JSON can hold integers beyond 64 bits: a msgpack record cannot,
        # and the Kafka path does not pay for an encode per record there
        if value and json_numbers:
            fault = _json_object_fault(value)
            if fault:
                raise Rejected("invalid_field", f"{name}: {fault}")
        elif value and not _plain(value):
            # a msgpack record can hold what JSON cannot (bin, keys that are
            # not strings, NaN): JSON clients and the Redis hash could not
            # carry it, and the writer would fail on it
            raise Rejected("invalid_field", f"{name}: holds a value JSON cannot carry "
                                            "(bytes, a key that is not a string, NaN)")
        if value and too_large(value, raw_size):
            raise Rejected("invalid_field", f"{name}: over {MAX_OBJECT_BYTES} bytes as JSON")
    return u


_Alerts = Annotated[tuple[Annotated[str, Meta(max_length=256)], ...], Meta(max_length=64)]
_Groups = Annotated[tuple[Name, ...], Meta(max_length=256)]


class RelayMessage(Struct, forbid_unknown_fields=False, gc=False):
    """A relayed batch (stores/redis.py pack_relay) as msgspec reads it from
    msgpack, typed and bounded in the same pass: the rich columns held to
    UpdateIn's limits (alerts and groups come out as the core's tuples), the
    numeric ones the arrays' bytes, checked as arrays by unpack_relay."""
    o: str
    ids: list[Name]
    types: list[Annotated[str, Meta(min_length=1, max_length=64)]]
    lat: bytes
    lon: bytes
    speed: bytes
    course: bytes
    status: bytes
    vtype: bytes
    ts: bytes
    alerts: list[_Alerts | None]
    groups: list[_Groups | None]
    driver: list[dict[str, Any] | None]
    assignment: list[dict[str, Any] | None]


class _Origin(Struct, forbid_unknown_fields=False, gc=False):
    o: str = ""


_RELAY = msgspec.msgpack.Decoder(RelayMessage)
_ORIGIN = msgspec.msgpack.Decoder(_Origin)


def relay_origin(blob: bytes) -> str | None:
    """Who sent a relay message, read without making the rest of it (a
    worker gets its own messages back from Pub/Sub); None if unreadable."""
    try:
        return _ORIGIN.decode(blob).o
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        return None


def decode_relay(blob: bytes) -> RelayMessage:
    """A relay message, or ValueError: every column as long as `ids`,
    free-form objects of JSON's types only. (Whatever msgspec reads from
    msgpack, msgpack can write again, once `_plain` has refused bin, ext
    and timestamps.) Decoding and checking in one pass costs a receiving
    worker ~0.5 us an update, against ~1.7 for unpackb, then convert."""
    try:
        m = _RELAY.decode(blob)
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as e:
        raise ValueError(str(e)[:200]) from None
    n = len(m.ids)
    if any(len(col) != n for col in (m.alerts, m.groups, m.driver, m.assignment)):
        raise ValueError("columns of different lengths")
    for col in (m.driver, m.assignment):
        for v in col:
            if v is not None and not _plain(v):
                raise ValueError("driver or assignment holds what JSON cannot")
            if v and too_large(v, None):   # only changed objects are relayed: rare
                raise ValueError(f"driver or assignment over {MAX_OBJECT_BYTES} bytes as JSON")
    return m


def validate_relayed(d) -> dict:
    """A relayed dict of the older relay format (as_dict's shape) checked
    as any update is: it came through a channel anyone with Redis can use."""
    if not isinstance(d, dict):
        raise Rejected("not_object", "an update is a JSON object")
    out = validate({"vehicle_id": d.get("vehicle_id"), "timestamp": d.get("ts"),
                    "position": {"lat": d.get("lat"), "lon": d.get("lon")},
                    **{k: d[k] for k in ("speed", "course", "status", "vehicle_type", "groups",
                                         "driver", "assignment", "alerts") if d.get(k) is not None}})
    if not (_plain(out["driver"]) and _plain(out["assignment"])):   # msgpack's bytes, say
        raise Rejected("invalid_field", "driver or assignment holds what JSON cannot")
    return out


def validate(obj) -> dict:
    if not isinstance(obj, dict):
        raise Rejected("not_object", "an update is a JSON object")
    try:
        u = _finish(msgspec.convert(obj, UpdateIn))
    except msgspec.ValidationError as e:
        raise Rejected(_reason_of(e), str(e)) from None
    return as_dict(u)


def as_dict(u: UpdateIn) -> dict:
    """A finished UpdateIn as the normalised dict that is relayed and re-produced."""
    return {
        "vehicle_id": u.vehicle_id,
        "ts": u.timestamp,
        "lat": u.position.lat,
        "lon": u.position.lon,
        "speed": u.speed,
        "course": u.course,
        "status": u.status,
        "vehicle_type": u.vehicle_type,
        "groups": u.groups,
        "driver": u.driver,
        "assignment": u.assignment,
        "alerts": u.alerts,
    }


_json = msgspec.json.Decoder()
_json_update = msgspec.json.Decoder(UpdateIn)
_mp_update = msgspec.msgpack.Decoder(UpdateIn)


def decode_record(value: bytes, msgpack_value: bool = False) -> UpdateIn:
    """One Kafka record value -> validated update, decoded in one pass."""
    if value is None:   # a Kafka tombstone: a record without a value
        raise Rejected("invalid_msgpack" if msgpack_value else "invalid_json", "record has no value")
    try:
        return _finish((_mp_update if msgpack_value else _json_update).decode(value), not msgpack_value,
                       len(value))
    except msgspec.ValidationError as e:   # a DecodeError too: test it first
        text = str(e)
        if text.startswith("Expected `object`") and "- at `$" not in text:
            raise Rejected("not_object", "an update is a JSON object") from None
        raise Rejected(_reason_of(e), text) from None
    except (msgspec.DecodeError, UnicodeDecodeError):
        raise Rejected("invalid_msgpack" if msgpack_value else "invalid_json",
                       "value is not " + ("msgpack" if msgpack_value else "JSON")) from None
    except RecursionError:   # nested deeper than the decoder goes: no update is
        raise Rejected("invalid_msgpack" if msgpack_value else "invalid_json",
                       "value is nested too deep") from None


# The rich fields on their own, with UpdateIn's constraints, for the compiled
# Kafka decoder (_core/_ingest.pyx), which parses one only when it changed.
# Lists come out as the tuples the core stores.
RICH_DECODERS = (
    msgspec.json.Decoder(Annotated[tuple[Name, ...], Meta(max_length=256)]).decode,
    msgspec.json.Decoder(Annotated[tuple[Annotated[str, Meta(max_length=256)], ...],
                                   Meta(max_length=64)]).decode,
    msgspec.json.Decoder(dict[str, Any]).decode,
    msgspec.json.Decoder(dict[str, Any]).decode,
)


def finish_object(value, raw_size: int | None = None):
    """_finish's check of a JSON driver or assignment, for the compiled
    decoder (`raw_size`: the bytes of its text in the record)."""
    if value and (_json_object_fault(value) or too_large(value, raw_size)):
        raise ValueError("not kept")   # decode_record then rejects it, with the reason
    return value


_json_items = msgspec.json.Decoder(list[msgspec.Raw])


def split_http_body(body: bytes) -> list:
    """A JSON array or NDJSON of updates -> one undecoded item per update,
    cheaply (a 16 MiB array splits in ~15 ms), so that the items can be
    decoded and applied in slices (ingest/http.py). A body that is neither
    raises Rejected for the whole request."""
    text = body.lstrip()
    if text.startswith(b"["):
        try:
            return _json_items.decode(text)
        except msgspec.DecodeError as e:
            raise Rejected("invalid_json", f"body is not a JSON array: {e}") from None
        except RecursionError:   # msgspec's bound on nesting (1,000 levels): an answer, not a 500
            raise Rejected("invalid_json", "body is not a JSON array: nested too deeply") from None
    return [line for line in body.split(b"\n") if line.strip()]


def decode_items(items: list, start: int = 0) -> tuple[list, list]:
    """Items of split_http_body -> (accepted [(index, update dict)], rejected
    [(index, reason, detail)]); `start` is the index of the first item."""
    accepted, rejected = [], []
    for i, raw in enumerate(items, start):
        try:
            accepted.append((i, as_dict(decode_record(raw))))
        except Rejected as r:
            if r.reason == "invalid_json":   # only an NDJSON line can be
                rejected.append((i, r.reason, "line is not JSON"))
            else:
                rejected.append((i, r.reason, r.detail))
    return accepted, rejected


def decode_http_body(body: bytes) -> tuple[list, list]:
    """The whole body at once: split_http_body, then decode_items."""
    return decode_items(split_http_body(body))


def to_batch(updates: list[dict], vtype_code) -> UpdateBatch:
    nan = math.nan
    return UpdateBatch(
        ids=[u["vehicle_id"] for u in updates],
        lat=[u["lat"] for u in updates],
        lon=[u["lon"] for u in updates],
        speed=[nan if u["speed"] is None else u["speed"] for u in updates],
        course=[nan if u["course"] is None else u["course"] for u in updates],
        status=[KEEP if u["status"] is None else STATUS_CODE.get(u["status"], ST_UNKNOWN)
                for u in updates],
        vtype=[KEEP if u["vehicle_type"] is None else vtype_code(u["vehicle_type"]) for u in updates],
        ts=[u["ts"] for u in updates],
        alerts=[None if u["alerts"] is None else tuple(u["alerts"]) for u in updates],
        driver=[u["driver"] for u in updates],
        assignment=[u["assignment"] for u in updates],
        groups=[None if u["groups"] is None else tuple(u["groups"]) for u in updates],
    )


def batch_of_records(updates: list[UpdateIn], vtype_code) -> UpdateBatch:
    """to_batch for decode_record's structs (attributes instead of keys)."""
    nan = math.nan
    return UpdateBatch(
        ids=[u.vehicle_id for u in updates],
        lat=[u.position.lat for u in updates],
        lon=[u.position.lon for u in updates],
        speed=[nan if u.speed is None else u.speed for u in updates],
        course=[nan if u.course is None else u.course for u in updates],
        status=[KEEP if u.status is None else STATUS_CODE.get(u.status, ST_UNKNOWN) for u in updates],
        vtype=[KEEP if u.vehicle_type is None else vtype_code(u.vehicle_type) for u in updates],
        ts=[u.timestamp for u in updates],
        alerts=[None if u.alerts is None else tuple(u.alerts) for u in updates],
        driver=[u.driver for u in updates],
        assignment=[u.assignment for u in updates],
        groups=[None if u.groups is None else tuple(u.groups) for u in updates],
    )
