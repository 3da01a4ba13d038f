"""`message_delivery_latency_ms` (PROTOCOL §5): ingest to socket write.

Observed per applied update, not per delivery: the hub notes when each batch
reached the process, and when a tick has written its frames every update that
arrived before that tick is observed once, weighted by the batch's size. That
costs one numpy call per tick instead of work per delivered message.
"""
from __future__ import annotations

import bisect

import numpy as np

# 60 and 70 are there so that "p99 within the 50 ms tick + 20 ms" can be read
# off the histogram, not interpolated across 50-75
BUCKETS_MS = (1, 2, 5, 10, 20, 35, 50, 60, 70, 75, 100, 150, 250, 500, 1000, 2500, 5000, 10000)


class Histogram:
    __slots__ = ("bounds", "_bounds", "counts", "sum")

    def __init__(self, bounds=BUCKETS_MS):
        self.bounds = np.asarray(bounds, np.float64)
        self._bounds = tuple(float(b) for b in bounds)   # for bisect: side="left" is bisect_left
        self.counts = np.zeros(len(bounds) + 1, np.int64)  # the last is +Inf
        self.sum = 0.0

    def observe_arrivals(self, arrivals: list[tuple[float, int]], now: float) -> None:
        """Each (monotonic time, updates) as now - time, in ms, weighted by
        its updates. A tick has one or two arrivals, mostly: for those a loop
        in Python costs a tenth of observe()'s numpy calls, in every worker's
        every tick."""
        if len(arrivals) > 8:
            a = np.array(arrivals)
            self.observe((now - a[:, 0]) * 1000.0, a[:, 1])
            return
        bounds, counts = self._bounds, self.counts
        for t, n in arrivals:
            ms = (now - t) * 1000.0
            counts[bisect.bisect_left(bounds, ms)] += n
            self.sum += ms * n

    def observe(self, values_ms, weights) -> None:
        values_ms = np.asarray(values_ms, np.float64)
        weights = np.asarray(weights, np.int64)
        idx = np.searchsorted(self.bounds, values_ms, side="left")
        self.counts += np.bincount(idx, weights, minlength=len(self.counts)).astype(np.int64)
        self.sum += float((values_ms * weights).sum())

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative, in the form prometheus-client's HistogramMetricFamily takes."""
        cum = np.cumsum(self.counts)
        out = [(repr(float(b)), int(c)) for b, c in zip(self.bounds, cum[:-1])]
        out.append(("+Inf", int(cum[-1])))
        return out

    @property
    def count(self) -> int:
        return int(self.counts.sum())
