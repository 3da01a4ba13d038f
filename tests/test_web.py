"""The browser client library (PROTOCOL §8) and the dispatcher map, in a real
browser: Playwright for Python driving Debian's `chromium` (executable_path;
Playwright's own browser download is not used), against real server
processes. Screenshots are left in test-artifacts/ (REALTIME_TEST_ARTIFACTS).

The library is loaded with a dynamic import() into a page of the server's
origin, as any page would; transports are taken away with an init script
(`delete window.WebSocket`, then `EventSource`), as in an old browser.
"""
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest

from conftest import ROOT, Server, ingest, require, token, update

pytestmark = pytest.mark.integration

ARTIFACTS = Path(os.environ.get("REALTIME_TEST_ARTIFACTS") or ROOT / "test-artifacts")
TRANSPORTS = {"websocket": [], "sse": ["WebSocket"], "poll": ["WebSocket", "EventSource"]}


@pytest.fixture(scope="module")
def browser():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require("chromium", exe is not None)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require("playwright (requirements-dev.txt)", False)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu", "--disable-quic"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    pg = ctx.new_page()
    pg.console = []
    pg.on("console", lambda m: pg.console.append(f"{m.type}: {m.text}"))
    pg.on("pageerror", lambda e: pg.console.append(f"pageerror: {e}"))
    yield pg
    ctx.close()


def without(page, *names):
    """An old browser: these constructors do not exist in the page."""
    if names:
        page.add_init_script("".join(f"delete window.{n}; window.{n} = undefined;" for n in names))


# The harness: a RealtimeClient in the page, everything it reports logged.
START = """async ([url, token, opts, sub]) => {
  const { RealtimeClient } = await import("/static/realtime-client.js");
  const log = window.log = { states: [], events: [], errors: [], kinds: {}, leaves: [], welcomes: [] };
  if (token === "function") {
    token = async () => { log.tokenCalls = (log.tokenCalls || 0) + 1; return await window.mintToken(log.tokenCalls); };
  }
  const c = window.c = new RealtimeClient({ url, token, ...opts });
  c.on("state", (s) => log.states.push(s));
  c.on("event", (m) => log.events.push(m));
  c.on("error", (e) => { log.errors.push([e.code, e.message, e.fatal]); (log.errorTimes = log.errorTimes || []).push(Date.now()); });
  c.on("message", (m) => { if (m.type === "reconnect") log.reconnect = [Date.now(), m.after_ms]; });
  c.on("vehicle", (v, kind) => { log.kinds[kind] = (log.kinds[kind] || 0) + 1; });
  c.on("leave", (id, r) => log.leaves.push([id, r]));
  c.on("welcome", (w) => log.welcomes.push(w));
  log.messages = [];   // what came, for a failure's message
  c.on("message", (m) => log.messages.push(m.type + (m.type === "batch" ? ":" + m.messages.map((x) => x.t) : "")));
  const within = (p, what) => Promise.race([p, new Promise((_, no) => setTimeout(() => no(new Error(what + ": no answer in 15 s")), 15000))]);
  try {
    await within(c.connect(), "connect");
  } catch (e) {
    return { error: [e.code, e.message] };
  }
  if (sub) {
    try { await within(c.subscribe(sub), "subscribe"); } catch (e) { return { error: [e.code, e.message], log }; }
  }
  return { transport: c.transport, session: c.session };
}"""


def start(page, server_url, tok, sub=None, **opts):
    page.goto(server_url + "/health/live")   # a page of the server's origin
    return page.evaluate(START, [server_url, tok, opts, sub])


def wait(page, expr, timeout=15.0, what=None):
    try:
        page.wait_for_function(expr, timeout=timeout * 1000, polling=100)
    except Exception:
        state = page.evaluate("window.realtimeClient && (window.c = window.realtimeClient),"
                              " window.c ? {state: c.state, transport: c.transport, log: window.log,"
                              " vehicles: [...c.vehicles.values()]} : null")
        raise AssertionError(f"{what or expr}: not within {timeout} s; client: {json.dumps(state)[:3000]};"
                             f" console: {page.console[-20:]}") from None


def vehicle(page, vid):
    return page.evaluate("(id) => { const v = c.vehicles.get(id); return v ? {...v} : null; }", vid)


def shot(page, name):
    page.screenshot(path=str(ARTIFACTS / name))


@pytest.mark.parametrize("transport,fmt", [("websocket", "json"), ("websocket", "msgpack"),
                                           ("sse", "json"), ("poll", "json")])
def test_the_library_over_each_transport(page, server, uid, transport, fmt):
    """Updates arrive as full, pos and delta; an alert comes once as an event;
    c.transport says which transport carries them, and it is remembered."""
    vid = uid + "v"
    assert ingest(server, [update(vid, status="moving", speed=30, course=90)])[0] == 200
    without(page, *TRANSPORTS[transport])
    r = start(page, server.url, token(), {"vehicles": [vid]}, format=fmt)
    assert r.get("transport") == transport, (r, page.console)
    wait(page, f"c.vehicles.has({json.dumps(vid)})", what="the vehicle's full")
    v = vehicle(page, vid)
    assert v["id"] == vid and v["status"] == "moving" and v["lat"] == pytest.approx(55.75)
    assert set(v) == {"id", "lat", "lon", "speed", "course", "status", "vehicle_type", "ts", "alerts",
                      "driver", "assignment"}, v
    assert v["speed"] == 30 and v["course"] == 90 and v["alerts"] == []

    ingest(server, [update(vid, lat=55.76, status="moving", speed=31, course=95)])
    wait(page, f"c.vehicles.get({json.dumps(vid)}).lat > 55.755", what="a pos")
    ingest(server, [update(vid, lat=55.76, status="stopped", speed=0, course=95)])
    wait(page, f"c.vehicles.get({json.dumps(vid)}).status === 'stopped'", what="a delta")
    ingest(server, [update(vid, lat=55.76, status="stopped", speed=0, course=95, alerts=["panic_button"])])
    wait(page, "log.events.length >= 1", what="the alert as an event")
    time.sleep(0.5)
    log = page.evaluate("log")
    assert [e["v"] for e in log["events"]] == [vid], log["events"]
    assert log["kinds"].get("full") == 1 and log["kinds"].get("pos", 0) >= 1 and log["kinds"].get("delta", 0) >= 1, log
    assert vehicle(page, vid)["alerts"] == ["panic_button"]
    assert log["states"][:2] == ["connecting", "connected"] and log["errors"] == [], log
    assert page.evaluate("c.transport") == transport
    # nothing failed (a transport the browser lacks is skipped at once): nothing to remember
    assert page.evaluate("localStorage.getItem('realtime.transport:' + c.url)") is None
    # leave: the subscription no longer names it
    page.evaluate("c.subscribe({vehicles: ['nothing-here']})")
    wait(page, f"!c.vehicles.has({json.dumps(vid)})", what="the leave")
    assert page.evaluate("log.leaves") == [[vid, "subscription"]]
    page.evaluate("c.close()")
    assert page.evaluate("c.state") == "closed"
    shot(page, f"library-{transport}-{fmt}.png")


@pytest.mark.parametrize("transport", ["sse", "poll"])
def test_the_library_from_a_page_on_another_origin(page, server, uid, transport):
    """A page of another origin (http://localhost:P against http://127.0.0.1:P)
    loads the library from the server and uses the HTTP transports: CORS."""
    vid = uid + "v"
    ingest(server, [update(vid, status="moving")])
    without(page, *TRANSPORTS[transport])
    page.goto(server.url.replace("127.0.0.1", "localhost") + "/health/live")
    res = page.evaluate(START.replace('import("/static/realtime-client.js")', "import(url + '/static/realtime-client.js')"),
                        [server.url, token(), {}, {"vehicles": [vid]}])
    assert res.get("transport") == transport, (res, page.console)
    wait(page, f"c.vehicles.has({json.dumps(vid)})")
    assert page.evaluate(f"c.get({json.dumps(vid)}).then(d => d.vehicle_id)") == vid
    page.evaluate("c.close()")


# A WebSocket that a proxy swallows: it never opens, and never closes.
SILENT_WEBSOCKET = """window.WebSocket = class { constructor() { this.readyState = 0; }
  send() {} close() {} };"""


# A WebSocket that a proxy refuses: closed before it opens.
REFUSED_WEBSOCKET = """window.WebSocket = class { constructor() { this.readyState = 0;
  setTimeout(() => this.onclose && this.onclose({ code: 1006, reason: "" }), 50); } send() {} close() {} };"""


def test_a_refused_transport_falls_back_at_once(page, server, uid):
    page.add_init_script(REFUSED_WEBSOCKET)
    t0 = time.monotonic()
    r = start(page, server.url, token(), {"vehicles": [uid + "v"]})
    assert r["transport"] == "sse" and time.monotonic() - t0 < 3, r
    # a page load that had to fall back remembers it
    assert page.evaluate("JSON.parse(localStorage.getItem('realtime.transport:' + c.url)).transport") == "sse"
    page.evaluate("c.close()")


def test_a_sleep_is_not_taken_for_a_dead_server(page, server, uid):
    """The laptop lid closes for 10 minutes (Playwright's clock jumps): the
    liveness timer fires late, re-arms and checks the link instead of
    declaring the server dead; the connection goes on."""
    vid = uid + "v"
    ingest(server, [update(vid)])
    page.clock.install()
    assert start(page, server.url, token(), {"vehicles": [vid]})["transport"] == "websocket"
    wait(page, "log.messages.includes('pong')", what="the first round trip")
    pongs = page.evaluate("log.messages.filter(m => m === 'pong').length")
    page.clock.fast_forward("10:00")
    time.sleep(2)
    ingest(server, [update(vid, lat=55.8)])
    wait(page, f"c.vehicles.get({json.dumps(vid)}).lat > 55.79", what="an update after the sleep")
    log = page.evaluate("log")
    assert log["states"] == ["connecting", "connected"] and len(log["welcomes"]) == 1, log
    assert log["messages"].count("pong") > pongs, log["messages"]   # the link was checked after the sleep
    page.evaluate("c.close()")


def test_a_silent_transport_fails_after_5_s_and_the_fallback_is_remembered(page, server, uid):
    """A WebSocket that never answers counts as failed after 5 s; SSE takes
    over and is remembered (localStorage, 30 minutes), so the next page load
    starts with it. A refused token rejects connect() at once."""
    page.add_init_script(SILENT_WEBSOCKET)
    t0 = time.monotonic()
    r = start(page, server.url, token(), {"vehicles": [uid + "v"]})
    took = time.monotonic() - t0
    assert r["transport"] == "sse" and 4.5 < took < 12, (r, took)
    remembered = page.evaluate("JSON.parse(localStorage.getItem('realtime.transport:' + c.url))")
    assert remembered["transport"] == "sse"
    assert 25 * 60 * 1000 < remembered["expires"] - time.time() * 1000 <= 30 * 60 * 1000
    page.evaluate("c.close()")
    # a page load later: the remembered one first, without the 5 s wait
    page.goto("about:blank")
    t0 = time.monotonic()
    r = start(page, server.url, token(), None)
    assert r["transport"] == "sse" and time.monotonic() - t0 < 4, r
    page.evaluate("c.close()")
    t0 = time.monotonic()
    r = start(page, server.url, token(secret="wrong"), None)
    assert r["error"][0] == 4001 and time.monotonic() - t0 < 4, r
    assert page.evaluate("c.state") == "closed"


def test_backoff_has_full_jitter_and_online_reconnects_at_once(page, uid):
    """Delays between attempts are drawn between 0.5 s and min(20 s, 0.5 s x 2^n);
    the browser's `online` event tries at once instead of waiting; the server
    back on its port is found by itself."""
    s = Server("--simulate", "0", "--tick-ms", "20")
    s2 = None
    try:
        vid = uid + "v"
        ingest(s, [update(vid)])
        assert start(page, s.url, token(), {"vehicles": [vid]})["transport"] == "websocket"
        page.evaluate("log.retries = []; c.on('retry', (r) => log.retries.push({...r, at: Date.now()}))")
        s.proc.send_signal(signal.SIGKILL)   # a crash: no `reconnect` message
        s.proc.wait(10)
        s.log.close()
        wait(page, "log.retries.some(r => r.delay >= 2500)", timeout=60, what="a long backoff")
        retries = page.evaluate("log.retries")
        for r in retries:   # full jitter from the first retry: 0.5-1 s, then 0.5-2 s, ...
            assert 500 <= r["delay"] <= min(20000, 500 * 2 ** (r["attempt"] + 1)), retries
        assert [r["attempt"] for r in retries] == list(range(len(retries))), retries
        # while that long wait runs, the network comes back: an attempt at once
        n = len(page.evaluate("log.errorTimes"))
        t0 = page.evaluate("Date.now()")
        page.evaluate("window.dispatchEvent(new Event('online'))")
        wait(page, f"log.errorTimes.length > {n}", timeout=2, what="an attempt right after `online`")
        last = page.evaluate("log.retries[log.retries.length - 1]")
        tried = page.evaluate(f"log.errorTimes[{n}]")
        assert tried - t0 < 1000, (tried - t0, last)
        # so does the tab becoming visible again
        n = len(page.evaluate("log.errorTimes"))
        t0 = page.evaluate("Date.now()")
        page.evaluate("""Object.defineProperty(document, 'visibilityState', {value: 'hidden', configurable: true});
            document.dispatchEvent(new Event('visibilitychange'));
            Object.defineProperty(document, 'visibilityState', {value: 'visible', configurable: true});
            document.dispatchEvent(new Event('visibilitychange'));""")
        wait(page, f"log.errorTimes.length > {n}", timeout=2, what="an attempt right after the tab is visible")
        assert page.evaluate(f"log.errorTimes[{n}]") - t0 < 1000
        s2 = Server("--simulate", "0", "--tick-ms", "20", port=s.port)
        ingest(s2, [update(vid, lat=55.8)])
        wait(page, f"c.state === 'connected' && c.vehicles.get({json.dumps(vid)}) && "
                   f"c.vehicles.get({json.dumps(vid)}).lat > 55.79", timeout=30, what="back on the restarted server")
        page.evaluate("c.close()")
    finally:
        if s2 is not None:
            s2.stop()
        elif s.proc.poll() is None:
            s.stop()


def _in_event_log(r, needle, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(needle in repr(f) for _, f in r.xrevrange("events:stream", count=200)):
            return
        time.sleep(0.1)
    raise AssertionError(f"{needle} not in the event log")


@pytest.mark.parametrize("transport,before", [("websocket", True), ("sse", True), ("poll", True),
                                              ("websocket", False)])
def test_resume_over_a_server_restart_delivers_a_missed_event_once(page, module_redis_url, uid, transport, before):
    """The server the client is on restarts while an event is published (another
    instance logs it). The client reconnects by itself, resumes with its session
    and last event, gets the missed event once, and says `recovered`."""
    import redis
    r = redis.Redis.from_url(module_redis_url)
    args = ("--simulate", "0", "--tick-ms", "20", "--redis", module_redis_url)
    a, b = Server(*args), Server(*args)
    a2 = None
    try:
        vid = uid + "v"
        assert ingest(a, [update(vid, status="moving")])[0] == 200
        without(page, *TRANSPORTS[transport])
        res = start(page, a.url, token(sub=uid + "u"), {"vehicles": [vid]})
        assert res["transport"] == transport, res
        wait(page, f"c.vehicles.has({json.dumps(vid)})")
        if before:
            r.publish(f"vehicle:events:{vid}", json.dumps({"type": "before"}))
            wait(page, "log.events.length === 1", what="the first event")
        # without an event of its own, the client resumes from its welcome's last_event
        time.sleep(1.2)   # the session's record (and an HTTP reader's acknowledgement) reach Redis
        # the vehicle's state is in Redis (the writer lease may still be held by
        # an instance an earlier test killed: it runs out within 10 s)
        deadline = time.monotonic() + 15
        while not r.exists(f"vehicle:current:{vid}") and time.monotonic() < deadline:
            time.sleep(0.1)
        a.proc.send_signal(signal.SIGTERM)   # a deploy: `reconnect`, then 1001
        a.proc.wait(30)
        a.log.close()
        wait(page, "c.state === 'reconnecting'", what="reconnecting")
        # `reconnect.after_ms` is honoured: no attempt before it
        wait(page, "log.errorTimes && log.errorTimes.length >= 1", what="a first attempt on the stopped server")
        log = page.evaluate("log")
        assert log.get("reconnect"), log["messages"]
        (told_at, after_ms), first_try = log["reconnect"], log["errorTimes"][0]
        assert first_try - told_at >= after_ms - 20, (told_at, after_ms, first_try)
        r.publish(f"vehicle:events:{vid}", json.dumps({"type": "while_away"}))
        _in_event_log(r, "while_away")
        a2 = Server(*args, port=a.port)
        wait(page, "log.events.some(e => e.e === 'while_away') && c.state === 'connected'", timeout=40,
             what="the missed event after the restart")
        r.publish(f"vehicle:events:{vid}", json.dumps({"type": "after"}))
        wait(page, "log.events.some(e => e.e === 'after')", what="a live event after the resume")
        time.sleep(0.5)
        log = page.evaluate("log")
        expected = (["before"] if before else []) + ["while_away", "after"]
        assert [e["e"] for e in log["events"]] == expected, log["events"]
        assert len({e["eid"] for e in log["events"]}) == len(expected)
        assert page.evaluate("c.recovered") is True
        assert page.evaluate("c.transport") == transport
        assert log["welcomes"][-1]["resumed"] is True and log["welcomes"][-1]["recovered"] is True
        assert page.evaluate("c.session") == res["session"]
        assert vehicle(page, vid) is not None   # the state came back with the resume
        page.evaluate("c.close()")
    finally:
        for s in (a2, b):
            if s is not None:
                s.stop()


def test_a_snapshot_in_parts_is_applied_whole_and_a_lost_subscription_is_sent_again(page, module_redis_url, uid):
    """§3.4 sends a snapshot of more than 1,000 vehicles as several batches,
    each but the last with `more`. subscribe() resolves with all of them in
    c.vehicles, and a resume's snapshot in parts takes nothing away (the
    library took its first part for all of it: `leave` "reset" for the rest,
    then `full` again). A resume whose stored subscription cannot be read
    says `restored: false`, and the library subscribes again."""
    import redis
    r = redis.Redis.from_url(module_redis_url)
    s = Server("--simulate", "0", "--tick-ms", "20", "--redis", module_redis_url)
    try:
        g, n = uid + "g", 1500
        assert ingest(s, [update(f"{uid}{i:04d}", 55 + i / 10000, 37.0, groups=[g]) for i in range(n)])[0] == 200
        res = start(page, s.url, token(sub=uid + "u"), {"groups": [g]})
        assert res.get("transport") == "websocket", res
        assert page.evaluate("c.vehicles.size") == n   # as subscribe() resolved
        time.sleep(1.2)   # the session's record reaches Redis
        page.evaluate("c._t.ws.close(4000)")   # the link drops: the library resumes
        wait(page, "log.welcomes.length === 2 && c.state === 'connected'", what="the resume")
        time.sleep(1.0)
        log = page.evaluate("log")
        assert log["welcomes"][1]["resumed"] is True and log["welcomes"][1]["restored"] is True
        assert log["leaves"] == [] and page.evaluate("c.vehicles.size") == n, log["leaves"][:5]
        # another version wrote the record: the subscription cannot come back
        key = f"session:{res['session']}"
        record = json.loads(r.get(key))
        r.set(key, json.dumps({**record, "subscription": {"groups": 5}}))
        page.evaluate("c._t.ws.close(4000)")
        wait(page, "log.welcomes.length === 3 && c.state === 'connected'", what="the second resume")
        assert page.evaluate("log.welcomes[2].restored") is False
        wait(page, f"c.vehicles.size === {n}", what="the subscription sent again")
        stored = json.loads(r.get(key))
        assert stored["subscription"]["groups"] == [g]
        page.evaluate("c.close()")
    finally:
        s.stop()


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
def test_token_refresh_through_the_token_function(page, uid, transport):
    """token_expiring is answered with a token from the function; the
    connection outlives the first token without a reconnect."""
    s = Server("--simulate", "0", "--tick-ms", "20", "--token-expiry-warning-s", "60")
    try:
        vid = uid + "v"
        ingest(s, [update(vid)])
        page.expose_function("mintToken", lambda n: token(sub=uid + "u", ttl=4 if n == 1 else 3600))
        without(page, *TRANSPORTS[transport])
        res = start(page, s.url, "function", {"vehicles": [vid]})
        assert res["transport"] == transport, res
        wait(page, "log.tokenCalls >= 2", what="the refresh asked the token function")
        time.sleep(5)   # past the first token's exp
        ingest(s, [update(vid, lat=55.8)])
        wait(page, f"c.vehicles.get({json.dumps(vid)}).lat > 55.79", what="an update after the first exp")
        log = page.evaluate("log")
        assert log["states"] == ["connecting", "connected"], log
        assert log["errors"] == [], log
        # SSE renews with a new stream of the same session (`continued` from the last
        # batch, or a new copy when none was read yet): no reconnect; the others
        # refresh on the connection they have
        assert len(log["welcomes"]) == (2 if transport == "sse" else 1), log
        assert all(w["session"] == res["session"] and w["resumed"] for w in log["welcomes"][1:]), log
        page.evaluate("c.close()")
    finally:
        s.stop()


@pytest.mark.parametrize("transport", ["websocket", "sse", "poll"])
def test_a_4001_fetches_a_new_token_before_reconnecting(page, uid, transport):
    """A token that runs out unrefreshed closes with 4001: with a function the
    client asks it for a new one and resumes; without one it stops with an error."""
    s = Server("--simulate", "0", "--tick-ms", "20", "--token-expiry-warning-s", "60")
    try:
        vid = uid + "v"
        ingest(s, [update(vid)])
        # the token function gives the same 3 s token twice (at connect, then for
        # the token_expiring): nothing to refresh with, so the server closes with 4001
        short = token(sub=uid + "u", ttl=3)
        page.expose_function("mintToken", lambda n: short if n <= 2 else token(sub=uid + "u", ttl=3600))
        without(page, *TRANSPORTS[transport])
        start(page, s.url, "function", {"vehicles": [vid]})
        wait(page, "log.welcomes.length >= 2 && c.state === 'connected'", timeout=20,
             what="a reconnect with a fresh token after the 4001")
        log = page.evaluate("log")
        assert log["tokenCalls"] >= 3, log
        assert log["welcomes"][-1]["resumed"] is True, log
        assert "closed" not in log["states"], log
        ingest(s, [update(vid, lat=55.8)])
        wait(page, f"c.vehicles.get({json.dumps(vid)}).lat > 55.79")
        page.evaluate("c.close()")
        # without a function: the 4001 ends the client, with an `error`
        res = start(page, s.url, token(sub=uid + "u", ttl=2), {"vehicles": [vid]})
        assert res["transport"] == transport
        wait(page, "c.state === 'closed'", timeout=15, what="closed at exp")
        errors = page.evaluate("log.errors")
        assert errors and errors[-1][0] == 4001 and errors[-1][2] is True, errors
    finally:
        s.stop()


def test_the_dispatcher_map(page):
    """`make run`'s page: development mode, a simulated fleet, no tiles
    reachable. Markers appear and move; the badge shows the transport;
    panning changes the subscription; zooming out shows clusters; a click
    shows the vehicle's long form."""
    s = Server("--simulate", "300", secret=None)
    try:
        page.goto(s.url + "/")
        wait(page, "window.dispatcher && window.dispatcher.markers.size > 100", timeout=20, what="markers")
        assert page.evaluate("realtimeClient.vehicles.size") > 100
        snap = "JSON.stringify([...dispatcher.markers].map(([id, m]) => [id, [m.getLatLng().lat, m.getLatLng().lng]]))"
        before = dict(json.loads(page.evaluate(snap)))
        time.sleep(3)
        after = dict(json.loads(page.evaluate(snap)))
        moved = [v for v in before if v in after and before[v] != after[v]]
        assert len(moved) > 5, (len(before), len(after))
        badge = page.locator("#badge")
        assert badge.get_attribute("data-transport") == "websocket"
        assert badge.get_attribute("data-state") == "connected"
        assert "websocket" in badge.inner_text() and "connected" in badge.inner_text()
        wait(page, "document.getElementById('badge-text').textContent.includes(' ms')", what="a round-trip time")
        shot(page, "map.png")

        # a click on a vehicle that stands still shows its long form
        target = page.evaluate("""() => {
          const size = dispatcher.map.getSize();
          for (const [id, m] of dispatcher.markers) {
            const v = realtimeClient.vehicles.get(id);
            const p = dispatcher.map.latLngToContainerPoint(m.getLatLng());
            if (v && v.status !== 'moving' && p.x > 320 && p.x < size.x - 320 && p.y > 60 && p.y < size.y - 60)
              return {id, x: p.x, y: p.y};
          }
          return null;
        }""")
        assert target, "no standing vehicle in view"
        page.mouse.click(target["x"], target["y"])
        popup = page.locator(f".vehicle-popup[data-vehicle='{target['id']}']")
        popup.wait_for(timeout=10000)
        time.sleep(0.4)   # the popup's fade-in, for the screenshot
        text = popup.inner_text()
        assert "driver" in text and "status" in text, text
        assert "phone" not in text   # the viewer token has no view_driver_contacts
        shot(page, "map-details.png")
        # the tiles come from --tile-url (OpenStreetMap's by default; unreachable here) ...
        assert "tile.openstreetmap.org" in page.evaluate("document.querySelector('.leaflet-tile-pane img').src")
        # ... so the scale and the graticule carry the map
        assert page.locator(".leaflet-control-scale-line").inner_text().strip()
        assert page.evaluate("dispatcher.graticule.getLayers().length") >= 4

        # panning far away: the subscription follows (vehicles leave with r: viewport)
        page.evaluate("void dispatcher.map.panTo([10, 10], {animate: false})")
        wait(page, "realtimeClient.vehicles.size === 0 && dispatcher.markers.size === 0", what="the pan")
        page.evaluate("void dispatcher.map.setView([55.7558, 37.6173], 11, {animate: false})")
        wait(page, "realtimeClient.vehicles.size > 100", what="back over the fleet")

        # a mouse drag pans too, and the visible set changes
        ids = set(page.evaluate("[...realtimeClient.vehicles.keys()]"))
        page.mouse.move(700, 400)
        page.mouse.down()
        page.mouse.move(1100, 400, steps=8)
        page.mouse.up()
        wait(page, f"[...realtimeClient.vehicles.keys()].sort().join() !== {json.dumps(','.join(sorted(ids)))}",
             what="the drag's new viewport")

        # zoomed out: server-side clusters drawn as counts
        page.evaluate("void dispatcher.map.setView([55.7558, 37.6173], 8, {animate: false})")
        wait(page, "realtimeClient.clusters !== null && dispatcher.clusters.getLayers().length > 0", what="clusters")
        assert page.evaluate("realtimeClient.vehicles.size") == 0
        total = page.evaluate("realtimeClient.clusters.cells.reduce((n, c) => n + c[2], 0)")
        assert total == 300
        assert "clustered" in page.locator("#count").inner_text()
        shot(page, "map-clusters.png")

        # zoomed in over an empty area: the cells go (an empty `clusters`), no vehicle comes
        page.evaluate("void dispatcher.map.setView([10, 10], 14, {animate: false})")
        wait(page, "realtimeClient.clusters === null && dispatcher.clusters.getLayers().length === 0",
             what="the cells cleared")
        assert page.evaluate("realtimeClient.vehicles.size") == 0

        # the development token function: a fresh token from the server
        fresh = page.evaluate("fetch('/dev/token').then(r => r.json())")
        assert fresh["token"].count(".") == 2
        assert not [m for m in page.console if m.startswith("pageerror")], page.console
        # under a name that is not loopback (DNS rebinding) no token is handed out
        import urllib.error
        import urllib.request
        req = urllib.request.Request(s.url + "/", headers={"Host": f"rebound.example:{s.port}"})
        html = urllib.request.urlopen(req, timeout=5).read()
        assert b'"token": ""' in html and b'"dev": false' in html
        req = urllib.request.Request(s.url + "/dev/token", headers={"Host": f"rebound.example:{s.port}"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=5)
        assert e.value.code == 404
    finally:
        s.stop()


def test_map_filters_and_alerts_panel(page, uid):
    """With a configured key (no development mode) and `?token=`: the status
    and type filters go to the server, and the alerts panel lists events as
    they come."""
    s = Server("--simulate", "300", "--tile-url", "none")
    try:
        page.goto(s.url + "/?token=" + token(sub=uid + "u"))
        page.wait_for_function("window.dispatcher !== undefined")
        assert page.evaluate("document.querySelectorAll('.leaflet-tile-pane img').length") == 0   # no tile layer
        wait(page, "window.dispatcher && dispatcher.markers.size > 100", timeout=20)
        for status in ("moving", "idle", "offline"):
            page.locator(f"#filter-status input[value={status}]").uncheck()
        wait(page, "realtimeClient.vehicles.size > 0 && [...realtimeClient.vehicles.values()]"
                   ".every(v => v.status === 'stopped')", what="only stopped vehicles")
        page.locator("#filter-status input[value=stopped]").click()   # the last one stays checked
        assert page.locator("#filter-status input[value=stopped]").is_checked()
        for status in ("moving", "idle", "offline"):
            page.locator(f"#filter-status input[value={status}]").check()
        page.locator("#filter-type input[value=truck]").uncheck()
        wait(page, "[...realtimeClient.vehicles.values()].some(v => v.status === 'moving') &&"
                   "[...realtimeClient.vehicles.values()].every(v => v.vehicle_type !== 'truck')",
             what="every status, no trucks")
        # an alert on a vehicle in view is listed as it comes
        vid = uid + "alarm"
        assert ingest(s, [update(vid, lat=55.7558, lon=37.6173, status="moving", speed=40, vehicle_type="van",
                                 alerts=["panic_button"])])[0] == 200
        wait(page, f"document.querySelector('#alert-list li[data-vehicle={vid}]') !== null", what="the alert listed")
        item = page.locator(f"#alert-list li[data-vehicle={vid}]").inner_text()
        assert vid in item and "panic_button" in item, item
        assert page.evaluate(f"realtimeClient.vehicles.get('{vid}').alerts") == ["panic_button"]
        # a dispatcher with view_driver_contacts sees the phone in the details
        page.goto(s.url + "/?token=" + token(sub=uid + "boss", permissions=["view_all_vehicles", "view_driver_contacts"])
                  + "&lat=55.7558&lon=37.6173&zoom=16")
        ingest(s, [update(uid + "d", lat=55.7558, lon=37.6173, status="stopped", speed=0,
                          driver={"name": "Petrov P.", "phone": "+79160000000"})])
        wait(page, f"window.dispatcher && dispatcher.markers.has('{uid}d')", what="the driver's vehicle")
        p = page.evaluate(f"(() => {{ const q = dispatcher.map.latLngToContainerPoint(dispatcher.markers.get('{uid}d').getLatLng());"
                          " return [q.x, q.y]; })()")
        page.mouse.click(p[0], p[1])
        popup = page.locator(f".vehicle-popup[data-vehicle='{uid}d']")
        popup.wait_for(timeout=10000)
        assert "+79160000000" in popup.inner_text()
        shot(page, "map-filters.png")
    finally:
        s.stop()
