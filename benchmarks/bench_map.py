"""The dispatcher map under load, in headless Chromium (Playwright, Debian's
`chromium`): frames per second and the main thread's busy share while N
simulated vehicles move at 1 Hz, against the same page with no vehicles in
the same run (the baseline: what this machine's headless Chromium gives an
idle map).

    .venv/bin/python benchmarks/bench_map.py [--vehicles 0,500,2000,5000] [--seconds 8]

Prints one JSON object. Each size runs its own development-mode server
(`--simulate N --max-visible 1000000`, so that every vehicle is drawn, not
clustered) on the map's default view, where the whole fleet is in sight.
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Server  # noqa: E402

# frames, and the time the main thread spent in long tasks (> 50 ms), over a window
MEASURE = """async (ms) => {
  const longTasks = [];
  const obs = new PerformanceObserver((l) => { for (const e of l.getEntries()) longTasks.push(e.duration); });
  try { obs.observe({ type: "longtask", buffered: false }); } catch (e) {}
  let frames = 0, worst = 0, last = performance.now();
  const t0 = last;
  await new Promise((done) => {
    function f(now) {
      frames++; worst = Math.max(worst, now - last); last = now;
      if (now - t0 < ms) requestAnimationFrame(f); else done();
    }
    requestAnimationFrame(f);
  });
  obs.disconnect();
  const elapsed = performance.now() - t0;
  const heap = performance.memory ? performance.memory.usedJSHeapSize : null;
  return { fps: frames * 1000 / elapsed, worst_frame_ms: worst, long_task_ms: longTasks.reduce((a, b) => a + b, 0),
           elapsed_ms: elapsed, heap_bytes: heap, markers: window.dispatcher.markers.size,
           vehicles: window.realtimeClient.vehicles.size };
}"""


def measure(browser, n: int, seconds: float) -> dict:
    s = Server("--simulate", str(n), "--max-visible", "1000000", secret=None)
    try:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        page.goto(s.url + "/")
        page.wait_for_function(f"window.dispatcher && window.dispatcher.markers.size >= {int(n * 0.8)}",
                               timeout=60000)
        time.sleep(2)   # past the first snapshot
        r = page.evaluate(MEASURE, seconds * 1000)
        updates = page.evaluate("Number(document.getElementById('rate').textContent)")
        page.close()
        r.update(vehicles_simulated=n, updates_per_s=updates,
                 busy_share=round(r["long_task_ms"] / r["elapsed_ms"], 3))
        return r
    finally:
        s.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vehicles", default="0,500,2000,5000")
    ap.add_argument("--seconds", type=float, default=8.0)
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    sizes = [int(x) for x in a.vehicles.split(",")]
    if 0 not in sizes:
        sizes.insert(0, 0)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        rows = [measure(browser, n, a.seconds) for n in sizes]
        browser.close()
    base = next(r for r in rows if r["vehicles_simulated"] == 0)["fps"]
    for r in rows:
        r["fps_ratio_vs_empty_map"] = round(r["fps"] / base, 3) if base else None
        r["fps"] = round(r["fps"], 1)
        r["worst_frame_ms"] = round(r["worst_frame_ms"], 1)
    print(json.dumps({"map": rows, "baseline": "the same page with no vehicles, same run"}))


if __name__ == "__main__":
    main()
