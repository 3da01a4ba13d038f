"""The compiled Kafka decoder (_core/_ingest.pyx) against decode_record.

decode_record is the definition of a valid record and of every rejection
reason; the decoder scans the usual shape itself and hands the rest to it.
These tests feed both the same polls -- generated, hostile and in awkward
orders -- into two cores and require the same state and the same
rejections. No service is needed: the decoder is a pure function of the
records and the core.
"""
import json
import random

import msgpack
import numpy as np
import pytest

from realtime._core import Core
from realtime.ingest.decode import Rejected, batch_of_records, decode_record, to_batch, validate
from realtime.ingest.kafka import is_msgpack, record_decoder

MSGPACK = (("content-type", b"application/msgpack"),)


class Rec:
    """What the decoder reads of aiokafka's ConsumerRecord."""
    __slots__ = ("value", "headers", "offset")

    def __init__(self, value, headers=(), offset=0):
        self.value, self.headers, self.offset = value, headers, offset


def reference(core, records):
    """Today's definition: decode_record per record, then batch_of_records."""
    ok, rejected = [], []
    for r in records:
        try:
            ok.append(decode_record(r.value, bool(r.headers) and is_msgpack(r.headers)))
        except Rejected as e:
            rejected.append((r.offset, e.reason))
    if ok:
        core.apply(batch_of_records(ok, core.vtype_code))
    return rejected


def compiled(core, decoder, records):
    batch, rejected = decoder.decode(records)
    assert all(isinstance(e, Rejected) for _, e in rejected)
    if batch is not None:
        assert batch.ids is None and len(batch.rows) == len(batch)
        core.apply(batch)
    return [(r.offset, e.reason) for r, e in rejected]


def state(core):
    """Every vehicle's stored values, by id (rows may differ between cores)."""
    out = {}
    for vid, row in core.id_to_row.items():
        cur = core.cur[row]
        out[vid] = (tuple(np.float64(cur[k]).tobytes() for k in ("lat", "lon", "speed", "course")),
                    int(cur["ts"]), int(cur["status"]), core.types[cur["vtype"]] if cur["ts"] > -2**62 else None,
                    int(cur["version"]), core.alerts[row], core.driver[row], core.assignment[row],
                    core.groups_of[row], int(cur["al_ver"]), int(cur["dr_ver"]), int(cur["as_ver"]),
                    # the encodings: a vehicle made in bulk (_new_vehicles) as one made alone
                    core.enc_id[row], core.enc_al[row], core.enc_dr[row], core.enc_drr[row], core.enc_as[row])
    return out


def same(polls):
    """Both ways over the same polls: equal rejections, equal state."""
    return same_cores(Core(vehicle_capacity=64, client_capacity=8), Core(vehicle_capacity=64, client_capacity=8),
                      polls)


def same_cores(a, b, polls):
    dec = record_decoder(b)
    for records in polls:
        assert compiled(b, dec, records) == reference(a, records)
    assert state(b) == state(a)
    return dec


IDS = ["veh_1", "veh_2", "truck_123", "Грузовик-7", "a" * 128, "x"]
ISO = ["2024-01-15T10:30:00.123Z", "2024-01-15T10:30:00Z", "2024-01-15T10:30:00", "2024-02-29T23:59:59.999999Z",
       "2023-02-29T10:00:00Z", "2024-01-15T10:30:00.1Z", "2024-01-15T10:30:00.1234567Z", "2024-01-15T10:30:00+05:30",
       "2024-01-15T10:30:00-11:59", "2024-01-15T24:00:00Z", "2024-01-15T10:30:60Z", "2024-01-15 10:30:00Z",
       "2024-01-15T10:30Z", "2024-13-01T00:00:00Z", "1969-12-31T23:59:59.999Z", "0001-01-01T00:00:00Z",
       "9999-12-31T23:59:59.999999Z", "2024-01-15T10:30:00.Z", "2024-01-15T10:30:00+0530", "not a time", "",
       "2024-01-15T10:30:00.0005Z", "2024-01-15T10:30:00.0015Z", "2024-01-15T10:30:00.0025Z"]
NUMBERS = [0, -0, 1, 55.7558, -90, 90, 90.0000001, -180, 180, 181, 1e-7, 1.5e2, "1E2", -0.0, 10000, 10000.01,
           123456789012345678, 0.1 + 0.2, 2.5e-308, 1e400, "NaN", True, None, "12", 359.99999999999994,
           -720.5, 1e12, 1e12 + 1, 37.61760000000001]


def gen_value(rnd):
    """A record value: the usual shape, or (half the time) with things wrong."""
    if rnd.random() < 0.5:
        return gen_clean(rnd)
    d = {"vehicle_id": rnd.choice(IDS), "timestamp": rnd.choice([rnd.randint(0, 10**13), rnd.choice(ISO)]),
         "position": {"lat": round(rnd.uniform(-90, 90), rnd.randint(0, 9)),
                      "lon": round(rnd.uniform(-180, 180), rnd.randint(0, 9))}}
    for k, choices in (("speed", NUMBERS), ("course", NUMBERS), ("heading", NUMBERS),
                       ("status", ["moving", "idle", "stopped", "offline", "unknown", "parked", None, "", "x" * 65, 3]),
                       ("vehicle_type", ["truck", "van", "Фура", None, "", "t" * 65, 7]),
                       ("groups", [["north_fleet"], [], ["a", "a"], ["g%d" % i for i in range(257)], [""], None,
                                   ["Север"], "north", [1]]),
                       ("alerts", [[], ["overspeed:65/60 км/ч"], ["a" * 257], ["x"] * 65, None, [None], "x"]),
                       ("driver", [{"name": "Иванов И.И.", "phone": "+79161234567"}, {}, {"n": 2**70},
                                   {"nested": {"a": [1, 2.5, None, True]}}, None, [], "x", {"q": "\"\\/\u2028"}]),
                       ("assignment", [{"client": "ООО Ромашка", "eta": "11:15"}, None, {"big": -2**63}])):
        if rnd.random() < 0.5:
            d[k] = rnd.choice(choices)
    if rnd.random() < 0.1:
        d[rnd.choice(["odometer", "extra", "speed_limit"])] = rnd.choice(
            [1, "text", "ünïcode", {"a": [1, {"b": None}]}, [], None, 1.5e3])
    if rnd.random() < 0.05:
        del d[rnd.choice(["vehicle_id", "timestamp", "position"])]
    if rnd.random() < 0.05:
        d["position"] = rnd.choice([{"lat": 1}, {"lat": 1, "lon": 2, "alt": 3}, [1, 2], None, {"lat": "1", "lon": 2}])
    text = json.dumps(d, ensure_ascii=rnd.random() < 0.2, separators=rnd.choice([(",", ":"), (", ", ": ")]))
    for k, v in (('"1E2"', "1E2"), ('"NaN"', "NaN"), ("Infinity", "1e400")):
        text = text.replace(k, v)
    b = text.encode()
    roll = rnd.random()
    if roll < 0.03:
        b = b[: rnd.randint(0, len(b))]                       # truncated
    elif roll < 0.05:
        b = b + rnd.choice([b" ", b"\n", b"x", b"}", b"\x00"])   # trailing bytes
    elif roll < 0.07:
        i = rnd.randint(0, len(b) - 1)
        b = b[:i] + bytes([rnd.randint(0, 255)]) + b[i + 1:]   # one byte changed
    elif roll < 0.08:
        b = b.replace(b'"vehicle_id"', b'"vehicle\\u005fid"', 1)
    elif roll < 0.09:
        b = b[:-1] + b', "vehicle_id": "dup"}'              # a field named twice
    elif roll < 0.10:
        b = b"  \r\n\t" + b + b" \t"
    return b


def gen_clean(rnd):
    """A valid record of the kinds a platform sends (every field may change)."""
    d = {"vehicle_id": rnd.choice(IDS[:4]), "timestamp": rnd.choice([rnd.randint(10**12, 2 * 10**12),
                                                                     rnd.choice(ISO[:4] + ISO[-3:])]),
         "position": {"lat": round(rnd.uniform(-90, 90), rnd.randint(0, 7)),
                      "lon": round(rnd.uniform(-180, 180), rnd.randint(0, 7))}}
    for k, choices in (("speed", [0, 40.5, 65.25, None, 120]), ("course", [0, 180, 359.9, -90, 720.5, None]),
                       ("heading", [45, None]), ("status", ["moving", "idle", "stopped", "offline", "parked"]),
                       ("vehicle_type", ["truck", "van"]), ("groups", [["north_fleet"], ["a", "b"], []]),
                       ("alerts", [[], ["overspeed:65/60 км/ч"], ["low_fuel", "door"]]),
                       ("driver", [{"name": "Иванов И.И.", "phone": "+79161234567"}, {"name": "B"}, {}]),
                       ("assignment", [{"client": "ООО Ромашка", "eta": "11:15"}, {"client": "x"}])):
        if rnd.random() < 0.6:
            d[k] = rnd.choice(choices)
    return json.dumps(d, ensure_ascii=False).encode()


def test_generated_polls_give_the_same_state_and_rejections():
    rnd = random.Random(15)
    polls, offset = [], 0
    for _ in range(300):
        poll = []
        for _ in range(rnd.randint(0, 40)):
            if rnd.random() < 0.03:
                value = msgpack.packb({"vehicle_id": rnd.choice(IDS), "timestamp": rnd.randint(0, 10**13),
                                       "position": {"lat": 1.5, "lon": 2.5}, "driver": {"b": b"\x00"}})
                poll.append(Rec(value, MSGPACK, offset))
            elif rnd.random() < 0.01:
                poll.append(Rec(None, (), offset))   # a tombstone
            else:
                poll.append(Rec(gen_value(rnd), (), offset))
            offset += 1
        polls.append(poll)
    dec = same(polls)
    # the generator must reach both ways, or this compares nothing
    assert dec.stats["scanned"] > 2000 and dec.stats["slow"] > 1000, dec.stats


def test_the_usual_shape_is_scanned_not_handed_on():
    rec = json.dumps({"vehicle_id": "truck_123", "timestamp": "2024-01-15T10:30:00.123Z",
                      "position": {"lat": 55.7558, "lon": 37.6176}, "speed": 65.2, "course": 180,
                      "status": "moving", "vehicle_type": "truck", "groups": ["north_fleet"],
                      "driver": {"name": "Иванов И.И.", "phone": "+79161234567"},
                      "assignment": {"client": "ООО Ромашка", "eta": "11:15"},
                      "alerts": ["overspeed:65/60 км/ч"]}, ensure_ascii=False).encode()
    dec = same([[Rec(rec, (), 0)], [Rec(rec.replace(b"10:30:00", b"10:30:01"), (), 1)],
                [Rec(rec.replace(b"10:30:00", b"10:30:02"), (), 2)]])
    assert dec.stats == {"scanned": 3, "slow": 0}


def test_rich_fields_changed_elsewhere_are_not_taken_for_unchanged():
    """The decoder's memo says "as before" only while the core holds an
    equal value: a driver set by HTTP ingest, the Redis reconcile or a record
    that went the other way in between must be replaced by the next record."""
    def rec(ts, driver, off, extra=""):
        return Rec(('{"vehicle_id":"v1","timestamp":%d,"position":{"lat":1,"lon":2},"driver":%s%s}'
                    % (ts, json.dumps(driver), extra)).encode(), (), off)
    a, b = Core(vehicle_capacity=64, client_capacity=8), Core(vehicle_capacity=64, client_capacity=8)
    dec = record_decoder(b)

    def both(records):
        assert compiled(b, dec, records) == reference(a, records)
        assert state(b) == state(a)

    both([rec(1, {"n": "A"}, 0)])
    for core in (a, b):   # another input sets B
        core.apply(to_batch([validate({"vehicle_id": "v1", "timestamp": 2, "position": {"lat": 1, "lon": 2},
                                       "driver": {"n": "B"}})], core.vtype_code))
    both([rec(3, {"n": "A"}, 1)])
    assert b.driver[b.id_to_row["v1"]] == {"n": "A"}
    # in one poll: A, then C by the other way (an escape in a name), then A again
    both([rec(4, {"n": "A"}, 2), rec(5, {"n": "C"}, 3, ',"x\\u0041":1'), rec(6, {"n": "A"}, 4)])
    assert b.driver[b.id_to_row["v1"]] == {"n": "A"}
    both([rec(7, {"n": "A"}, 5), rec(8, {"n": "C"}, 6), rec(9, {"n": "A"}, 7), rec(10, {"n": "A"}, 8)])
    # a vehicle forgotten (stale) and its row given to another
    for core in (a, b):
        core.tick()
        core.forget([core.id_to_row["v1"]])
    both([Rec(b'{"vehicle_id":"v2","timestamp":11,"position":{"lat":1,"lon":2},"driver":{"n":"A"}}', (), 9),
          rec(12, {"n": "A"}, 10)])
    assert b.driver[b.id_to_row["v2"]] == {"n": "A"} and b.driver[b.id_to_row["v1"]] == {"n": "A"}


def test_a_poll_of_only_bad_records_gives_no_batch():
    dec = record_decoder(Core(vehicle_capacity=64, client_capacity=8))
    batch, rejected = dec.decode([Rec(b"{", (), 0), Rec(b"[]", (), 1), Rec(None, (), 2)])
    assert batch is None
    assert [e.reason for _, e in rejected] == ["invalid_json", "not_object", "invalid_json"]
    assert dec.decode([]) == (None, [])


@pytest.mark.parametrize("value", [b'{"vehicle_id":"v","timestamp":1,"position":{"lat":1,"lon":2}}',
                                   b'{"vehicle_id":"v","timestamp":"2024-01-15T10:30:00.0025Z",'
                                   b'"position":{"lat":-0,"lon":-0.0},"course":-0.0,"heading":-30}'])
def test_edge_numbers_match(value):
    same([[Rec(value, (), 0)]])


def test_new_vehicles_made_together_join_the_selections_that_name_them():
    """A poll's new vehicles are made in one go (_new_vehicles): a client
    whose rights name them before they exist must see them, as when they are
    made one by one, and a refused record must not make its vehicle."""
    a, b = Core(vehicle_capacity=64, client_capacity=8), Core(vehicle_capacity=64, client_capacity=8)
    for core in (a, b):
        core.add_client(view_all=False, vehicles=["n3", "n70"], groups=["south"])
    poll = [Rec(('{"vehicle_id":"n%d","timestamp":5,"position":{"lat":1,"lon":2}%s}'
                 % (i, ',"groups":["south"]' if i % 7 == 0 else "")).encode(), (), i) for i in range(100)]
    poll.append(Rec(b'{"vehicle_id":"bad","timestamp":5,"position":{"lat":1,"lon":2},"groups":[1]}', (), 100))
    poll.append(Rec(b'{"vehicle_id":"n3","timestamp":6,"position":{"lat":3,"lon":2}}', (), 101))
    dec = same_cores(a, b, [poll])
    assert dec.stats["scanned"] == 101 and "bad" not in b.id_to_row and b.n == 100   # grown past 64
    for core in (a, b):
        core.tick()
    def members(core):
        sid = next(sid for key, sid in core.sel_key.items() if "n3" in key[0])
        bits = np.unpackbits(core.sel_bits[sid].view(np.uint8), bitorder="little")[:core.n]
        return sorted(core.ids[r] for r in np.flatnonzero(bits))
    # named, or in the group "south" (every seventh)
    assert members(b) == members(a) == sorted({"n3"} | {f"n{i}" for i in range(0, 100, 7)})
    assert np.array_equal(b.group_bits, a.group_bits)
    assert int(b.cur[b.id_to_row["n3"]]["ts"]) == 6


DEEP = b'{"vehicle_id":"v","timestamp":1,"position":{"lat":1,"lon":2},"extra":' + b"[" * 5000 + b"]" * 5000 + b"}"


def test_a_record_nested_too_deep_is_rejected_not_raised():
    """Deeper than msgspec goes (RecursionError): rejected like any record
    that is not an update, and the poll's other records go in."""
    with pytest.raises(Rejected) as e:
        decode_record(DEEP)
    assert e.value.reason == "invalid_json"
    dec = same([[Rec(b'{"vehicle_id":"d1","timestamp":1,"position":{"lat":1,"lon":2}}', (), 0),
                 Rec(DEEP, (), 1),
                 Rec(msgpack.packb({"vehicle_id": "v", "x": [[[[]]]] * 2}), MSGPACK, 2)]])
    assert dec.stats["scanned"] == 1


def test_ids_that_come_and_go_do_not_pile_up_in_the_decoder():
    """Trackers renamed over time: the core forgets each vehicle (stale) and
    reuses its row; the decoder's id -> row map kept every id ever seen."""
    core = Core(vehicle_capacity=64, client_capacity=8)
    dec = record_decoder(core)
    for day in range(30):
        batch, rejected = dec.decode([Rec(json.dumps({"vehicle_id": f"d{day}-{i}", "timestamp": 1,
                                                      "position": {"lat": 1, "lon": 2}}).encode(), (), i)
                                      for i in range(500)])
        assert rejected == [] and len(batch.rows) == 500
        core.apply(batch)
        core.tick()
        core.forget(np.arange(core.n, dtype=np.int32)[core.cur["version"][:core.n] > 0])
        core.tick()
    assert dec.known_ids() <= 2 * len(core.ids) + 4096 < 30 * 500


def test_a_timestamp_far_ahead_of_the_clock_is_rejected_on_every_path():
    """One update from 2099 was taken, and every true one after it was older:
    the vehicle froze. More than an hour ahead is `invalid_timestamp`, in the
    compiled scanner (it hands the record to decode_record) as in Python."""
    import time as _time
    now = int(_time.time() * 1000)
    ahead = [now + 2 * 3600_000, "2099-01-01T00:00:00Z"]
    for ts in ahead:
        with pytest.raises(Rejected) as e:
            decode_record(json.dumps({"vehicle_id": "v", "timestamp": ts, "position": {"lat": 1, "lon": 2}}).encode())
        assert e.value.reason == "invalid_timestamp"
    dec = record_decoder(Core(vehicle_capacity=64, client_capacity=8))
    values = [json.dumps({"vehicle_id": f"v{i}", "timestamp": ts, "position": {"lat": 1, "lon": 2}}).encode()
              for i, ts in enumerate(ahead + [now + 1800_000, now])]
    batch, rejected = dec.decode([Rec(v, (), i) for i, v in enumerate(values)])
    assert [e.reason for _, e in rejected] == ["invalid_timestamp"] * 2
    assert len(batch.rows) == 2   # half an hour ahead (a skewed clock) and now are taken


def test_an_http_body_nested_too_deep_is_a_400_not_a_500():
    """POST /api/ingest splits a JSON array before it decodes its items: a
    body deeper than msgspec goes is the whole request's `invalid_json`
    (Rejected: a 400), as any body that is not an array; it answered 500."""
    from realtime.ingest.decode import split_http_body
    with pytest.raises(Rejected) as e:
        split_http_body(b"[" + DEEP + b"]")
    assert e.value.reason == "invalid_json" and "nested too deeply" in e.value.detail


def test_a_poll_that_raises_leaves_no_placeholder_behind():
    """Should decoding fail part-way (a defect), the poll's new vehicles are
    forgotten: a later poll makes each once, however it came in meanwhile."""
    core = Core(vehicle_capacity=64, client_capacity=8)

    def slow(value, mp):
        if b"boom" in value:
            raise RuntimeError("a defect")
        return decode_record(value, mp)
    from realtime.ingest.decode import RICH_DECODERS, finish_object
    from realtime._core._ingest import RecordDecoder
    dec = RecordDecoder(core, slow, Rejected, is_msgpack, RICH_DECODERS, finish_object)
    rec = Rec(b'{"vehicle_id":"p1","timestamp":1,"position":{"lat":1,"lon":2}}', (), 0)
    with pytest.raises(RuntimeError):
        dec.decode([rec, Rec(b'{"vehicle_id":"boom"}', (), 1)])
    assert "p1" not in core.id_to_row
    # p1 arrives by another way, then in the next poll
    core.apply(to_batch([validate({"vehicle_id": "p1", "timestamp": 2, "position": {"lat": 3, "lon": 4}})],
                        core.vtype_code))
    batch, rejected = dec.decode([Rec(b'{"vehicle_id":"p1","timestamp":3,"position":{"lat":5,"lon":6}}', (), 2)])
    core.apply(batch)
    assert core.ids.count("p1") == 1 and core.n == 1
    assert float(core.cur[core.id_to_row["p1"]]["lat"]) == 5.0


def test_the_consumer_goes_record_by_record_when_a_poll_cannot_be_decoded():
    """KafkaIngest._decode: a defect on one record costs that record (rejected
    as unreadable, so it is counted and dead-lettered), not the poll."""
    from realtime.ingest.decode import RICH_DECODERS, finish_object
    from realtime.ingest.kafka import KafkaIngest
    from realtime._core._ingest import RecordDecoder
    core = Core(vehicle_capacity=64, client_capacity=8)

    def slow(value, mp):
        if b"boom" in value:
            raise RuntimeError("a defect")
        return decode_record(value, mp)
    ingest = KafkaIngest.__new__(KafkaIngest)
    ingest.decoder = RecordDecoder(core, slow, Rejected, is_msgpack, RICH_DECODERS, finish_object)
    recs = [Rec(b'{"vehicle_id":"k1","timestamp":1,"position":{"lat":1,"lon":2}}', (), 0),
            Rec(b'{"vehicle_id":"boom"}', (), 1), Rec(b"{", (), 2),
            Rec(b'{"vehicle_id":"k2","timestamp":1,"position":{"lat":1,"lon":2}}', (), 3)]
    batches, rejected = ingest._decode(recs)
    for b, of in batches:
        assert len(of) == len(b) == 1   # each with the record it came from (its broker time)
        core.apply(b)
    assert sorted(core.id_to_row) == ["k1", "k2"]
    assert [(r.offset, e.reason) for r, e in rejected] == [(1, "invalid_json"), (2, "invalid_json")]
    assert "unreadable" in rejected[0][1].detail


def test_iso_timestamps_and_deep_objects_are_held_as_every_input_holds_them():
    """What the relay between workers refuses, ingest refuses first, on the
    compiled path and in decode_record alike: an ISO 8601 timestamp before
    1970 or past epoch-ms 1e14 (as epoch milliseconds are held), and a driver
    or assignment nested deeper than MAX_DEPTH."""
    from realtime.ingest.decode import MAX_DEPTH, Rejected, decode_record
    deep, shallow = {}, {}
    for _ in range(MAX_DEPTH + 1):   # MAX_DEPTH + 1 below the driver
        deep = {"d": deep}
    for _ in range(MAX_DEPTH):       # MAX_DEPTH below it: the most there may be
        shallow = {"d": shallow}
    cases = [({"timestamp": "1969-12-31T23:59:59Z"}, "invalid_timestamp"),
             ({"timestamp": "9999-01-01T00:00:00Z"}, "invalid_timestamp"),
             ({"driver": deep}, "invalid_field"),
             ({"assignment": deep}, "invalid_field"),
             ({"timestamp": "1970-01-01T00:00:00.001Z"}, None),
             ({"driver": shallow}, None),
             ({"assignment": {"a": shallow}}, "invalid_field")]
    for extra, reason in cases:
        rec = json.dumps({"vehicle_id": "deep-1", "timestamp": 1_700_000_000_000,
                          "position": {"lat": 1.0, "lon": 2.0}, **extra}).encode()
        if reason is None:
            decode_record(rec)
        else:
            with pytest.raises(Rejected) as e:
                decode_record(rec)
            assert e.value.reason == reason, extra
    # the compiled decoder agrees, record by record
    same([[Rec(json.dumps({"vehicle_id": f"deep-{i}", "timestamp": 1_700_000_000_000,
                           "position": {"lat": 1.0, "lon": 2.0}, **extra}).encode(), (), i)
           for i, (extra, _) in enumerate(cases)]])


def test_the_msgpack_content_type_is_a_media_type_in_any_case_with_any_parameters():
    for v in (b"application/msgpack", b"Application/MsgPack", b"application/x-msgpack",
              b"application/msgpack; charset=binary", b" application/msgpack ;v=1"):
        assert is_msgpack((("Content-Type", v),)), v
    for v in (b"application/json", b"application/msgpackx", b"text/plain; application/msgpack", None, b""):
        assert not is_msgpack((("content-type", v),)), v
    assert not is_msgpack(None) and not is_msgpack((("x-type", b"application/msgpack"),))


def test_a_driver_or_assignment_over_16_kib_is_refused_on_every_path():
    """A driver or assignment goes out in every snapshot of its vehicle, to
    every client that sees it: over MAX_OBJECT_BYTES as compact JSON it is
    `invalid_field`, from JSON and msgpack records, on the compiled path, and
    from a Redis hash (validate); at the bound it is taken."""
    MAX_OBJECT_BYTES = 16 << 10   # realtime.ingest.decode's, as docs/protocol.md gives it

    def sized(n):   # {"n":"xxx…"} of exactly n bytes as compact JSON
        return {"n": "x" * (n - len('{"n":""}'))}
    base = {"timestamp": 1_700_000_000_000, "position": {"lat": 1.0, "lon": 2.0}}
    cases = [({"driver": sized(MAX_OBJECT_BYTES)}, None),
             ({"driver": sized(MAX_OBJECT_BYTES + 1)}, "invalid_field"),
             ({"assignment": sized(MAX_OBJECT_BYTES + 1)}, "invalid_field"),
             ({"assignment": {"route": [sized(4000)] * 5}}, "invalid_field")]
    for extra, reason in cases:
        update = {"vehicle_id": "big-1", **base, **extra}
        for value, mp in ((json.dumps(update).encode(), False), (msgpack.packb(update), True)):
            if reason is None:
                decode_record(value, mp)
            else:
                with pytest.raises(Rejected) as e:
                    decode_record(value, mp)
                assert e.value.reason == reason and "bytes as JSON" in e.value.detail, extra
        if reason is None:
            validate(update)
        else:
            with pytest.raises(Rejected):
                validate(update)
    # the compiled decoder agrees, record by record
    same([[Rec(json.dumps({"vehicle_id": f"big-{i}", **base, **extra}).encode(), (), i)
           for i, (extra, _) in enumerate(cases)]])


def test_values_that_grow_as_json_are_measured_as_json():
    """What a record is read from can be far shorter than its JSON: msgpack's
    1-byte nil is `null,`, JSON's `1e15` is written back as
    `1000000000000000.0`. Such a driver over the bound is refused however
    short the record (a review found both taken: 15 KB records holding
    60-90 KB of JSON), on the compiled path as in decode_record."""
    base = {"timestamp": 1_700_000_000_000, "position": {"lat": 1.0, "lon": 2.0}}
    nils = {"vehicle_id": "grow-0", **base, "driver": {"a": [None] * 15000}}
    with pytest.raises(Rejected) as e:
        decode_record(msgpack.packb(nils), True)
    assert e.value.reason == "invalid_field"
    def record(i, n):   # the text a producer wrote: `1e15`, not what json.dumps makes of it
        head = json.dumps({"vehicle_id": f"grow-{i}", **base})[:-1]
        return (head + ', "assignment": {"a": [' + ",".join(["1e15"] * n) + "]}}").encode()
    exps = [Rec(record(i, n), (), i) for i, n in enumerate((3200, 500))]
    assert len(exps[0].value) < 17_000
    with pytest.raises(Rejected) as e:
        decode_record(exps[0].value)
    assert e.value.reason == "invalid_field"
    decode_record(exps[1].value)   # 500 of them: 9.5 KB as JSON, taken
    same([exps])
