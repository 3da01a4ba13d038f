#!/usr/bin/env bash
# Builds the project, then runs every benchmark in benchmarks/.
#   ./bench.sh          full sizes (issue 2: 20k vehicles x 5k clients)
#   ./bench.sh --smoke  cut-down sizes, well under a minute; `make test` runs it so it cannot rot
# Results go to benchmarks/results/<timestamp>.json; the last line printed is one JSON object.
set -euo pipefail
cd "$(dirname "$0")"
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
make -s build >/dev/null
PY=.venv/bin/python
mkdir -p benchmarks/results
stamp=$(date -u +%Y%m%dT%H%M%SZ)
out="benchmarks/results/$stamp.json"

if [ "$SMOKE" = 1 ]; then
  echo "bench: core (smoke: 4k vehicles x 1k clients)" >&2
  core=$($PY benchmarks/bench_core.py --vehicles 4000 --clients 1000 --changed 200 --ticks 5 --ref-ticks 1)
else
  echo "bench: core (20k vehicles x 5k clients, 1k changed per tick)" >&2
  core=$($PY benchmarks/bench_core.py --vehicles 20000 --clients 5000 --changed 1000 --ticks 30 --ref-ticks 2)
  echo "bench: core memory (50k vehicles x 10k clients)" >&2
  mem=$($PY benchmarks/bench_memory.py --vehicles 50000 --clients 10000)
  echo "$mem" >&2
  echo "bench: pytest-benchmark (compiled and reference, same fixtures)" >&2
  $PY -m pytest -q benchmarks/bench_core.py --benchmark-only --benchmark-columns=min,median,max,rounds \
    --benchmark-json="benchmarks/results/$stamp-pytest.json" >&2
fi
echo "$core" >&2
printf '{"timestamp":"%s","smoke":%s,"core":%s,"memory":%s}\n' "$stamp" "$SMOKE" "$core" "${mem:-null}" > "$out"
echo "bench: wrote $out" >&2
$PY - "$out" <<'PYEOF'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["core"]
print(json.dumps({"core_speedup_vs_reference": c["speedup_vs_reference"],
                  "core_us_per_delivery": c["us_per_delivery"],
                  "core_route_encode_us_per_delivery": c["route_encode_us_per_delivery"],
                  "core_tick_ms": c["compiled_tick_ms_median"],
                  "deliveries_per_tick": c["deliveries_per_tick"]}))
PYEOF
