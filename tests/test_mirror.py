"""--workers N: worker 0 owns the fleet and the others mirror it (realtime/mirror.py).

Two hubs in this process, linked by the real Unix socket the workers use:
what the owner applies, forgets and names reaches the follower's core; HTTP
ingest a follower receives is applied by the owner; a new owner's fleet
replaces the follower's; a follower that stops reading is dropped, not
buffered for without end; a link that sends garbage is closed alone.
"""
import asyncio
import contextlib
import time

import msgpack
import numpy as np
import pytest

from realtime import config, mirror
from realtime._core import Core
from realtime._core._schema import KEEP, STATUS_CODE, VEHICLE_DTYPE, UpdateBatch
from realtime.hub import Hub

SECRET = "x" * 32


def hub() -> Hub:
    s = config.Settings(jwt_secret=SECRET, simulate=0)
    s.validate()
    return Hub(s, Core(vehicle_capacity=64, client_capacity=4))


def batch(core, ids, lat=55.0, ts=None, status=None, vtype=None, driver=None, alerts=None, groups=None):
    n = len(ids)
    ts = ts or int(time.time() * 1000)
    return UpdateBatch(ids, [lat + i / 100 for i in range(n)], [37.0] * n, [10.0] * n, [90.0] * n,
                       np.full(n, KEEP if status is None else STATUS_CODE[status], np.uint8),
                       np.full(n, KEEP if vtype is None else core.vtype_code(vtype), np.uint8), [ts] * n,
                       None if alerts is None else [tuple(alerts)] * n, None if driver is None else [driver] * n,
                       None, None if groups is None else [tuple(groups)] * n)


async def until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def state(h: Hub, vid: str):
    c = h.core
    r = c.row_of(vid)
    if r < 0:
        return None
    rec = c.cur[r]
    return (round(float(rec["lat"]), 6), c.types[rec["vtype"]], int(rec["status"]), c.driver[r],
            tuple(c.alerts[r]), tuple(c.groups_of[r]))


@pytest.fixture
async def pair(tmp_path):
    path = str(tmp_path / "owner.sock")
    owner_hub, follower_hub = hub(), hub()
    taken = []

    async def sink(updates):   # app.py's HTTP sink, as the owner has it
        from realtime.ingest.decode import to_batch
        taken.append(updates)
        owner_hub.apply(to_batch(updates, owner_hub.core.vtype_code))

    async with linked(owner_hub, follower_hub, path, sink):
        yield owner_hub, follower_hub, taken, path


@contextlib.asynccontextmanager
async def linked(owner_hub, follower_hub, path, sink):
    """An owner (whose HTTP-ingest sink is `sink`) and a follower on `path`."""
    owner = mirror.Owner(owner_hub, path, sink)
    owner_hub.owner = owner
    follower = mirror.Follower(follower_hub, path)
    follower_hub.follower = follower
    await owner.start()
    follower.start()
    try:
        yield owner, follower
    finally:
        await follower.stop()
        await owner.stop()


async def test_the_follower_gets_the_fleet_its_changes_and_what_is_forgotten(pair, uid):
    owner_hub, follower_hub, _, _ = pair
    o, f = owner_hub.core, follower_hub.core
    # the follower knows another type first: codes differ between the cores, names do not
    f.vtype_code("van")
    owner_hub.apply(batch(o, [uid + "a", uid + "b"], status="moving", vtype="truck",
                          driver={"name": "Ann"}, alerts=["speeding"], groups=["north"]))
    await until(lambda: follower_hub.follower.connected and f.row_of(uid + "b") >= 0)
    for vid in (uid + "a", uid + "b"):
        assert state(follower_hub, vid) == state(owner_hub, vid)
    assert state(follower_hub, uid + "a")[1:] == ("truck", STATUS_CODE["moving"], {"name": "Ann"},
                                                 ("speeding",), ("north",))
    assert sorted(f.group_members("north")) == [uid + "a", uid + "b"]
    # a tick's changes: a new position, a new vehicle, a changed driver
    owner_hub.apply(batch(o, [uid + "a"], lat=56.0, ts=int(time.time() * 1000) + 5))
    owner_hub.apply(batch(o, [uid + "c"], lat=57.0, vtype="bus", driver={"name": "Cy"}))
    owner_hub.apply(batch(o, [uid + "b"], ts=int(time.time() * 1000) + 5, driver={"name": "Bo"}))
    owner_hub.flush()
    await until(lambda: state(follower_hub, uid + "c") is not None and f.driver[f.row_of(uid + "b")] == {"name": "Bo"})
    for vid in (uid + "a", uid + "b", uid + "c"):
        assert state(follower_hub, vid) == state(owner_hub, vid)
    assert state(follower_hub, uid + "a")[0] == 56.0
    # the follower's own tick has them to route: dirty, with its own rich versions
    assert all(f.dirty[f.row_of(v)] for v in (uid + "a", uid + "b", uid + "c"))
    # silent past --stale-after-s on the owner: forgotten there, then here
    o.heard[o.row_of(uid + "c")] = -1e9
    owner_hub.check_vehicles(time.monotonic())
    assert o.row_of(uid + "c") < 0
    owner_hub.flush()
    await until(lambda: f.row_of(uid + "c") < 0)
    assert follower_hub.stats.forgotten == 1
    # its row is reused by the next new vehicle: named again, not confused with c
    owner_hub.apply(batch(o, [uid + "d"], lat=58.0))
    owner_hub.flush()
    await until(lambda: f.row_of(uid + "d") >= 0)
    assert state(follower_hub, uid + "d") == state(owner_hub, uid + "d")
    assert follower_hub.follower.unknown_rows == 0
    # the follower decides nothing on its own: no offline, no forgetting
    f.heard[:] = -1e9
    assert follower_hub.check_vehicles(time.monotonic()) is False
    assert f.row_of(uid + "a") >= 0 and f.cur[f.row_of(uid + "a")]["status"] == STATUS_CODE["moving"]


async def test_offline_on_the_owner_is_offline_on_the_follower(pair, uid):
    owner_hub, follower_hub, _, _ = pair
    o, f = owner_hub.core, follower_hub.core
    owner_hub.apply(batch(o, [uid + "a"], status="moving"))
    await until(lambda: follower_hub.follower.connected and f.row_of(uid + "a") >= 0)
    o.heard[o.row_of(uid + "a")] = time.monotonic() - owner_hub.settings.offline_after_s - 1
    owner_hub.check_vehicles(time.monotonic())
    owner_hub.flush()
    await until(lambda: f.cur[f.row_of(uid + "a")]["status"] == STATUS_CODE["offline"])


async def test_ingest_on_a_follower_is_the_owners_and_fails_clearly_without_it(pair, uid):
    owner_hub, follower_hub, taken, path = pair
    from realtime.ingest.decode import validate
    await until(lambda: follower_hub.follower.connected)
    u = validate({"vehicle_id": uid + "x", "timestamp": int(time.time() * 1000),
                  "position": {"lat": 50.5, "lon": 30.5}, "alerts": ["door"], "groups": ["g1"]})
    await follower_hub.follower.forward([u])
    assert [[x["vehicle_id"] for x in t] for t in taken] == [[uid + "x"]]
    assert state(owner_hub, uid + "x")[0] == 50.5
    owner_hub.flush()
    await until(lambda: state(follower_hub, uid + "x") is not None)
    assert state(follower_hub, uid + "x") == state(owner_hub, uid + "x")
    # the owner goes: the follower says so, and ingest there is refused, not lost
    await owner_hub.owner.stop()
    await until(lambda: not follower_hub.follower.connected)
    with pytest.raises(ConnectionError):
        await follower_hub.follower.forward([u])


async def test_a_new_owner_s_fleet_replaces_the_followers(pair, uid):
    owner_hub, follower_hub, _, path = pair
    f = follower_hub.core
    owner_hub.apply(batch(owner_hub.core, [uid + "old", uid + "kept"], lat=51.0))
    await until(lambda: follower_hub.follower.connected and f.row_of(uid + "kept") >= 0)
    await owner_hub.owner.stop()
    await until(lambda: not follower_hub.follower.connected)
    # the restarted owner (a new process: a new core, its own rows) knows kept and new
    new_hub = hub()
    new_hub.apply(batch(new_hub.core, [uid + "new", uid + "kept"], lat=52.0,
                        ts=int(time.time() * 1000) + 10))
    owner = mirror.Owner(new_hub, path, None)
    new_hub.owner = owner
    owner_hub.owner = owner   # the fixture stops this one
    await owner.start()
    await until(lambda: follower_hub.follower.connected)
    assert f.row_of(uid + "old") < 0            # gone with the old owner: `leave` here
    assert state(follower_hub, uid + "kept") == state(new_hub, uid + "kept")
    assert state(follower_hub, uid + "new") == state(new_hub, uid + "new")
    # and the new owner's rows map to the follower's, whatever their numbers
    new_hub.apply(batch(new_hub.core, [uid + "kept"], lat=53.0, ts=int(time.time() * 1000) + 20))
    new_hub.flush()
    await until(lambda: state(follower_hub, uid + "kept")[0] == 53.0)
    assert follower_hub.follower.unknown_rows == 0


async def test_a_follower_that_stops_reading_is_dropped_and_garbage_closes_its_link_alone(pair, uid, monkeypatch):
    owner_hub, follower_hub, _, path = pair
    o = owner_hub.core
    await until(lambda: follower_hub.follower.connected)
    monkeypatch.setattr(mirror, "FOLLOWER_BUFFER_MAX", 256 * 1024)
    # a second "follower" that connects and never reads
    _, stuck = await asyncio.open_unix_connection(path)
    stuck.write(mirror._frame({"v": mirror.VERSION}))
    await until(lambda: len(owner_hub.owner.followers) == 2)
    # one of other code gets no copy and no frames
    other_in, other = await asyncio.open_unix_connection(path)
    other.write(mirror._frame({"v": [0, "older"]}))
    assert await asyncio.wait_for(other_in.read(), 5) == b""
    other.close()
    # a third that sends a frame longer than any
    bad_in, bad = await asyncio.open_unix_connection(path)
    bad.write(mirror.HEADER.pack(mirror.MAX_FRAME + 1))
    ts = int(time.time() * 1000)
    for i in range(400):
        owner_hub.apply(batch(o, [uid + str(k) for k in range(40)], lat=50.0 + i / 1000, ts=ts + i))
        owner_hub.flush()
        await asyncio.sleep(0.002)   # the real follower, in this same loop, reads meanwhile
    await until(lambda: owner_hub.owner.dropped >= 1)
    await until(lambda: len(owner_hub.owner.followers) == 1)
    # the stuck one, not the real one: that one is on its first link still
    assert follower_hub.follower.links == 1 and follower_hub.follower.connected
    # the real follower kept up and has the last state
    await until(lambda: state(follower_hub, uid + "39") == state(owner_hub, uid + "39"))
    # the garbage link was closed by the owner, and got no copy
    async def rest():
        while await bad_in.read(1 << 16):
            pass
    await asyncio.wait_for(rest(), 5)
    assert bad_in.at_eof()
    stuck.close()
    bad.close()


async def test_frames_that_do_not_fit_the_core_are_refused_before_anything_changes(tmp_path, uid):
    """A frame naming rows it never named is counted; one that does not fit
    (lengths that differ, rows out of range, ids or fields of the wrong kind,
    the end of a copy never begun, another version) is refused whole: a
    valid part in it (a forgotten id, a new name) changes nothing either."""
    h = hub()
    follower = mirror.Follower(h, str(tmp_path / "none.sock"))
    h.follower = follower
    rec = np.zeros(1, h.core.cur.dtype)
    rec["version"] = 1
    one = np.array([0], np.int32).tobytes()
    follower.apply({"s": mirror.VERSION, "e": 1, "t": ["unknown"], "n": [one, [uid + "a"]], "r": one,
                    "c": rec.tobytes(), "x": [[0, [], None, None, []]]})
    assert h.core.row_of(uid + "a") >= 0
    follower.apply({"r": np.array([5], np.int32).tobytes(), "c": rec.tobytes()})
    assert follower.unknown_rows == 1
    rows = np.array([1, 2], np.int32).tobytes()
    valid = {"g": [uid + "a"], "n": [np.array([3], np.int32).tobytes(), [uid + "b"]]}
    bad = [
        {"r": rows, "c": rec.tobytes()},                                   # rows and records differ
        {"n": [rows, [uid]], "r": b""},                                    # rows and ids differ
        {"n": [np.array([-1], np.int32).tobytes(), [uid]], "r": b""},      # a negative row
        {"n": [np.array([2**30], np.int32).tobytes(), [uid]], "r": b""},   # a row no core has
        {"n": [np.array([1], np.int32).tobytes(), [7]], "r": b""},         # an id that is not a string
        {"r": b"\x01\x02\x03"},                                           # not whole rows
        {"e": 1, "r": b""},                                                # the end of a copy never begun
        {"s": [0, "other"], "r": b""},                                     # another version
        {"r": b"", "x": [[0, ["a"], None, None, "north"]]},                 # groups that are not a list
        {"r": b"", "x": [[0, [1], None, None, None]]},                      # an alert that is not a string
        {"r": b"", "x": [[0, None, "Ivan", None, None]]},                   # a driver that is not an object
        {"r": b"", "x": [[0, None, None, ["job"], None]]},                  # an assignment that is not one
        {"n": [np.array([2**24], np.int32).tobytes(), [uid]], "r": b""},   # a row past MAX_ROW
        {"r": b"", "g": [None]},                                           # a forgotten id that is not one
        {"r": b"", "t": ["x"] * 65},                                       # more types than codes
    ]
    bad_status = rec.copy()
    bad_status["status"] = 9
    bad.append({"r": one, "c": bad_status.tobytes()})                     # a status no client knows
    before = h.core.cur[: h.core.n].copy()
    for frame in bad:
        with pytest.raises(ValueError):
            follower.apply({**valid, **frame} if "g" not in frame and "n" not in frame else frame)
    # none of them changed the core: a is still there, b was never made
    assert h.core.row_of(uid + "a") >= 0 and h.core.row_of(uid + "b") < 0
    assert (h.core.cur[: h.core.n] == before).all() and follower.frames == 2
    # msgpack framing: one frame in, the same out
    data = mirror._frame({"r": b"", "x": []})
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    assert await mirror.read_frame(r) == msgpack.unpackb(data[4:])
    assert await mirror.read_frame(r) is None


async def test_registry_groups_stay_and_a_new_owner_s_copy_clears_what_was_cleared(pair, uid):
    """Groups this worker read from the registry for its own subscriptions
    survive the owner's rich changes; a whole-fleet copy from a new owner
    sets every rich field as that owner has it, empty ones too."""
    owner_hub, follower_hub, _, path = pair
    o, f = owner_hub.core, follower_hub.core
    a = uid + "a"
    owner_hub.apply(batch(o, [a], driver={"name": "Ann"}, alerts=["speeding"], groups=["north"]))
    await until(lambda: follower_hub.follower.connected and f.row_of(a) >= 0)
    f.set_group_members("depot", [a])   # the follower's own subscription named it
    assert state(follower_hub, a)[5] == ("north", "depot")
    # an alert changes on the owner: the follower keeps its registry group
    owner_hub.apply(batch(o, [a], ts=int(time.time() * 1000) + 5, alerts=["speeding", "door"]))
    owner_hub.flush()
    await until(lambda: state(follower_hub, a)[4] == ("speeding", "door"))
    assert state(follower_hub, a)[5] == ("north", "depot")
    # an update moves it to another group: that one changes, the registry's stays
    owner_hub.apply(batch(o, [a], ts=int(time.time() * 1000) + 10, groups=["south"]))
    owner_hub.flush()
    await until(lambda: state(follower_hub, a)[5] == ("south", "depot"))
    assert f.group_members("north") == [] and f.group_members("depot") == [a]
    # a new owner whose fleet has the vehicle with no alerts, groups or driver
    await owner_hub.owner.stop()
    await until(lambda: not follower_hub.follower.connected)
    new_hub = hub()
    new_hub.apply(batch(new_hub.core, [a], lat=52.0, ts=int(time.time() * 1000) + 20))
    owner = mirror.Owner(new_hub, path, None)
    new_hub.owner = owner
    owner_hub.owner = owner
    await owner.start()
    await until(lambda: follower_hub.follower.connected)
    assert state(follower_hub, a)[0] == 52.0
    assert f.driver[f.row_of(a)] is None and f.alerts[f.row_of(a)] == ()
    assert f.groups_of[f.row_of(a)] == ("depot",)   # the registry's, still


async def test_a_new_vehicle_s_alert_is_named_to_the_followers_before_it_is_logged(pair, uid):
    """The followers read alerts from the event log and vehicles from the
    owner's frames: an update that raises an alert sends its frame at once,
    before the alert is written, not at the next tick."""
    owner_hub, follower_hub, _, _ = pair
    o, f = owner_hub.core, follower_hub.core
    await until(lambda: follower_hub.follower.connected)
    frames = owner_hub.owner.frames
    owner_hub.apply(batch(o, [uid + "new"], alerts=["door"]))   # no flush: no tick
    assert owner_hub.owner.frames == frames + 1
    await until(lambda: f.row_of(uid + "new") >= 0)
    assert f.alerts[f.row_of(uid + "new")] == ("door",)
    # without an alert, the frame waits for the tick
    owner_hub.apply(batch(o, [uid + "quiet"]))
    assert owner_hub.owner.frames == frames + 1


async def test_a_silent_owner_is_left_once_the_fleet_is_here_not_while_it_loads(tmp_path, uid, monkeypatch):
    """The owner speaks every HEARTBEAT_S once the follower has the fleet:
    a link silent for SILENT_S then is cut and made again. Before the whole
    fleet has come, the owner may still be loading it from Redis: no cut."""
    monkeypatch.setattr(mirror, "SILENT_S", 0.3)
    path = str(tmp_path / "owner.sock")
    links, cut, send_fleet = [], [], asyncio.Event()

    async def owner(reader, writer):   # a fake owner: the hello, then the fleet when told, then nothing
        links.append(writer)
        assert (await mirror.read_frame(reader))["v"] == mirror.VERSION
        await send_fleet.wait()
        rec = np.zeros(1, VEHICLE_DTYPE)
        one = np.array([0], np.int32).tobytes()
        writer.write(mirror._frame({"s": mirror.VERSION, "e": 1, "t": ["unknown"], "n": [one, [uid]],
                                    "r": one, "c": rec.tobytes(), "x": [[0, [], None, None, []]]}))
        await reader.read()   # until the follower cuts the link
        cut.append(writer)
        writer.close()

    server = await asyncio.start_unix_server(owner, path)
    h = hub()
    follower = mirror.Follower(h, path)
    h.follower = follower
    follower.start()
    try:
        await until(lambda: len(links) == 1)
        await asyncio.sleep(1.0)   # > SILENT_S, the fleet not sent yet
        assert follower.links == 1 and follower.silences == 0 and not follower.connected
        send_fleet.set()
        await until(lambda: follower.silences >= 1)
        assert h.core.row_of(uid) >= 0   # the fleet came through before the silence
        await until(lambda: follower.links >= 2 and len(links) >= 2)
        await until(lambda: cut[:1] == links[:1])   # the first link was the one cut
    finally:
        await follower.stop()
        server.close()


async def test_a_copy_in_slices_with_ticks_between_them_ends_equal_to_the_owner(tmp_path, uid, monkeypatch):
    """The whole-fleet copy goes a slice per turn of the owner's loop, and
    its ticks carry on between the slices: moves, new drivers and alerts,
    vehicles forgotten, forgotten and back, and new ones, of rows already
    copied and rows still to come. At the end the follower holds what the
    owner holds, row for row, and the owner's loop ran between the slices."""
    monkeypatch.setattr(mirror, "SNAPSHOT_SLICE", 8)
    path = str(tmp_path / "owner.sock")
    owner_hub, follower_hub = hub(), hub()
    o, f = owner_hub.core, follower_hub.core
    ids = [uid + str(i) for i in range(48)]
    ts = int(time.time() * 1000)
    owner_hub.apply(batch(o, ids, status="moving", vtype="truck", driver={"name": "Ann"}, groups=["north"], ts=ts))
    # the follower held some before (a restarted owner): one the owner forgot, one it has with a driver
    follower_hub.apply(batch(f, [uid + "held", ids[44]], driver={"name": "Old"}, ts=ts - 10))
    owner_hub.flush()
    owner = mirror.Owner(owner_hub, path, None)
    owner_hub.owner = owner
    slices, started = [], asyncio.Event()
    made = owner._still_live

    def still_live(rows):
        slices.append(owner.frames)   # the tick frames made before this slice
        started.set()
        return made(rows)
    owner._still_live = still_live

    def forget(vid):
        o.heard[o.row_of(vid)] = -1e9
        owner_hub.check_vehicles(time.monotonic())
        assert o.row_of(vid) < 0

    def tick(i):
        t = ts + 10 * (i + 1)
        if i == 0:   # rows copied and rows to come move
            owner_hub.apply(batch(o, [ids[0], ids[40]], lat=60.0, ts=t))
        elif i == 1:   # a driver here, alerts there
            owner_hub.apply(batch(o, [ids[1]], driver={"name": "Bo"}, ts=t))
            owner_hub.apply(batch(o, [ids[41]], alerts=["speeding"], ts=t))
        elif i == 2:   # forgotten: one copied, one to come
            forget(ids[2])
            forget(ids[42])
        elif i == 3:   # forgotten and back before the next frame, and one new
            forget(ids[43])
            owner_hub.apply(batch(o, [ids[43], uid + "new"], lat=61.0, vtype="bus", ts=t))
            return   # its frame after the next slice
        owner_hub.flush()

    async def ticks():
        await started.wait()
        for i in range(5):
            tick(i)
            await asyncio.sleep(0)
    await owner.start()
    follower = mirror.Follower(follower_hub, path)
    follower_hub.follower = follower
    follower.start()
    ticker = asyncio.get_running_loop().create_task(ticks())
    try:
        await until(lambda: follower.connected)
        await ticker
        owner_hub.flush()
        await until(lambda: set(f.id_to_row) == set(o.id_to_row)
                    and all(state(follower_hub, v) == state(owner_hub, v) for v in o.id_to_row))
        assert len(slices) == 6
        # tick frames went out between the first slice and the last
        assert slices[-1] > slices[0]
        assert state(follower_hub, ids[0])[0] == 60.0 and state(follower_hub, ids[40])[0] == 60.01
        assert f.driver[f.row_of(ids[1])] == {"name": "Bo"}
        assert state(follower_hub, ids[41])[4] == ("speeding",)
        assert f.row_of(ids[2]) < 0 and f.row_of(ids[42]) < 0 and f.row_of(uid + "held") < 0
        assert state(follower_hub, ids[43])[:2] == (61.0, "bus")
        assert state(follower_hub, uid + "new")[:2] == (61.01, "bus")
        assert f.driver[f.row_of(ids[44])] == {"name": "Ann"}
        # and after it, a frame of any of them is known there
        skipped = follower.unknown_rows   # tick frames of rows whose slice had not come
        owner_hub.apply(batch(o, list(o.id_to_row), lat=62.0, ts=ts + 100))
        owner_hub.flush()
        await until(lambda: all(state(follower_hub, v) == state(owner_hub, v) for v in o.id_to_row))
        assert state(follower_hub, ids[47])[0] == state(owner_hub, ids[47])[0] > 62.0
        assert follower.unknown_rows == skipped
    finally:
        ticker.cancel()
        await follower.stop()
        await owner.stop()


async def test_forwarded_ingest_is_refused_not_queued_while_the_owner_is_slow(tmp_path, uid):
    """The owner takes FORWARD_MAX forwarded requests at once; a follower
    refuses more (503 to the sender) instead of queueing them in its link's
    buffer, which grew with the ingest rate for as long as the owner was
    slow (each timed-out request's frame stayed there)."""
    path = str(tmp_path / "owner.sock")
    owner_hub, follower_hub = hub(), hub()
    never = asyncio.Event()

    async def stuck_sink(updates):   # a Kafka produce that does not come back
        await never.wait()
    async with linked(owner_hub, follower_hub, path, stuck_sink) as (_, follower):
        await until(lambda: follower.connected)
        big = [{"vehicle_id": f"{uid}{i}", "timestamp": 1, "position": {"lat": 1.0, "lon": 2.0},
                "driver": {"note": "x" * 2000}} for i in range(50)]   # ~100 KB a request
        calls = [asyncio.ensure_future(follower.forward(big)) for _ in range(400)]
        await asyncio.sleep(1.0)
        refused = [c for c in calls if c.done() and isinstance(c.exception(), ConnectionError)]
        assert len(refused) >= 400 - mirror.FORWARD_MAX
        assert follower._writer.transport.get_write_buffer_size() <= mirror.FORWARD_BUFFER_MAX + 200_000
        for c in calls:
            c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        never.set()
