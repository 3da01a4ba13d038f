"""The in-memory stores on their own: session records expire and are purged."""
import realtime.stores.memory as memory


async def test_memory_sessions_expire_and_are_purged_by_later_saves(monkeypatch):
    st = memory.MemoryStores()
    monkeypatch.setattr(memory, "SESSION_TTL_S", -1)          # already expired when saved
    await st.save_session("old", {"user_id": "u", "subscription": {"vehicles": ["a"]}})
    monkeypatch.setattr(memory, "SESSION_TTL_S", 3600)
    await st.save_session("new", {"user_id": "u", "subscription": None})
    await st.save_session("new", {"user_id": "u", "subscription": {"groups": ["g"]}})
    assert "old" not in st.sessions and len(st._expiry) == 1
    assert await st.load_session("new") == {"user_id": "u", "subscription": {"groups": ["g"]}}
    assert await st.load_session("old") is None


async def test_memory_event_log_locates_ids_and_pages_by_id():
    st = memory.MemoryStores()
    for i in range(2500):
        await st.publish_event("v", "e", {"n": i}, 0, False)
    ids = [e.eid for e in st.log[st._head:]]
    assert await st.locate(ids[0]) == "found" and await st.locate(ids[1234]) == "found"
    assert await st.locate("1-0") == "older"
    ms, seq = ids[-1].split("-")
    assert await st.locate(f"{ms}-{int(seq) + 5}") == "unknown"
    page = await st.events_page(ids[10], ids[2000], 1000)
    assert [e.body["n"] for e in page] == list(range(11, 1011))
    page = await st.events_page(page[-1].eid, ids[2000], 1000)
    assert [e.body["n"] for e in page] == list(range(1011, 2001))
    assert await st.events_page(ids[2000], ids[2000], 1000) == []
    assert [e.body["n"] for e in await st.events_page("0-0", ids[2], 10)] == [0, 1, 2]


async def test_memory_event_log_is_trimmed_by_age_and_compacted(monkeypatch):
    st = memory.MemoryStores()
    monkeypatch.setattr(memory, "EVENT_RETENTION_S", -1)     # everything older than now is gone
    for i in range(10_000):
        await st.publish_event("v", "e", {"n": i}, 0, False)
    assert len(st.log) - st._head <= 4097 and len(st.log) < 10_000   # trimmed and compacted
    assert await st.locate("1-0") == "older"


def test_recent_events_serve_a_replay_only_when_they_cover_it():
    """recent.py: a replay is served from memory only if every log event
    after its `last_event` is kept; otherwise the caller reads the log."""
    from realtime.recent import Recent, RecentEvents
    from realtime.stores.base import Event

    def ev(ms):
        return Recent(Event(f"{ms}-0", "v", "e", {}, ms, False), (b"j", b"m"))
    r = RecentEvents(max_events=3)
    assert r.between("1-0", "9-0") is None            # nothing kept
    for ms in (10, 20, 30):
        r.add(ev(ms))
    r.add(ev(20))                                      # not newer: ignored
    assert [x.ev.eid for x in r.between("10-0", "30-0")] == ["20-0", "30-0"]
    assert [x.ev.eid for x in r.between("10-0", "20-0")] == ["20-0"]
    assert r.between("30-0", "30-0") == []
    assert r.between("9-0", "30-0") is None            # 9..10 may hold events never seen here
    for ms in (40, 50, 60, 70):                        # past 2 x max: the oldest go
        r.add(ev(ms))
    assert len(r) <= 6 and r.between("20-0", "70-0") is None
    assert [x.ev.eid for x in r.between("50-0", "70-0")] == ["60-0", "70-0"]
    r.clear()                                          # the log was reset
    assert r.between("50-0", "70-0") is None


def test_recent_events_are_bounded_in_bytes_too():
    from realtime import recent
    from realtime.recent import Recent, RecentEvents
    from realtime.stores.base import Event
    r = RecentEvents(max_events=100_000)
    big = b"x" * (16 * 1024)
    for ms in range(1, 6000):
        r.add(Recent(Event(f"{ms}-0", "v", "e", {}, ms, False), (big, big)))
        assert r.nbytes <= recent.MAX_BYTES + 2 * len(big) + 200
    assert 0 < len(r) < 6000
    newest = r.between(f"{5999 - len(r) + 1}-0", "5999-0")
    assert newest is not None and [x.ev.eid for x in newest][-1] == "5999-0"
