#!/usr/bin/env bash
# Builds the project, then runs every benchmark in benchmarks/, with its baselines in the same run.
#   ./bench.sh          full sizes (20k vehicles, 5k clients, 10k connections, 200k Kafka records,
#                       a 10k-client reconnect storm, SSE/long polling/gRPC against WebSocket)
#   ./bench.sh --smoke  cut-down sizes in under a minute; `make test` runs it so that it cannot rot
# Writes benchmarks/results/<timestamp>.json, .md (table) and .png (plot). The last line printed
# is one JSON object: deliveries_ratio_vs_raw, p99_ms (client-observed), server_p99_ms (the server's
# message_delivery_latency_ms over the same window), latency_floor_p99_ms (the raw server's client-observed
# p99 at the same load), tick_period_ms (the configured tick), tick_compute_ms (a tick's compute time),
# socketio_ratio, rss_kb_per_conn, kafka_ratio, storm_s, storm_events_lost, storm_p99_ratio, sse_ratio,
# poll_ratio, grpc_ratio; in full runs also workers_ratio (--workers 2 over one worker, deliveries per
# CPU-second), raw_procs_ratio (the raw server in two processes over one: what the machine allows) and
# workers_over_raw (the first over the second); that step starts redis-servers of its own (--together).
set -euo pipefail
cd "$(dirname "$0")"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
say() { echo "bench: $*" >&2; }
say "building"
make -s build >/dev/null
PY=.venv/bin/python
mkdir -p benchmarks/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="benchmarks/results/$stamp.json"
t0=$(date +%s)

if [ "$SMOKE" = 1 ]; then
  say "[1/5] core: compiled vs numpy reference (4k vehicles x 1k clients)"
  core=$($PY benchmarks/bench_core.py --vehicles 4000 --clients 1000 --changed 200 --ticks 5 --ref-ticks 1)
  say "[2/5] end to end: scenarios a, b, c with the raw and python-socketio baselines"
  e2e=$($PY benchmarks/bench_e2e.py --smoke --skip sweep)
  say "[3/5] Kafka ingest vs a bare aiokafka loop (20k records)"
  kafka=$($PY benchmarks/bench_kafka.py --records 20000)
  say "[4/5] reconnect storm (300 clients move to a second instance)"
  storm=$($PY benchmarks/bench_storm.py --smoke)
  say "[5/5] SSE, long polling and gRPC vs WebSocket (100 clients; 100 idle pollers)"
  transports=$($PY benchmarks/bench_transports.py --smoke)
  say "[+] capacity, Redis side (2k vehicles, 2 instances, feed against scan)"
  capacity=$($PY benchmarks/bench_capacity.py --vehicles 2000 --instances 2 --settle 1 --seconds 1)
  say "[+] a second worker's cost per tick (2k vehicles, in one process)"
  mirror=$($PY benchmarks/bench_mirror.py --vehicles 2000 --ticks 60 --warmup 20)
  say "[+] one core's tick against two cores' over the same clients, split (2k vehicles)"
  split=$($PY benchmarks/bench_split.py --vehicles 2000 --clients 100 --changed 150 --ticks 20)
  say "[+] a second worker before anyone connects: each process's CPU, one worker against two (500 vehicles)"
  idle=$($PY benchmarks/bench_idle.py --vehicles 500 --rounds 1 --settle 1 --seconds 1)
  say "[+] a worker's whole-fleet copy: the owner's longest hold, in slices against at once (5k vehicles)"
  copy=$($PY benchmarks/bench_copy.py --vehicles 5000)
  mem=null
  workers=null
else
  say "[1/7] core: compiled vs numpy reference (20k vehicles x 5k clients, 1k changed per tick)"
  core=$($PY benchmarks/bench_core.py --vehicles 20000 --clients 5000 --changed 1000 --ticks 30 --ref-ticks 2)
  say "[2/7] core memory (50k vehicles x 10k clients)"
  mem=$($PY benchmarks/bench_memory.py --vehicles 50000 --clients 10000)
  say "[3/7] pytest-benchmark (compiled and reference, same fixtures)"
  $PY -m pytest -q benchmarks/bench_core.py --benchmark-only --benchmark-columns=min,median,max,rounds \
    --benchmark-json="benchmarks/results/$stamp-pytest.json" >&2
  say "[4/7] end to end: scenarios a (with a client sweep), b, c; raw and python-socketio baselines"
  e2e=$($PY benchmarks/bench_e2e.py)
  say "[5/7] Kafka ingest vs a bare aiokafka loop (200k records)"
  kafka=$($PY benchmarks/bench_kafka.py --records 200000)
  say "[6/7] reconnect storm (10k clients move to a second instance on SIGTERM)"
  storm=$($PY benchmarks/bench_storm.py --clients 10000)
  say "[7/7] SSE, long polling and gRPC vs WebSocket (scenario a, 2k clients; 5k idle pollers)"
  transports=$($PY benchmarks/bench_transports.py)
  say "[+] capacity, Redis side (20k and 200k vehicles, 1/4/16 instances; ~12 min)"
  capacity=$($PY benchmarks/bench_capacity.py --check-writers)
  say "[+] --workers 2 against one worker, and the raw server in two processes against one (6 rounds, both sides at once, ~7 min)"
  workers=$($PY benchmarks/bench_workers.py --together --vehicles 10000 --clients 500 --rounds 6)
  say "[+] a second worker's cost per tick (20k vehicles, in one process)"
  mirror=$($PY benchmarks/bench_mirror.py)
  say "[+] one core's tick against two cores' over the same clients, split (10k vehicles, 500 clients)"
  split=$($PY benchmarks/bench_split.py)
  say "[+] a second worker before anyone connects: each process's CPU, one worker against two (10k vehicles, 3 rounds, ~4 min)"
  idle=$($PY benchmarks/bench_idle.py)
  say "[+] a worker's whole-fleet copy: the owner's longest hold, in slices against at once (200k vehicles)"
  copy=$($PY benchmarks/bench_copy.py)
fi
machine="$(uname -m), $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(.venv/bin/python -V)"
printf '{"timestamp":"%s","smoke":%s,"machine":"%s","core":%s,"memory":%s,"e2e":%s,"kafka":%s,"storm":%s,"transports":%s,"capacity":%s,"workers":%s,"mirror":%s,"split":%s,"idle":%s,"copy":%s}\n' \
  "$stamp" "$SMOKE" "$machine" "$core" "$mem" "$e2e" "$kafka" "$storm" "$transports" "$capacity" "$workers" "$mirror" "$split" "$idle" "$copy" > "$out"
$PY benchmarks/report.py "$out" >&2
say "wrote $out (.md, .png) in $(( $(date +%s) - t0 )) s"
$PY - "$out" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
e, k, st, tr = r["e2e"], r["kafka"], r["storm"], r["transports"]
print(json.dumps({
    "deliveries_ratio_vs_raw": e.get("deliveries_ratio_vs_raw"),
    "p99_ms": (e.get("half_saturation") or e["a_realtime"])["p99_ms"],
    "server_p99_ms": (e.get("half_saturation") or e["a_realtime"])["server_p99_ms"],
    "latency_floor_p99_ms": e.get("latency_floor_p99_ms"),
    "tick_period_ms": e["a_realtime"]["tick_period_ms"],
    "tick_compute_ms": e["a_realtime"]["tick_compute_ms_avg"],
    "socketio_ratio": e.get("socketio_ratio"),
    "rss_kb_per_conn": e["c_realtime"]["rss_kb_per_conn"],
    "kafka_ratio": k["kafka_ratio"],
    "storm_s": st["storm_s"],
    "storm_events_lost": st["events_lost"],
    "storm_p99_ratio": st["p99_ratio"],
    "sse_ratio": tr["sse_ratio_vs_websocket"],
    "poll_ratio": tr["poll_ratio_vs_websocket"],
    "grpc_ratio": tr["grpc_ratio_vs_websocket"],
    "workers_ratio": (r.get("workers") or {}).get("realtime_workers_ratio"),
    "raw_procs_ratio": (r.get("workers") or {}).get("raw_procs_ratio"),
    "workers_over_raw": (r.get("workers") or {}).get("realtime_over_raw"),
}))
PYEOF
