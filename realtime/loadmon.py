"""Event-loop lag, CPU and memory of this worker, for /health/ready, /metrics
and the slow-operation log (issue 5, PROTOCOL §5 "load").

A timer is due every `interval` seconds; how late it fires is the loop's lag.
A lag over `slow_ms` means something held the loop (a slow callback, a big
synchronous job) and is logged, at most once per `log_every_s`.

A wake-up costs this machine's processes ~0.1 ms of CPU whatever they then do
(benchmarks/bench_idle.py), and a worker fed every 100 ms otherwise made ten
more a second for this timer alone. So the tick loop pokes the monitor: a
sample due within half an interval is taken then, on a wake-up the process
made anyway, and the next one is due an interval later. Samples are never
more than an interval apart, so a block longer than that still always
overlaps one (the guarantee the timer alone gave).

On a machine short of cores a lag is also time the worker was not run at
all. The loop thread's own CPU time since the timer was armed bounds, from
above, how much of a lag was the worker's own work: min(lag, that CPU) is
`event_loop_lag_cpu_max_ms`, which a busy neighbour does not move. A test
that bounds how long one job holds the loop reads it: the wall-clock lag
of a 16 MiB ingest passed 500 ms (557) in a full run of the suite, with
the other half of it on the machine, where alone beside a busy core the
job's own CPU held the loop 90 to 150 ms.
"""
from __future__ import annotations

import asyncio
import logging
import os
import time

log = logging.getLogger("realtime.load")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def memory_limit_bytes() -> int:
    """The cgroup's memory limit when there is one, else the machine's RAM."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            v = open(path).read().strip()
            if v.isdigit() and int(v) < 1 << 60:
                return int(v)
        except OSError:
            pass
    return os.sysconf("SC_PHYS_PAGES") * PAGE


class LoadMonitor:
    def __init__(self, interval: float = 0.1, slow_ms: float = 100.0, log_every_s: float = 5.0,
                 cpu_window_s: float = 10.0):
        self.interval = interval
        self.slow_ms = slow_ms
        self.log_every_s = log_every_s
        self.cpu_window_s = cpu_window_s
        self.lag_ms = 0.0          # the latest wake-up delay
        self.max_lag_ms = 0.0      # the worst since the last scrape of max_lag()
        self.max_cpu_lag_ms = 0.0  # the same, counting only the loop thread's CPU (see above)
        self._armed_cpu = 0.0      # the loop thread's CPU time when the timer was armed
        self.recent_lag_ms = 0.0   # the worst over the last cpu window, for readiness
        self.slow_ops = 0
        self.cpu = 0.0             # share of one core over the last window
        self._suppressed = 0
        self._last_log = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0
        self._win_t = self._win_cpu = self._win_lag = 0.0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._win_t, self._win_cpu, self._win_lag = time.monotonic(), time.process_time(), 0.0
        self._arm(self._loop.time())

    async def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def take_max_lag(self) -> float:
        v, self.max_lag_ms = self.max_lag_ms, 0.0
        return v

    def take_max_cpu_lag(self) -> float:
        v, self.max_cpu_lag_ms = self.max_cpu_lag_ms, 0.0
        return v

    def poke(self) -> None:
        """The loop is awake anyway (a tick): take a sample that is nearly due."""
        h = self._handle
        if h is not None and self._due - self._loop.time() < self.interval / 2:
            h.cancel()
            self._sample()

    def _arm(self, now: float) -> None:
        self._due = now + self.interval
        self._armed_cpu = time.thread_time()
        self._handle = self._loop.call_at(self._due, self._sample)

    def _sample(self) -> None:
        now = self._loop.time()
        try:
            lag = max(0.0, (now - self._due) * 1000.0)
            self.note_lag(lag)
            own = min(lag, (time.thread_time() - self._armed_cpu) * 1000.0)
            self.max_cpu_lag_ms = max(self.max_cpu_lag_ms, own)
            self._win_lag = max(self._win_lag, lag)
            t = time.monotonic()
            if t - self._win_t >= self.cpu_window_s:
                cpu = time.process_time()
                self.cpu = (cpu - self._win_cpu) / (t - self._win_t)
                self.recent_lag_ms = self._win_lag
                self._win_t, self._win_cpu, self._win_lag = t, cpu, 0.0
            else:
                self.recent_lag_ms = max(self.recent_lag_ms, lag)
        finally:   # the chain goes on whatever a sample met (a failed log write)
            self._arm(now)

    def note_lag(self, lag_ms: float) -> None:
        self.lag_ms = lag_ms
        self.max_lag_ms = max(self.max_lag_ms, lag_ms)
        if lag_ms < self.slow_ms:
            return
        self.slow_ops += 1
        now = time.monotonic()
        if now - self._last_log < self.log_every_s:
            self._suppressed += 1
            return
        log.warning("slow operation: the event loop was blocked", extra={"fields": {
            "event": "slow_operation", "blocked_ms": round(lag_ms, 1),
            "suppressed": self._suppressed}})
        self._last_log = now
        self._suppressed = 0

    def problems(self, max_lag_ms: float, max_cpu: float, max_rss_fraction: float) -> list[str]:
        out = []
        if self.recent_lag_ms > max_lag_ms:
            out.append(f"event loop lag {self.recent_lag_ms:.0f} ms > {max_lag_ms:.0f} ms")
        if self.cpu > max_cpu:
            out.append(f"cpu {self.cpu:.2f} of a core > {max_cpu:.2f}")
        rss, limit = rss_bytes(), memory_limit_bytes()
        if rss > max_rss_fraction * limit:
            out.append(f"memory {rss >> 20} MiB > {max_rss_fraction:.0%} of {limit >> 20} MiB")
        return out
