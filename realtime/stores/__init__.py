"""Shared storage: sessions, event log, vehicle snapshot (memory or Redis)."""


def make_stores(settings, instance_id: str = ""):
    if settings.redis:
        from .redis import RedisStores
        return RedisStores(settings, instance_id)
    from .memory import MemoryStores
    return MemoryStores(settings)
