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
