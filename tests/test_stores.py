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
