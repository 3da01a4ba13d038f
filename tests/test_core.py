"""The compiled core against the numpy reference: same tests, same streams."""
import json
import math

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from realtime._core import CLIENT_DTYPE, VEHICLE_DTYPE, Core, UpdateBatch, _kernel
from realtime._core import _schema as S
from realtime._core._reference import ReferenceCore

IMPLS = [Core, ReferenceCore]
NAN = float("nan")


def decode(fmt, body):
    return json.loads(body) if fmt == S.FMT_JSON else msgpack.unpackb(body, raw=False)


def tick_by_client(core, rebuild=True):
    out = {}
    for body, rows in core.tick(rebuild):
        for c in rows:
            assert int(c) not in out, "a client got two bodies in one tick"
            out[int(c)] = decode(int(core.clients[c]["fmt"]), body)
    return out


def upd(core, vid, lat, lon, ts, speed=NAN, course=NAN, status=None, vtype=None,
        alerts=None, driver=None, assignment=None, groups=None, now=0.0):
    b = UpdateBatch(
        [vid], [lat], [lon], [speed], [course],
        [S.STATUS_CODE[status] if status else S.KEEP],
        [core.vtype_code(vtype) if vtype else S.KEEP], [ts],
        [tuple(alerts) if alerts is not None else None], [driver], [assignment],
        [tuple(groups) if groups is not None else None])
    return core.apply(b, now)


def test_layouts_agree():
    (vsize, voff), (csize, coff) = _kernel.layout()
    assert vsize == VEHICLE_DTYPE.itemsize
    assert voff == {k: VEHICLE_DTYPE.fields[k][1] for k in VEHICLE_DTYPE.names}
    assert csize == CLIENT_DTYPE.itemsize
    assert coff == {k: CLIENT_DTYPE.fields[k][1] for k in CLIENT_DTYPE.names}


@pytest.fixture(params=IMPLS, ids=lambda c: c.__name__)
def core(request):
    return request.param(vehicle_capacity=64, client_capacity=64)


def test_apply_counts_older_updates_and_returns_masks(core):
    rows, masks = upd(core, "a", 55.0, 37.0, 1000, speed=10, status="moving", vtype="truck")
    assert list(rows) == [0]
    assert masks[0] & S.F_P and masks[0] & S.F_S and masks[0] & S.F_ST and masks[0] & S.F_VT
    rows, masks = upd(core, "a", 56.0, 37.0, 999)
    assert len(rows) == 0 and core.ignored_stale == 1
    assert core.cur[0]["lat"] == 55.0
    rows, masks = upd(core, "a", 55.0, 37.0, 2000, speed=10)
    assert list(masks) == [S.F_TS]  # newer timestamp alone
    rows, masks = upd(core, "a", 55.0, 37.0, 2000)
    assert len(rows) == 0  # nothing at all changed


def test_subscribe_full_then_pos_delta_leave(core):
    upd(core, "a", 55.75, 37.61, 1, speed=10, course=90, status="moving", vtype="truck",
        driver={"name": "I", "phone": "+7"}, alerts=[])
    upd(core, "b", 10.0, 10.0, 1, status="idle", vtype="van")
    core.tick()
    c = core.add_client(contacts=False)
    visible, body = core.subscribe(c, bounds=(55, 37, 56, 38))
    assert visible == 1
    msgs = decode(0, body)
    assert msgs == [{"t": "full", "v": "a", "p": [55.75, 37.61], "s": 10, "c": 90, "st": "moving",
                     "vt": "truck", "ts": 1, "al": [], "dr": {"name": "I"}}]
    # nothing changed -> nothing
    upd(core, "a", 55.75, 37.61, 2)
    assert tick_by_client(core) == {}
    # position only -> pos
    upd(core, "a", 55.76, 37.62, 3, speed=11)
    assert tick_by_client(core) == {c: [{"t": "pos", "v": "a", "p": [55.76, 37.62], "s": 11, "c": 90, "ts": 3}]}
    # status -> delta with only the changed keys
    upd(core, "a", 55.76, 37.62, 4, status="stopped")
    assert tick_by_client(core) == {c: [{"t": "delta", "v": "a", "ch": {"st": "stopped"}, "ts": 4}]}
    # phone change is invisible without view_driver_contacts
    upd(core, "a", 55.76, 37.62, 5, driver={"name": "I", "phone": "+8"})
    assert tick_by_client(core) == {}
    # leaves the viewport
    upd(core, "a", 50.0, 37.62, 6)
    assert tick_by_client(core) == {c: [{"t": "leave", "v": "a", "r": "viewport"}]}
    # comes back -> full
    upd(core, "a", 55.5, 37.5, 7)
    out = tick_by_client(core)
    assert out[c][0]["t"] == "full" and out[c][0]["p"] == [55.5, 37.5]


def test_viewport_diff_and_unsubscribe(core):
    for i, lon in enumerate([10.0, 20.0, 30.0]):
        upd(core, f"v{i}", 0.0, lon, 1, status="moving")
    core.tick()
    c = core.add_client()
    n, body = core.subscribe(c, bounds=(-1, 5, 1, 25))
    assert n == 2 and [m["v"] for m in decode(0, body)] == ["v0", "v1"]
    body = core.set_viewport(c, (-1, 15, 1, 35))
    assert decode(0, body) == [
        {"t": "full", "v": "v2", "p": [0, 30], "s": 0, "c": 0, "st": "moving", "vt": "unknown", "ts": 1, "al": []},
        {"t": "leave", "v": "v0", "r": "viewport"},
    ]
    body = core.unsubscribe(c)
    assert decode(0, body) == [{"t": "leave", "v": "v1", "r": "subscription"},
                               {"t": "leave", "v": "v2", "r": "subscription"}]
    assert core.visible_count(c) == 0


def test_groups_filters_and_permissions(core):
    upd(core, "a", 1, 1, 1, status="moving", vtype="truck", groups=["north"])
    upd(core, "b", 1, 1, 1, status="idle", vtype="van", groups=["south"])
    upd(core, "c", 1, 1, 1, status="moving", vtype="van", groups=["north"])
    core.tick()
    restricted = core.add_client(view_all=False, vehicles=["a"], groups=["south"])
    n, _ = core.subscribe(restricted)
    assert n == 2 and set(core.ids[r] for r in core.visible_rows(restricted)) == {"a", "b"}
    g = core.add_client()
    n, _ = core.subscribe(g, groups=["north"], statuses=["moving"], vehicle_types=["van"])
    assert [core.ids[r] for r in core.visible_rows(g)] == ["c"]
    # c stops -> filtered out
    upd(core, "c", 1, 1, 2, status="stopped")
    out = tick_by_client(core)
    assert out[g] == [{"t": "leave", "v": "c", "r": "filter"}]
    # a joins the north... a truck, not shown; b joins north as a van but idle
    upd(core, "b", 1, 1, 3, status="moving", groups=["north"])
    out = tick_by_client(core)
    assert out[g][0]["t"] == "full" and out[g][0]["v"] == "b"
    assert out[restricted] == [{"t": "leave", "v": "b", "r": "permission"}]
    # rights widen to everything on refresh
    body = core.set_rights(restricted, view_all=True)
    assert [m["v"] for m in decode(0, body)] == ["b", "c"]  # only what came in


def test_many_groups(core):
    for i in range(40):
        upd(core, f"v{i}", 1, 1, 1, groups=[f"g{i}", "all"])
    core.tick()
    c = core.add_client(view_all=False, groups=[f"g{i}" for i in range(0, 40, 2)])
    n, _ = core.subscribe(c, groups=["all"])
    assert n == 20


def test_unknown_vehicle_type_filter_matches_later_types(core):
    c = core.add_client()
    core.subscribe(c, vehicle_types=["tractor"])
    upd(core, "t", 1, 1, 1, vtype="tractor")
    upd(core, "u", 1, 1, 1, vtype="bus")
    assert [m["v"] for m in tick_by_client(core)[c]] == ["t"]


def test_events_and_alerts_respect_visibility_and_show_alerts(core):
    upd(core, "a", 1, 1, 1, status="moving")
    upd(core, "b", 50, 50, 1, status="moving")
    core.tick()
    sees = core.add_client(fmt=S.FMT_MSGPACK)
    core.subscribe(sees, bounds=(0, 0, 2, 2))
    quiet = core.add_client()
    core.subscribe(quiet, show_alerts=False)
    assert core.add_event("a", "geofence_enter", {"zone": "dock"}, "1-0", 5)
    assert not core.add_event("nope", "x", {}, "2-0", 5)
    upd(core, "a", 1.5, 1, 6, alerts=["overspeed"])
    assert core.new_alerts == [(0, "overspeed")]
    core.add_event("a", "alert", {"alert": "overspeed"}, "3-0", 6, is_alert=True)
    out = tick_by_client(core)
    assert [m["t"] for m in out[sees]] == ["event", "event", "delta"]
    assert out[sees][0] == {"t": "event", "v": "a", "e": "geofence_enter", "d": {"zone": "dock"},
                            "eid": "1-0", "ts": 5}
    assert out[sees][2]["ch"] == {"p": [1.5, 1], "al": ["overspeed"]}
    # the client without alerts gets the instant event, a pos, no alert and no `al`
    assert [m["t"] for m in out[quiet]] == ["event", "pos"]


def test_priority_lanes_moving_before_idle(core):
    upd(core, "idle1", 1, 1, 1, status="idle")
    upd(core, "mov", 1, 1, 1, status="moving")
    c = core.add_client()
    core.tick()
    core.subscribe(c)
    upd(core, "idle1", 1.1, 1, 2)
    upd(core, "mov", 1.1, 1, 2)
    core.add_event("idle1", "door_open", {}, "9-0", 2)
    assert [(m["t"], m["v"]) for m in tick_by_client(core)[c]] == [
        ("event", "idle1"), ("pos", "mov"), ("pos", "idle1")]


def test_identical_clients_share_one_body(core):
    upd(core, "a", 1, 1, 1, status="moving")
    core.tick()
    cs = [core.add_client() for _ in range(5)]
    for c in cs:
        core.subscribe(c)
    upd(core, "a", 1.2, 1, 2)
    out = core.tick()
    assert len(out) == 1 and sorted(out[0][1]) == cs


def test_clustered_clients_get_no_vehicle_messages_but_keep_events(core):
    for i in range(10):
        upd(core, f"v{i}", 1 + i * 0.01, 1, 1, status="moving")
    core.tick()
    c = core.add_client()
    core.subscribe(c)
    assert core.set_clustered(c, True) is None
    cells = core.cluster_cells(c, 1.0)
    assert cells == [[1.045, 1.0, 10]]
    upd(core, "v0", 1.5, 1, 2)
    core.add_event("v1", "door", {}, "1-0", 2)
    assert [m["t"] for m in tick_by_client(core)[c]] == ["event"]
    body = core.set_clustered(c, False)
    msgs = decode(0, body)
    assert len(msgs) == 10 and {m["t"] for m in msgs} == {"full"}


def test_commands_require_a_tick_first(core):
    from realtime._core import TickPending
    c = core.add_client()
    upd(core, "a", 1, 1, 1)
    with pytest.raises(TickPending):
        core.subscribe(c)


def test_antimeridian_viewport(core):
    upd(core, "east", 0, 179.5, 1)
    upd(core, "west", 0, -179.5, 1)
    upd(core, "mid", 0, 0, 1)
    core.tick()
    c = core.add_client()
    n, _ = core.subscribe(c, bounds=(-1, 179, 1, -179))
    assert n == 2


def test_msgpack_and_json_agree(core):
    j, m = core.add_client(fmt=S.FMT_JSON), core.add_client(fmt=S.FMT_MSGPACK)
    upd(core, "a", 55.123456, 37.654321, 1705314600123, speed=65.2, course=180, status="moving",
        vtype="truck", driver={"name": "Иванов", "phone": "+7"}, assignment={"client": "ООО"},
        alerts=["overspeed:65/60 км/ч"])
    core.tick()
    _, bj = core.subscribe(j)
    _, bm = core.subscribe(m)
    assert decode(0, bj) == decode(1, bm)
    upd(core, "a", 55.2, 37.7, 1705314600124, status="idle", assignment={"client": "X"})
    out = tick_by_client(core)
    assert out[j] == out[m]


def test_growth_of_vehicles_and_clients(core):
    cs = [core.add_client() for _ in range(130)]
    for c in cs:
        core.subscribe(c)
    for i in range(200):
        upd(core, f"v{i}", 1, 1, 1)
    out = tick_by_client(core)
    assert len(out) == 130 and all(len(v) == 200 for v in out.values())
    core.remove_client(cs[3])
    upd(core, "v0", 2, 2, 2)
    assert len(tick_by_client(core)) == 129


# ---------------------------------------------------------------- property test
VIDS = [f"v{i}" for i in range(12)]
GROUPS = ["g1", "g2", "g3"]
TYPES = ["truck", "van", "car"]

bounds_st = st.one_of(
    st.none(),
    st.tuples(st.floats(-10, 10), st.floats(-10, 10), st.floats(0, 15), st.floats(0, 15)).map(
        lambda t: (t[0], t[1], t[0] + t[2], t[1] + t[3]))
)
update_st = st.fixed_dictionaries({
    "vid": st.sampled_from(VIDS),
    "lat": st.floats(-10, 10),
    "lon": st.floats(-10, 10),
    "dts": st.integers(-2, 3),
    "speed": st.one_of(st.just(NAN), st.sampled_from([0.0, 10.0, 60.5])),
    "status": st.one_of(st.none(), st.sampled_from(S.STATUSES[:4])),
    "vtype": st.one_of(st.none(), st.sampled_from(TYPES)),
    "alerts": st.one_of(st.none(), st.lists(st.sampled_from(["a1", "a2"]), max_size=2, unique=True)),
    "driver": st.one_of(st.none(), st.sampled_from([{"name": "x"}, {"name": "x", "phone": "1"},
                                                    {"name": "x", "phone": "2"}])),
    "groups": st.one_of(st.none(), st.lists(st.sampled_from(GROUPS), max_size=2, unique=True)),
})
op_st = st.one_of(
    st.tuples(st.just("updates"), st.lists(update_st, min_size=1, max_size=8)),
    st.tuples(st.just("add"), st.integers(0, 1), st.booleans(),
              st.lists(st.sampled_from(VIDS), max_size=3), st.lists(st.sampled_from(GROUPS), max_size=1),
              st.booleans()),
    st.tuples(st.just("subscribe"), st.integers(0, 7), st.lists(st.sampled_from(VIDS), max_size=3),
              st.lists(st.sampled_from(GROUPS), max_size=2), bounds_st,
              st.one_of(st.none(), st.lists(st.sampled_from(S.STATUSES[:4]), min_size=1, max_size=2)),
              st.one_of(st.none(), st.lists(st.sampled_from(TYPES), min_size=1, max_size=2)),
              st.booleans()),
    st.tuples(st.just("viewport"), st.integers(0, 7), bounds_st),
    st.tuples(st.just("unsubscribe"), st.integers(0, 7)),
    st.tuples(st.just("cluster"), st.integers(0, 7), st.booleans()),
    st.tuples(st.just("remove"), st.integers(0, 7)),
    st.tuples(st.just("event"), st.sampled_from(VIDS), st.booleans()),
    st.tuples(st.just("rights"), st.integers(0, 7), st.booleans(), st.lists(st.sampled_from(VIDS), max_size=3),
              st.booleans()),
)


def run_ops(core, ops):
    stream = []
    clients = []
    ts = {v: 100 for v in VIDS}
    eid = 0
    for op in ops:
        kind = op[0]
        if kind == "updates":
            rows = []
            for u in op[1]:
                ts[u["vid"]] += u["dts"]
                rows.append(u)
            b = UpdateBatch(
                [u["vid"] for u in rows], [u["lat"] for u in rows], [u["lon"] for u in rows],
                [u["speed"] for u in rows], [NAN] * len(rows),
                [S.STATUS_CODE[u["status"]] if u["status"] else S.KEEP for u in rows],
                [core.vtype_code(u["vtype"]) if u["vtype"] else S.KEEP for u in rows],
                [ts[u["vid"]] for u in rows],
                [tuple(u["alerts"]) if u["alerts"] is not None else None for u in rows],
                [u["driver"] for u in rows], [None] * len(rows),
                [tuple(u["groups"]) if u["groups"] is not None else None for u in rows])
            r, m = core.apply(b)
            stream.append(("apply", r.tolist(), m.tolist(), list(core.new_alerts), core.ignored_stale))
            continue
        # commands' ticks do not rebuild the spatial index: both paths are checked
        stream.append(("tick", tick_by_client(core, rebuild=len(stream) % 3 != 1)))
        if kind == "add":
            _, fmt, view_all, vids, groups, contacts = op
            clients.append(core.add_client(fmt, view_all, vids, groups, contacts))
            continue
        if kind == "event":
            eid += 1
            stream.append(core.add_event(op[1], "alert" if op[2] else "ping", {"n": eid}, f"{eid}-0",
                                         eid, is_alert=op[2]))
            continue
        if not clients:
            continue
        c = clients[op[1] % len(clients)]
        fmt = int(core.clients[c]["fmt"])
        if kind == "subscribe":
            _, _, vids, groups, bounds, statuses, types, show = op
            n, body = core.subscribe(c, vids, groups, bounds, None, statuses, types, show)
            stream.append((kind, c, n, decode(fmt, body)))
        elif kind == "viewport":
            stream.append((kind, c, decode(fmt, core.set_viewport(c, op[2]))))
        elif kind == "unsubscribe":
            stream.append((kind, c, decode(fmt, core.unsubscribe(c))))
        elif kind == "cluster":
            body = core.set_clustered(c, op[2])
            stream.append((kind, c, None if body is None else decode(fmt, body),
                           core.cluster_cells(c, 1.0)))
        elif kind == "rights":
            _, _, view_all, vids, contacts = op
            stream.append((kind, c, decode(fmt, core.set_rights(c, view_all, vids, (), contacts))))
        elif kind == "remove":
            core.remove_client(c)
            clients.remove(c)
    stream.append(("tick", tick_by_client(core)))
    return stream


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op_st, min_size=1, max_size=30))
def test_compiled_core_matches_reference(ops):
    a = run_ops(Core(vehicle_capacity=8, client_capacity=8), ops)
    b = run_ops(ReferenceCore(vehicle_capacity=8, client_capacity=8), ops)
    assert a == b


def test_larger_random_fleet_matches_reference():
    cores = [Core(), ReferenceCore()]
    streams = [[], []]
    for core, stream in zip(cores, streams):
        r = np.random.default_rng(7)
        clients = [core.add_client(fmt=int(r.integers(0, 2)), contacts=bool(r.integers(0, 2))) for _ in range(150)]
        for c in clients:
            lat, lon = r.uniform(-5, 5), r.uniform(-5, 5)
            core.subscribe(c, bounds=(lat, lon, lat + r.uniform(0.1, 4), lon + r.uniform(0.1, 4)),
                           show_alerts=bool(r.integers(0, 2)))
        for t in range(6):
            n = 300
            b = UpdateBatch([f"v{i}" for i in r.integers(0, 500, n)], r.uniform(-6, 6, n), r.uniform(-6, 6, n),
                            r.choice([NAN, 5.0, 50.0], n), r.uniform(0, 360, n), r.integers(0, 4, n),
                            [S.KEEP] * n, np.full(n, t), None, None, None, None)
            core.apply(b)
            stream.append(tick_by_client(core, rebuild=t % 2 == 0))
            # viewports move between ticks: routed by the pending list until a rebuild
            for c in r.choice(clients, 10, replace=False):
                lat, lon = r.uniform(-5, 5), r.uniform(-5, 5)
                _, body = core.subscribe(int(c), bounds=(lat, lon, lat + 2, lon + 2))
                stream.append(decode(int(core.clients[c]["fmt"]), body))
    assert streams[0] == streams[1]
    assert sum(len(v) for o in streams[0] if isinstance(o, dict) for v in o.values()) > 1000


# ---------------------------------------------------------------- liveness (PROTOCOL §3.3)
def test_idle_jitter_is_held_back_until_the_interval_then_sent_with_the_latest(core):
    core.jitter_s, core.jitter_m = 30.0, 50.0
    upd(core, "i", 55.0, 37.0, 1, status="idle", now=0.0)
    upd(core, "m", 56.0, 38.0, 1, status="moving", now=0.0)
    core.tick(True, 0.0)
    c = core.add_client()
    core.subscribe(c)
    # ~11 m of jitter while idle: held; the same for a moving vehicle: sent
    upd(core, "i", 55.0001, 37.0, 2, status="idle", now=5.0)
    upd(core, "m", 56.0001, 38.0, 2, status="moving", now=5.0)
    out = {int(c2): decode(0, b) for b, cs in core.tick(True, 5.0) for c2 in cs}
    assert [m["v"] for m in out[c]] == ["m"]
    # a status change is never held, a big move neither
    upd(core, "i", 55.0002, 37.0, 3, status="idle", now=10.0)
    assert core.tick(True, 10.0) == []
    upd(core, "i", 55.01, 37.0, 4, status="idle", now=12.0)
    out = {int(c2): decode(0, b) for b, cs in core.tick(True, 12.0) for c2 in cs}
    assert out[c] == [{"t": "pos", "v": "i", "p": [55.01, 37.0], "s": 0, "c": 0, "ts": 4}]
    # jitter again: held until 30 s after that send, then the latest goes out
    upd(core, "i", 55.0101, 37.0, 5, status="idle", now=20.0)
    assert core.tick(True, 20.0) == []
    upd(core, "i", 55.0102, 37.0, 6, status="idle", now=43.0)
    out = {int(c2): decode(0, b) for b, cs in core.tick(True, 43.0) for c2 in cs}
    assert out[c] == [{"t": "pos", "v": "i", "p": [55.0102, 37.0], "s": 0, "c": 0, "ts": 6}]


def test_jitter_and_a_real_change_in_one_batch_is_sent(core):
    core.jitter_s, core.jitter_m = 30.0, 50.0
    upd(core, "i", 55.0, 37.0, 1, status="idle", now=0.0)
    core.tick(True, 0.0)
    c = core.add_client()
    core.subscribe(c)
    b = UpdateBatch(["i", "i"], [55.0, 55.0001], [37.0, 37.0], [NAN, NAN], [NAN, NAN],
                    [S.STATUS_CODE["stopped"], S.KEEP], [S.KEEP, S.KEEP], [2, 3],
                    None, None, None, None)
    core.apply(b, 1.0)
    out = {int(c2): decode(0, x) for x, cs in core.tick(True, 1.0) for c2 in cs}
    assert out[c] == [{"t": "delta", "v": "i", "ch": {"p": [55.0001, 37.0], "st": "stopped"}, "ts": 3}]


def test_silent_vehicle_goes_offline_then_back_with_its_status(core):
    upd(core, "a", 55.0, 37.0, 1000, status="moving", vtype="truck", now=0.0)
    upd(core, "b", 55.1, 37.1, 1000, status="idle", now=250.0)
    core.tick(True, 250.0)
    c = core.add_client()
    core.subscribe(c)
    silent = core.silent_rows(301.0 - 300.0)
    assert [core.ids[r] for r in silent] == ["a"]
    assert list(core.mark_offline(silent)) == [core.row_of("a")]
    assert len(core.mark_offline(silent)) == 0           # already offline
    out = {int(c2): decode(0, x) for x, cs in core.tick(True, 301.0) for c2 in cs}
    assert out[c] == [{"t": "delta", "v": "a", "ch": {"st": "offline"}, "ts": 1000}]
    # the same state re-read (a reconcile) is not news: still silent
    upd(core, "a", 55.0, 37.0, 1000, now=302.0)
    assert core.row_of("a") in core.silent_rows(1.0)
    # it reports again without a status: the one it had before silence
    upd(core, "a", 55.0, 37.0, 2000, now=400.0)
    out = {int(c2): decode(0, x) for x, cs in core.tick(True, 400.0) for c2 in cs}
    assert out[c] == [{"t": "delta", "v": "a", "ch": {"st": "moving"}, "ts": 2000}]
    assert core.row_of("a") not in core.silent_rows(399.0)


def test_many_stale_vehicles_leave_each_client_that_saw_them_once_in_order(core):
    """forget() of many rows at once (vectorised): every client gets exactly
    the `leave`s of the rows it saw, in row order, and clients that saw the
    same rows in the same format share one body. 150 clients: three words of bits."""
    for i in range(10):
        upd(core, f"v{i}", 55.0, 37.0, 1, groups=[f"g{i % 3}"], now=0.0)
    core.tick(True, 0.0)
    clients = {}
    for c in range(150):
        g = f"g{c % 3}"
        row = core.add_client(fmt=S.FMT_MSGPACK if c % 2 else S.FMT_JSON, view_all=False, groups=[g])
        core.subscribe(row)
        clients[row] = [f"v{i}" for i in range(10) if i % 3 == c % 3]
    stale = core.silent_rows(1.0)
    assert len(stale) == 10
    out = core.forget(stale)
    got: dict = {}
    for body, cs in out:
        for c in cs:
            assert c not in got
            got[int(c)] = [m["v"] for m in decode(int(core.clients[c]["fmt"]), body)]
    assert got == clients
    assert len(out) == 6          # three groups of rows x two formats
    assert all(core.row_of(f"v{i}") == -1 for i in range(10))


def test_stale_vehicle_leaves_with_reason_stale_and_its_row_is_reused(core):
    upd(core, "old", 55.0, 37.0, 1, status="idle", groups=["g"], now=0.0)
    upd(core, "new", 55.0, 37.0, 1, status="idle", now=7000.0)
    core.tick(True, 7000.0)
    a = core.add_client()
    core.subscribe(a)
    b = core.add_client(fmt=S.FMT_MSGPACK, view_all=False, groups=["g"])
    core.subscribe(b)
    g = core.add_client(view_all=False, groups=["g"])
    core.subscribe(g, bounds=(10, 10, 11, 11))    # sees neither
    row = core.row_of("old")
    stale = core.silent_rows(7201.0 - 7200.0)
    assert list(stale) == [row]
    out = {int(c): decode(int(core.clients[c]["fmt"]), x) for x, cs in core.forget(stale) for c in cs}
    assert out == {a: [{"t": "leave", "v": "old", "r": "stale"}],
                   b: [{"t": "leave", "v": "old", "r": "stale"}]}
    assert core.row_of("old") == -1 and core.long_form("old", False) is None
    assert core.group_members("g") == []
    assert core.visible_count(a) == 1
    # the row is reused, clean; the group client does not see a stranger
    upd(core, "fresh", 55.0, 37.0, 5, status="moving", now=7300.0)
    assert core.row_of("fresh") == row
    out = {int(c): decode(int(core.clients[c]["fmt"]), x) for x, cs in core.tick(True, 7300.0) for c in cs}
    assert list(out) == [a] and out[a][0]["t"] == "full" and out[a][0]["v"] == "fresh"
    # and the forgotten one may come back as new
    upd(core, "old", 55.0, 37.0, 9, status="idle", groups=["g"], now=7400.0)
    out = {int(c): decode(int(core.clients[c]["fmt"]), x) for x, cs in core.tick(True, 7400.0) for c in cs}
    assert out[b][0]["t"] == "full" and out[b][0]["v"] == "old"


def test_resync_sends_latest_state_and_leaves_since_the_known_set(core):
    for i, vid in enumerate("abc"):
        upd(core, vid, 55.0 + i / 100, 37.0, 1, status="moving", now=0.0)
    core.tick(True, 0.0)
    c = core.add_client()
    core.subscribe(c, bounds=(54, 36, 56, 38))
    known = core.visible_rows(c)
    # while the client is not written to: a moves, b leaves the box, d arrives
    upd(core, "a", 55.5, 37.5, 2, now=1.0)
    upd(core, "b", 10.0, 10.0, 2, now=1.0)
    upd(core, "d", 55.2, 37.2, 2, status="idle", now=1.0)
    core.tick(True, 1.0)
    msgs = decode(0, core.resync(c, known))
    assert {m["v"]: m["t"] for m in msgs} == {"a": "full", "c": "full", "d": "full", "b": "leave"}
    assert [m for m in msgs if m["v"] == "a"][0]["p"] == [55.5, 37.5]
    assert [m for m in msgs if m["v"] == "b"][0]["r"] == "viewport"


# ---------------------------------------------------------------- fan-out frames
@pytest.mark.parametrize("seq", [1, 127, 128, 255, 256, 65535, 65536, 2**32, 2**40])
@pytest.mark.parametrize("batch_id", [b"a1-2", b"x" * 31, b"y" * 40])
@pytest.mark.parametrize("body_len", [10, 200, 70000])
def test_compiled_fanout_frame_equals_the_python_envelope(seq, batch_id, body_len):
    from realtime._core._fanout import ws_frame
    from realtime.transports.websocket import frame_header
    for fmt, body in ((S.FMT_JSON, b"[" + b"1," * (body_len // 2) + b"1]"),
                      (S.FMT_MSGPACK, b"\x91" + b"\xc4" + b"x" * body_len)):
        prefix, suffix = Core.envelope(fmt, batch_id, seq)
        payload = prefix + body + suffix
        expected = frame_header(0x80 | (0x1 if fmt == S.FMT_JSON else 0x2), len(payload)) + payload
        assert ws_frame(fmt, batch_id, seq, body) == expected
        if fmt == S.FMT_MSGPACK and body_len == 10:
            assert msgpack.unpackb(payload[:len(prefix)] + b"\x90", raw=False)["seq"] == seq


# ---------------------------------------------------------------- groups (PROTOCOL §3.5)
def test_group_names_nobody_carries_cost_no_group_row(core):
    upd(core, "a", 1, 1, 1, groups=["north"])
    core.tick()
    c = core.add_client()
    rows_before = core.group_bits.shape[0]
    for i in range(200):
        core.subscribe(c, groups=[f"invented-{i}-{j}" for j in range(10)])
    assert set(core.group_id) == {"north"} and core.group_bits.shape[0] == rows_before
    # a name becomes a group when a vehicle carries it, and a subscription that named it sees it
    visible, _ = core.subscribe(c, groups=["later"])
    assert visible == 0
    upd(core, "b", 1, 1, 2, groups=["later"])
    got = tick_by_client(core)
    assert [m["v"] for m in got[c] if m["t"] == "full"] == ["b"]


def test_group_rows_are_released_and_reused(core):
    c = core.add_client()
    core.subscribe(c, groups=["g1"])
    upd(core, "a", 1, 1, 1, groups=["g1"])
    core.tick()
    gid = core.group_id["g1"]
    upd(core, "a", 1, 1, 2, groups=["g2"])          # a left g1; the subscription keeps its row
    core.tick()
    assert "g1" in core.group_id
    core.subscribe(c, groups=["g2"])               # nobody names g1 any more: released
    assert "g1" not in core.group_id and gid in core.group_free
    upd(core, "b", 1, 1, 3, groups=["g3"])
    core.tick()
    assert core.group_id["g3"] == gid             # the row is reused, cleared
    assert core.group_members("g3") == ["b"]
    core.subscribe(c, groups=["g3"])
    assert "g2" in core.group_id                   # a still carries it
    core.forget([core.row_of("a")])                 # a stale vehicle leaves its groups
    assert "g2" not in core.group_id and set(core.group_id) == {"g3"}


def test_the_registry_s_groups_outlast_updates_and_go_when_it_drops_them(core):
    """§1.3 `group:{name}:vehicles` (set_group_members) is all of that group:
    an update's groups add to it, never take it away; a vehicle the registry
    no longer names leaves the group, unless its updates carry the group."""
    upd(core, "a", 1, 1, 1, groups=["north"])
    upd(core, "b", 1, 1, 1, groups=["north"])
    core.tick()
    depot = core.add_client(view_all=False, groups=["depot"])
    core.subscribe(depot)
    core.set_group_members("depot", ["a", "b"])
    got = tick_by_client(core)
    assert sorted(m["v"] for m in got[depot] if m["t"] == "full") == ["a", "b"]
    upd(core, "a", 2, 2, 2, groups=["south"])       # moves from north to south
    got = tick_by_client(core)
    assert core.groups_of[core.row_of("a")] == ("south", "depot")
    assert [m["t"] for m in got[depot]] == ["pos"]   # still in depot: no leave
    core.set_group_members("depot", ["a"])           # the registry drops b
    got = tick_by_client(core)
    assert got[depot] == [{"t": "leave", "v": "b", "r": "permission"}]
    assert core.groups_of[core.row_of("b")] == ("north",) and "b" not in core.registry_of
    core.set_group_members("depot", [])              # the registry's set is gone
    got = tick_by_client(core)
    assert got[depot] == [{"t": "leave", "v": "a", "r": "permission"}]
    assert core.groups_of[core.row_of("a")] == ("south",) and core.registry_members == {}
    assert core.registry_of == {}
    upd(core, "a", 3, 3, 3, groups=["depot"])       # its own update carries depot: back
    got = tick_by_client(core)
    assert [(m["t"], m["v"]) for m in got[depot]] == [("full", "a")]
    core.set_group_members("depot", ["a"])           # the registry names it too, then drops it:
    core.set_group_members("depot", [])              # its updates still carry depot, so it stays
    assert core.groups_of[core.row_of("a")] == ("depot",) and tick_by_client(core).get(depot, []) == []
    core.set_group_members("depot", ["a", "", "x" * 129])   # ids no vehicle can have are not made
    assert core.row_of("") < 0 and core.row_of("x" * 129) < 0


def test_a_group_named_twice_by_an_update_is_counted_once(core):
    upd(core, "a", 1, 1, 1, groups=["g", "g"])
    upd(core, "b", 1, 1, 1, groups=["g"])
    core.tick()
    core.forget([core.row_of("a")])
    assert core.group_members("g") == ["b"]         # b still carries it: not freed
    upd(core, "b", 1, 1, 2, groups=["h"])
    core.tick()
    assert "g" not in core.group_id and core.group_members("h") == ["b"]


def test_shared_view_cells_hold_exactly_what_a_client_may_see_in_its_grid_window(core):
    """Issue 14 part 1: view_cells, computed once per view for every client
    with it, against the visibility predicate itself: a twin client with the
    same rights, subscription and filters but no viewport sees the vehicles;
    those in the view's grid cells must be exactly the cells' counts, by
    status. Random fleets, rights, filters and viewports, over the
    antimeridian too. Never more than the rights allow."""
    import random
    from realtime._core._base import grid_window
    rng = random.Random(7)
    statuses = ["moving", "idle", "stopped", "offline"]
    types = ["truck", "van", "car"]
    for i in range(60):
        lat = rng.uniform(-60, 60)
        lon = rng.choice([rng.uniform(-180, 180), rng.uniform(170, 180), rng.uniform(-180, -170)])
        upd(core, f"v{i}", lat, lon, 1000 + i, status=rng.choice(statuses), vtype=rng.choice(types),
            groups=[rng.choice(["g1", "g2"])])
    core.tick()
    for trial in range(25):
        rights = rng.choice([dict(view_all=True), dict(view_all=False, groups=("g1",)),
                             dict(view_all=False, vehicles=tuple(f"v{j}" for j in range(0, 60, 3)))])
        st = rng.choice([None, ["moving"], ["idle", "offline"]])
        vt = rng.choice([None, ["truck"], ["van", "car"]])
        south = rng.uniform(-70, 40)
        north = south + rng.uniform(1, 40)
        west = rng.uniform(-180, 180)
        east = west + rng.uniform(1, 90)
        if east > 180:
            east -= 360   # over the antimeridian
        cell = rng.choice([0.703125, 2.8125, 11.25])
        c = core.add_client(**rights)
        core.subscribe(c, bounds=(south, west, north, east), zoom=None, statuses=st, vehicle_types=vt)
        twin = core.add_client(**rights)
        core.subscribe(twin, statuses=st, vehicle_types=vt)
        key = core.view_key(c, cell)
        assert key == core.view_key(c, cell) and key[:4] != (None,) * 4
        cells = core.view_cells(key)
        y0, y1, x0, x1 = grid_window(south, west, north, east, cell)
        expected = {}
        for r in core.visible_rows(twin):
            lat, lon = float(core.cur["lat"][r]), float(core.cur["lon"][r])
            iy, ix = math.floor((lat + 90) / cell), math.floor((lon + 180) / cell)
            inside = y0 <= iy < y1 and (x0 is None or ((x0 <= ix < x1) if x0 < x1 else (ix >= x0 or ix < x1)))
            if inside:
                counts = expected.setdefault((iy, ix), [0, 0, 0, 0, 0])
                counts[0] += 1
                code = int(core.cur["status"][r])
                if code < 4:
                    counts[1 + code] += 1
        got = {}
        for lat, lon, n, by in cells:
            got[(math.floor((lat + 90) / cell), math.floor((lon + 180) / cell))] = [n, *by]
        assert got == expected, (trial, rights, st, vt, (south, west, north, east), cell)
        # and the viewport itself is inside the window: every vehicle the
        # client sees is counted in a cell
        assert len(core.visible_rows(c)) <= sum(n for _, _, n, _ in cells)
        core.remove_client(c)
        core.remove_client(twin)


def test_a_course_that_rounds_to_360_is_0():
    """Courses are stored with one decimal and in [0, 360) (PROTOCOL §1.1):
    359.96 rounds to 360.0, which is 0, not a value a worker receiving the
    relay would refuse (with the rest of its batch)."""
    b = UpdateBatch(["a", "b", "c", "d"], [1.0] * 4, [1.0] * 4, [np.nan] * 4,
                    [359.96, 359.94, np.nan, 0.04], np.full(4, S.KEEP, np.uint8),
                    np.full(4, S.KEEP, np.uint8), [1] * 4, None, None, None, None)
    assert b.course[0] == 0.0 and b.course[1] == 359.9 and math.isnan(b.course[2]) and b.course[3] == 0.0
    from realtime.ingest.decode import validate
    u = validate({"vehicle_id": "x", "timestamp": 1, "position": {"lat": 1, "lon": 1}, "course": -1e-20})
    assert u["course"] == 0.0


def test_mirror_rows_copies_numbers_maps_types_and_skips_unknown_rows():
    """A follower worker's copy of the owner's rows (mirror.py): the compiled
    kernel and the numpy reference leave the same core behind."""
    owner = Core(vehicle_capacity=64, client_capacity=4)
    for i in range(6):
        upd(owner, f"v{i}", 55.0 + i, 37.0 - i, 1000 + i, speed=10.0 * i, course=3.0 * i,
            status="moving" if i % 2 else "idle", vtype="truck" if i % 3 else "bus",
            alerts=["sos"] if i == 2 else None)
    orows = np.array([5, 0, 3, 9, 2, 40], np.int32)   # 9 and 40: not known to the follower
    recs = np.frombuffer(owner.cur[[5, 0, 3, 0, 2, 0]].tobytes(), VEHICLE_DTYPE)
    after = []
    for impl in IMPLS:
        f = impl(vehicle_capacity=64, client_capacity=4)
        f.vtype_code("car")   # type codes differ between the cores
        for i in range(6):
            f._new_vehicle(f"w{i}")
        f.dirty[:] = 0
        xlate = np.array([3, -1, 1, 0, -1, 5, -1, -1, -1, -1], np.int64)   # owner row -> ours
        types = np.zeros(256, np.uint8)
        for code, name in enumerate(owner.types):
            types[code] = f.vtype_code(name)
        local, skipped = f.mirror_rows(xlate, orows, recs, types)
        assert local.tolist() == [5, 3, 0, 1] and skipped == 2
        assert np.flatnonzero(f.dirty).tolist() == [0, 1, 3, 5]
        for ours, theirs in zip([5, 3, 0, 1], [5, 0, 3, 2]):
            a, b = f.cur[ours], owner.cur[theirs]
            for name in ("lat", "lon", "speed", "course", "ts", "status", "version"):
                assert a[name] == b[name], name
            assert f.types[a["vtype"]] == owner.types[b["vtype"]]
            assert a["al_ver"] == 0 and a["has_alerts"] == 0   # the follower's own
        after.append(f.cur.tobytes())
    assert after[0] == after[1]


def test_compiled_json_numbers_are_the_shortest_text():
    """The compiled encoder writes numbers by hand (no printf): each is the
    text _schema.fmt_num gives, digit for digit: signs, trailing zeros cut,
    whole numbers without a point, 13- and 19-digit timestamps."""
    import re
    rng = np.random.default_rng(7)
    n = 3000
    lat = np.concatenate([rng.uniform(-90, 90, n - 8),
                          [0.0, -0.0, -0.0000004, 0.0000005, -89.999999, 89.9999995, 1e-6, -1e-6]])
    lon = rng.uniform(-180, 180, n)
    lon[:200] = [round(x, int(d)) for x, d in zip(lon[:200], rng.integers(0, 7, 200))]
    speed = np.concatenate([rng.uniform(0, 400, n - 4), [0.0, 0.005, 0.004, 1234.5]])
    course = rng.uniform(0, 360, n)
    course[:100] = np.round(course[:100])
    ts = np.concatenate([rng.integers(0, 2 ** 62, n - 4), [0, 1, 9, 1_700_000_000_000]]).astype(np.int64)
    core = Core(vehicle_capacity=n, client_capacity=1)
    c = core.add_client(fmt=S.FMT_JSON, view_all=True, groups=(), contacts=False)
    core.subscribe(c, bounds=(-90, -180, 90, 180), zoom=3)
    core.tick()
    core.apply(UpdateBatch([f"v{i}" for i in range(n)], lat, lon, speed, course, np.zeros(n, np.uint8),
                           np.zeros(n, np.uint8), ts, None, None, None, None))
    text = b"".join(body for body, _ in core.tick()).decode()
    got = re.findall(r'"v":"(v\d+)","p":\[([^,]+),([^\]]+)\],"s":([^,]+),"c":([^,]+),'
                     r'"st":[^,]+,"vt":[^,]+,"ts":(\d+)', text)
    assert len(got) == n
    for vid, *numbers in got:
        rec = core.cur[core.id_to_row[vid]]
        assert numbers == [S.fmt_num(rec["lat"], 6), S.fmt_num(rec["lon"], 6),
                           S.fmt_num(rec["speed"], S.SPEED_DECIMALS),
                           S.fmt_num(rec["course"], S.COURSE_DECIMALS), str(int(rec["ts"]))], vid


def _scaled_text(k: int, dec: int) -> str:
    """k / 10^dec in exact decimal, trailing zeros of the fraction cut."""
    q, r = divmod(abs(k), 10 ** dec)
    frac = str(r).rjust(dec, "0").rstrip("0") if dec else ""
    return ("-" if k < 0 else "") + str(q) + ("." + frac if frac else "")


def test_compiled_number_text_over_the_whole_int64_range():
    """fmt_scaled, behind every number and timestamp the encoder writes: at
    dec 0 it is "%d" (negatives and INT64_MIN included); at dec 1..6 the exact
    decimal of k / 10^dec, and _schema.fmt_num's text for a value so rounded."""
    rng = np.random.default_rng(11)
    lo, hi = -(2 ** 63), 2 ** 63 - 1
    ks = [0, 1, -1, 9, 10, -10, 100, 120, -120, 1000000, -1000000, 1234500, lo, lo + 1, hi, hi - 1]
    ks += [int(x) for x in rng.integers(lo, hi, 2000, dtype=np.int64)]
    ks += [int(x) for x in rng.integers(-10 ** 9, 10 ** 9, 2000)]
    ks += [int(x) * 10 ** int(e) for x, e in zip(rng.integers(-999, 999, 500), rng.integers(0, 10, 500))]
    for k in ks:
        assert _kernel.fmt_scaled_text(k, 0).decode() == "%d" % k
        for dec in range(1, 7):
            text = _kernel.fmt_scaled_text(k, dec).decode()
            assert text == _scaled_text(k, dec), (k, dec)
            if abs(k) < 2 ** 52:   # a double holds k / 10^dec to the last digit
                assert text == S.fmt_num(k / 10 ** dec, dec), (k, dec)
    with pytest.raises(ValueError):
        _kernel.fmt_scaled_text(1, 7)


@pytest.mark.parametrize("impl", IMPLS)
def test_a_client_format_other_than_json_or_msgpack_is_refused(impl):
    """The compiled encoder picks a piece's encoding by the client's format,
    unchecked: a third value never gets into the client table."""
    core = impl(vehicle_capacity=8, client_capacity=8)
    for fmt in (2, -1, 255):
        with pytest.raises(ValueError):
            core.add_client(fmt=fmt)
    assert core.n_clients == 0
    assert core.add_client(fmt=S.FMT_MSGPACK) == 0


def test_a_vehicle_type_past_the_64_codes_is_unknown_not_another_type(core):
    """Type codes fit a 64-bit filter mask: once they are taken, a new type
    name is `unknown` (as an unrecognised value is), never the name of a
    type that had a code."""
    codes = [core.vtype_code(f"type{i}") for i in range(S.MAX_TYPES - 1)]
    assert codes == list(range(1, S.MAX_TYPES)) and core.types[-1] == f"type{S.MAX_TYPES - 2}"
    assert core.vtype_code("boat") == 0 and core.types[0] == "unknown"
    assert core.vtype_code("type5") == 6   # the named ones keep theirs
    assert core.types_overflowed == 1
