"""The live map in headless Chromium, driven over the DevTools protocol.

`make run` must show moving vehicles at http://127.0.0.1:8080: this starts the
server the way `make run` does (development mode, simulated fleet), opens the
page and checks that vehicles appear and move. A screenshot is left in
/tmp/realtime-map.png for a person to look at.
"""
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest
import websockets

from conftest import Server, free_port, require

pytestmark = pytest.mark.integration

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,800"]


class CDP:
    def __init__(self, ws):
        self.ws = ws
        self.n = 0

    async def call(self, method, **params):
        self.n += 1
        my = self.n
        await self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            m = json.loads(await asyncio.wait_for(self.ws.recv(), 20))
            if m.get("id") == my:
                if "error" in m:
                    raise RuntimeError(m["error"])
                return m["result"]

    async def eval(self, expr):
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r["result"].get("value")


@pytest.fixture
def chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require("chromium", exe is not None)
    port = free_port()
    profile = tempfile.mkdtemp(prefix="rt-chromium-")
    p = subprocess.Popen([exe, *CHROMIUM_FLAGS, f"--remote-debugging-port={port}",
                          f"--user-data-dir={profile}", "about:blank"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
        try:
            targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1).read())
            page = next(t for t in targets if t["type"] == "page")
            break
        except (OSError, StopIteration):
            if time.time() > deadline:
                p.kill()
                raise
            time.sleep(0.2)
    yield page["webSocketDebuggerUrl"]
    p.terminate()
    p.wait(10)
    shutil.rmtree(profile, ignore_errors=True)


async def test_map_page_shows_moving_vehicles(chromium):
    server = Server("--simulate", "300", secret=None)  # development mode, as `make run`
    try:
        async with websockets.connect(chromium, max_size=2**26) as ws:
            cdp = CDP(ws)
            await cdp.call("Page.enable")
            await cdp.call("Page.navigate", url=server.url + "/")
            count = 0
            for _ in range(100):
                await asyncio.sleep(0.1)
                count = await cdp.eval("window.realtimeClient ? window.realtimeClient.vehicles.size : 0") or 0
                if count > 20:
                    break
            assert count > 20, server.logs()
            snap = "JSON.stringify(Array.from(window.realtimeClient.vehicles.values()).map(v => [v.v, v.p]))"
            before = dict(json.loads(await cdp.eval(snap)))
            moved = []
            deadline = time.monotonic() + 20
            while len(moved) <= 5 and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                after = dict(json.loads(await cdp.eval(snap)))
                moved = [v for v in before if v in after and before[v] != after[v]]
            assert len(moved) > 5
            assert int(await cdp.eval("document.getElementById('count').textContent")) > 20
            shot = await cdp.call("Page.captureScreenshot", format="png")
            with open("/tmp/realtime-map.png", "wb") as f:
                f.write(base64.b64decode(shot["data"]))
    finally:
        server.stop()
