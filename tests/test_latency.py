"""message_delivery_latency_ms's histogram (realtime/latency.py): a tick's
few arrivals, counted in Python, land where numpy's count puts them."""
import numpy as np

from realtime.latency import BUCKETS_MS, Histogram


def test_a_tick_s_arrivals_land_in_the_same_buckets_as_numpy_s_count():
    now = 1000.0
    # on a bound (le="50" holds 50), between bounds, under the first, past the last
    ms = [50.0, 49.999, 0.2, 1.0, 10_001.0, 72.5, 0.0]
    few = [(now - m / 1000.0, k + 1) for k, m in enumerate(ms)]
    many = few * 3   # past the Python loop's size: numpy
    for arrivals in (few[:2], few, many):
        a, b = Histogram(), Histogram()
        a.observe_arrivals(arrivals, now)
        t = np.array(arrivals)
        b.observe((now - t[:, 0]) * 1000.0, t[:, 1])
        assert a.counts.tolist() == b.counts.tolist()
        assert abs(a.sum - b.sum) < 1e-6 * max(1.0, b.sum)
        assert a.count == sum(n for _, n in arrivals)
    h = Histogram()
    h.observe_arrivals([(-0.050, 3)], 0.0)   # 50 ms exactly
    assert dict(h.buckets())[repr(50.0)] == 3 and dict(h.buckets())[repr(35.0)] == 0
    assert len(h.counts) == len(BUCKETS_MS) + 1
