"""realtime: the fleet push server."""
import os

# numpy's OpenBLAS starts a thread per core that spins after start-up and
# after any BLAS call. The server makes none on its hot path, and on a small
# machine those threads took 10% of a core from the event loop while a
# Kafka backlog was read (perf, bench_kafka). One thread: no pool. Set
# before numpy is first imported; an operator's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
