"""Turns one bench.sh results file into a markdown table and a PNG plot.

`python benchmarks/report.py benchmarks/results/<stamp>.json` writes
<stamp>.md and <stamp>.png next to it: deliveries/s and p99 latency against
the number of clients (scenario a sweep), with the raw limit for reference.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(v):
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else (f"{v:,.1f}" if abs(v) < 1000 else f"{v:,.0f}")
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(r: dict) -> str:
    rows = []
    e2e = r.get("e2e") or {}
    core = r.get("core") or {}
    kafka = r.get("kafka") or {}
    mem = r.get("memory") or {}
    storm = r.get("storm") or {}
    tr = r.get("transports") or {}

    def add(name, value, baseline, ratio, target=""):
        rows.append(f"| {name} | {fmt(value)} | {fmt(baseline)} | {fmt(ratio)} | {target} |")
    if e2e.get("a_realtime"):
        a, raw, sio = e2e["a_realtime"], e2e.get("raw", {}), e2e.get("socketio", {})
        add("(a) deliveries per server CPU-s vs raw writes", a["deliveries_per_cpu_s"],
            raw.get("deliveries_per_cpu_s", "-"), e2e.get("deliveries_ratio_vs_raw", "-"), "≥ 0.6")
        add("(a) deliveries per server CPU-s vs python-socketio", a["deliveries_per_cpu_s"],
            sio.get("deliveries_per_cpu_s", "-"), e2e.get("socketio_ratio", "-"), "≥ 20")
        add("(a) p99 update→client ms (tick 50 ms), full load", a["p99_ms"], "-", "-")
        half = e2e.get("half_saturation")
        if half:
            how = "extrapolated" if half.get("extrapolated") else "measured"
            add(f"(a) p99 update→client ms at half the saturating load ({half['clients']} clients; "
                f"saturation {half['saturating_clients']}, {how})", half["p99_ms"], "-", "-", "≤ 70")
        at = half or a
        if at.get("server_p99_ms") is not None:
            tick = a.get("tick_period_ms", 50)
            add(f"(a) server p99 ms, arrival to socket write ({at['clients']} clients; p50 {at.get('server_p50_ms')})",
                at["server_p99_ms"], tick, round(at["server_p99_ms"] - tick, 2), "≤ tick + 20 ms")
        if e2e.get("latency_floor_p99_ms") is not None:
            add("(a) client-observed p99 ms vs the raw server's at the same load (the floor)",
                at["p99_ms"], e2e["latency_floor_p99_ms"], round(at["p99_ms"] / max(e2e["latency_floor_p99_ms"], 1e-9), 2))
        add("(a) deliveries/s at offered load", a["deliveries_per_s"], raw.get("deliveries_per_s", "-"), "-")
    if e2e.get("b_realtime"):
        b = e2e["b_realtime"]
        add("(b) wall screens deliveries/s", b["deliveries_per_s"], "-", "-")
    if e2e.get("c_realtime"):
        c = e2e["c_realtime"]
        add(f"(c) RSS KB per idle connection ({c['connections']} conns)", c["rss_kb_per_conn"], "-", "-", "≤ 15")
        cd = e2e.get("c_realtime_deflate")
        if cd:
            add("(c) the same with permessage-deflate negotiated", cd["rss_kb_per_conn"],
                c["rss_kb_per_conn"], round(cd["rss_kb_per_conn"] / max(c["rss_kb_per_conn"], 1e-9), 3))
    if kafka:
        add("(d) Kafka records/s vs bare aiokafka", kafka["realtime_records_per_s"],
            kafka["bare_aiokafka_records_per_s"], kafka["kafka_ratio"], "≥ 0.8")
    if storm:
        add(f"(e) reconnect storm: s until {storm['clients']} clients resumed with full state",
            storm["storm_s"], "-", "-")
        add("(e) events lost in the storm (of those published)", storm["events_lost"],
            storm["events_published"], "-", "0")
        add("(e) observers' p99 ms during the storm vs before it", storm["observer_p99_storm_ms"],
            storm["observer_p99_before_ms"], storm["p99_ratio"])
        add("(e) Redis pool waits / timeouts during the storm", storm["redis_pool_waits"],
            storm["redis_pool_timeouts"], "-")
    if tr:
        ws = tr["websocket"]
        for mode, name, target in (("sse", "SSE", "≥ 0.5"), ("poll", "long polling", ""), ("grpc", "gRPC", "")):
            add(f"(f) {name} deliveries per server CPU-s vs WebSocket ({tr['clients']} clients, (a) viewports)",
                tr[mode]["deliveries_per_cpu_s"], ws["deliveries_per_cpu_s"], tr[f"{mode}_ratio_vs_websocket"],
                target)
        idle = tr["idle"]
        add(f"(f) RSS KB per waiting long poller ({idle['poll']['clients']}) vs per idle WebSocket",
            idle["poll"]["rss_kb_per_client"], idle["websocket"]["rss_kb_per_client"],
            round(idle["poll"]["rss_kb_per_client"] / max(idle["websocket"]["rss_kb_per_client"], 1e-9), 2))
        add("(f) server CPU-s per s with those pollers waiting vs the idle WebSockets",
            idle["poll"]["idle_cpu_s_per_s"], idle["websocket"]["idle_cpu_s_per_s"], "-")
    if core:
        add("(4) core apply+route+encode ms/tick vs numpy reference", core["compiled_tick_ms_median"],
            core["reference_tick_ms"], core["speedup_vs_reference"], "≥ 20×")
        add("core route+encode µs per delivery", core["route_encode_us_per_delivery"], "-", "-", "≤ 0.3")
    if mem:
        add("core RSS MB, 10k clients × 50k vehicles", mem["rss_growth_mb"], mem["core_arrays_mb"],
            mem["rss_vs_arrays"])
    copy = r.get("copy")
    if copy:
        add(f"a worker's whole-fleet copy ({copy['vehicles']} vehicles): the owner's longest hold, ms, "
            "in slices vs at once", copy["longest_hold_ms"], copy["at_once_longest_hold_ms"], copy["hold_ratio"])
    head = ("| figure | realtime | baseline | ratio | target |\n|---|---|---|---|---|\n")
    return head + "\n".join(rows) + "\n"


def plot(r: dict, path: Path) -> bool:
    sweep = (r.get("e2e") or {}).get("sweep") or []
    if not sweep:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    xs = [p["clients"] for p in sweep]
    fig, ax1 = plt.subplots(figsize=(7, 4))
    ax1.plot(xs, [p["deliveries_per_s"] for p in sweep], "o-", color="tab:blue", label="deliveries/s")
    raw = (r.get("e2e") or {}).get("raw")
    if raw:
        ax1.axhline(raw["deliveries_per_s"], color="tab:blue", ls=":", label="raw limit (same clients)")
    ax1.set_xlabel("clients")
    ax1.set_ylabel("deliveries/s", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(xs, [p["p99_ms"] for p in sweep], "s--", color="tab:red", label="p99 ms")
    ax2.set_ylabel("p99 update→client (ms)", color="tab:red")
    ax1.set_title(f"scenario (a): {r['e2e']['vehicles']} vehicles at 1 Hz, viewports ~1%")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def main():
    src = Path(sys.argv[1])
    r = json.loads(src.read_text())
    md = f"# bench results {r.get('timestamp', '')}\n\n{r.get('machine', '')}\n\n" + table(r)
    src.with_suffix(".md").write_text(md)
    if plot(r, src.with_suffix(".png")):
        md += f"\n![deliveries and p99 against clients]({src.with_suffix('.png').name})\n"
        src.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
