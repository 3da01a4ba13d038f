"""Shared storage: sessions, event log, vehicle snapshot (memory or Redis)."""


def make_stores(settings):
    if settings.redis:
        from .redis import RedisStores
        return RedisStores(settings)
    from .memory import MemoryStores
    return MemoryStores(settings)
