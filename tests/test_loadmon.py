"""The event loop's lag (realtime/loadmon.py): a tick takes a sample that is
nearly due instead of the timer waking the process for it, and a block longer
than the interval is still measured, poked or not."""
import asyncio
import time

from realtime.loadmon import LoadMonitor


class Counting(LoadMonitor):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.samples = []

    def note_lag(self, lag_ms: float) -> None:
        self.samples.append(lag_ms)
        super().note_lag(lag_ms)


async def test_a_poke_takes_a_sample_only_when_it_is_nearly_due():
    m = Counting(interval=0.2)
    m.start()
    try:
        m.poke()   # just armed: due in an interval
        assert m.samples == []
        await asyncio.sleep(0.13)
        due_before = m._due
        m.poke()   # due within half an interval: taken now, the next an interval later
        assert m.samples == [0.0]
        assert m._due > due_before
        assert abs(m._due - (asyncio.get_running_loop().time() + 0.2)) < 0.02
        await asyncio.sleep(0.25)   # nobody pokes: the timer takes it
        assert len(m.samples) == 2
    finally:
        await m.stop()


async def test_a_block_longer_than_the_interval_is_measured_with_ticks_poking_or_without():
    for poking in (True, False):
        m = Counting(interval=0.1, slow_ms=100.0)
        m.start()
        try:
            for _ in range(6):   # ticks every 40 ms, a sample taken by some of them
                await asyncio.sleep(0.04)
                if poking:
                    m.poke()
            time.sleep(0.35)     # the loop held
            if poking:
                m.poke()         # the first tick after the block
            await asyncio.sleep(0.01)
            assert max(m.samples) >= 250.0, (poking, m.samples)
            assert m.slow_ops >= 1
            assert all(x < 100.0 for x in m.samples[:-1]), m.samples   # before the block, nothing slow
        finally:
            await m.stop()


async def test_stopped_means_no_more_samples():
    m = Counting(interval=0.05)
    m.start()
    await asyncio.sleep(0.12)
    await m.stop()
    n = len(m.samples)
    assert n >= 1
    m.poke()
    await asyncio.sleep(0.12)
    assert len(m.samples) == n


async def test_a_lag_while_the_worker_is_not_run_is_not_counted_as_its_own_cpu():
    """A blocking wait that uses no CPU (standing in for a process the machine
    did not run) moves the wall-clock lag, not the CPU lag; work on the loop
    moves both."""
    m = LoadMonitor(interval=0.05, slow_ms=10_000.0)
    m.start()
    try:
        await asyncio.sleep(0.07)
        m.take_max_lag(), m.take_max_cpu_lag()
        time.sleep(0.3)                     # the loop held, its thread not running
        await asyncio.sleep(0.07)
        wall, cpu = m.take_max_lag(), m.take_max_cpu_lag()
        assert wall >= 200 and cpu < 100, (wall, cpu)
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.3:   # the loop held by its own work
            pass
        await asyncio.sleep(0.07)
        wall, cpu = m.take_max_lag(), m.take_max_cpu_lag()
        assert wall >= 200 and cpu >= 200, (wall, cpu)
    finally:
        await m.stop()
