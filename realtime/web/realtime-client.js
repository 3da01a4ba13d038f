// realtime-client.js — the browser client library of PROTOCOL §8.
//
// An ES module with no build step. It speaks WebSocket, then SSE, then long
// polling (PROTOCOL §3, §4), keeps one session across all of them, resumes
// with the last event on every reconnect, delivers each event once, and keeps
// `vehicles` equal to what the server has said. docs/client.md is the guide.
//
// Why it is built the way it is (what users of other libraries report):
// - liveness is judged by bytes received, and a timer that fires late (a
//   laptop that slept, a throttled background tab) re-arms the deadline and
//   sends a probe instead of declaring the server dead;
// - `online` and a tab becoming visible reconnect at once, not after backoff;
// - SSE is read with fetch(), not EventSource: the token goes in a header, the
//   keep-alive comments count as liveness, HTTP status codes are visible, and
//   EventSource's own zero-delay reconnect loop never runs (the backoff here
//   does). A browser without EventSource counts as one without SSE.

import { decode as decodeMsgpack } from "./vendor/msgpack/index.mjs";

const DEFAULT_TRANSPORTS = ["websocket", "sse", "poll"];
const SILENT_MS = 5000;          // a transport silent this long while connecting has failed
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 20000;
const PROBE_AFTER_MS = 15000;    // idle this long: send a probe (WebSocket `ping`, HTTP health)
const PROBE_WAIT_MS = 5000;      // a probe unanswered this long: the link is dead
const REMEMBER_MS = 30 * 60 * 1000;
const POLL_TIMEOUT_S = 25;
const SEEN_EIDS = 10000;         // events remembered for once-only delivery
const LONG = { s: "speed", c: "course", st: "status", vt: "vehicle_type", ts: "ts", al: "alerts",
  dr: "driver", as: "assignment" };

/**
 * @typedef {{north: number, south: number, east: number, west: number}} Bounds
 * @typedef {{id: (string|number), lat: number, lon: number, speed: number, course: number,
 *   status: string, vehicle_type: string, ts: number, alerts: string[], driver: ?Object,
 *   assignment: ?Object}} Vehicle
 * @typedef {{vehicles?: Array<string|number>, groups?: string[],
 *   geographic?: {bounds: Bounds, zoom: number},
 *   filters?: {status?: string[], vehicle_types?: string[], show_alerts?: boolean}}} Subscription
 * @typedef {"websocket"|"sse"|"poll"} TransportName
 * @typedef {"connecting"|"connected"|"reconnecting"|"closed"} State
 * @typedef {{url?: string, token: (string|function(): (string|Promise<string>)),
 *   transports?: TransportName[], format?: ("json"|"msgpack"), subscription?: Subscription,
 *   remember?: boolean}} Options
 */

/** An error the client reports: `code` is the close code or HTTP status, `fatal` whether it stopped. */
export class RealtimeError extends Error {
  constructor(message, code, fatal = false) {
    super(message);
    this.name = "RealtimeError";
    this.code = code;
    this.fatal = fatal;
  }
}

// ---------------------------------------------------------------------------
// Transports. Each one opens, delivers server messages to client._message(),
// reports its end once through client._ended(transport, code, reason), and
// carries the client's commands its own way.

class WebSocketTransport {
  static available() { return typeof globalThis.WebSocket === "function"; }

  constructor(client, token) {
    this.client = client;
    this.name = "websocket";
    this.token = token;
    this.ws = null;
    this.done = false;
  }

  open() {
    const c = this.client;
    const q = new URLSearchParams({ format: c.format });
    if (c.session) q.set("resume", c.session);
    if (c.session && c.lastEvent) q.set("last_event", c.lastEvent);
    const ws = new WebSocket(c._wsBase() + "/ws?" + q.toString());
    ws.binaryType = "arraybuffer";
    this.ws = ws;
    // the token goes in the first message, not the URL (PROTOCOL §2): URLs end up in logs
    ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: this.token }));
    ws.onmessage = (e) => {
      c._alive();
      let m;
      try {
        m = typeof e.data === "string" ? JSON.parse(e.data) : decodeMsgpack(new Uint8Array(e.data));
      } catch (err) {
        c._emit("error", new RealtimeError("undecodable message: " + err.message, 0));
        return;
      }
      c._message(this, m);
    };
    ws.onclose = (e) => this._end(e.code || 1006, e.reason || "connection closed");
    ws.onerror = () => {};   // onclose follows with the code
  }

  _end(code, reason) {
    if (this.done) return;
    this.done = true;
    this.client._ended(this, code, reason);
  }

  send(msg) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(msg));
  }

  subscribe(msg) { this.send(msg); }
  viewport(bounds, zoom) { this.send({ type: "viewport", bounds, zoom }); }
  refresh(token) { this.token = token; this.send({ type: "refresh", token }); }
  probe() { this.client._pingSent = performance.now(); this.send({ type: "ping", id: "rt-ping" }); }

  close() {
    this.done = true;
    if (this.ws) {
      this.ws.onclose = this.ws.onmessage = this.ws.onopen = null;
      try { this.ws.close(1000); } catch (e) { /* already closed */ }
    }
  }
}

/** What the HTTP transports share: the session API (PROTOCOL §4) with the token in a header. */
class HttpTransport {
  constructor(client, token) {
    this.client = client;
    this.token = token;
    this.done = false;
    this.abort = new AbortController();
  }

  _headers(json) {
    const h = { Authorization: "Bearer " + this.token };
    if (json) h["Content-Type"] = "application/json";
    return h;
  }

  /** The session to read: the client's, or a new one made with its subscription. */
  async _session() {
    const c = this.client;
    if (c.session) return c.session;
    // no subscription yet: a session that sees nothing until one comes (not
    // `{}`, which is every vehicle the token allows: a snapshot for nothing)
    const none = c._subscription ? "" : "?subscription=none";
    const r = await fetch(c._httpBase() + "/api/realtime/session" + none, {
      method: "POST", headers: this._headers(true), signal: this.abort.signal,
      body: JSON.stringify(c._subscribeMessage()),
    });
    if (r.status !== 201) throw await httpError(r);
    c.session = (await r.json()).session;
    if (c._subscription) {
      c._subDirty = false;   // the session was made with it
      this.madeSession = true;
    }
    return c.session;
  }

  /**
   * PUT the client's subscription: the stream or the next poll carries
   * `subscribed`. One PUT at a time, the newest last: two in flight could
   * land in either order and leave an old viewport in force.
   */
  async subscribe(msg) {
    const c = this.client;
    if (!c.session) return;
    this.next = msg;
    if (this.putting) return;
    this.putting = true;
    try {
      while (this.next && !this.done) {
        const body = this.next;
        this.next = null;
        const r = await fetch(c._httpBase() + "/api/realtime/session/" + encodeURIComponent(c.session), {
          method: "PUT", headers: this._headers(true), body: JSON.stringify(body), signal: this.abort.signal,
        });
        if (r.status === 401 || r.status === 403 || r.status === 404 || r.status === 410) {
          const e = await httpError(r);
          c._subDirty = true;
          this._end(e.code, e.message);
        } else if (!r.ok) {
          c._emit("error", await httpError(r));
          c._subDirty = true;   // sent again after the next (re)connect
        }
      }
    } catch (e) {
      if (!this.done) c._subDirty = true;
    } finally {
      this.putting = false;
    }
  }

  viewport(bounds, zoom) {
    const c = this.client;
    this.subscribe(c._subscribeMessage());
  }

  /** A new token renews the session's with the next request (PROTOCOL §4): make one now. */
  refresh(token) {
    this.token = token;
    this.subscribe(this.client._subscribeMessage());
  }

  /** Liveness and round-trip time: the server's cheapest answer. */
  async probe() {
    const c = this.client;
    const t0 = performance.now();
    c._pingSent = t0;
    try {
      const r = await fetch(c._httpBase() + "/health/live", { cache: "no-store", signal: this.abort.signal });
      if (r.ok) {
        c.rtt = Math.round(performance.now() - t0);
        c._alive();
        c._emit("rtt", c.rtt);
      }
    } catch (e) { /* the deadline decides */ }
  }

  _end(code, reason) {
    if (this.done) return;
    this.done = true;
    this.abort.abort();
    this.client._ended(this, code, reason);
  }

  close() {
    this.done = true;
    this.abort.abort();
  }
}

class SseTransport extends HttpTransport {
  static available() {
    return typeof globalThis.EventSource === "function" && typeof globalThis.fetch === "function" &&
      typeof globalThis.ReadableStream === "function" && typeof globalThis.TextDecoder === "function";
  }

  constructor(client, token) {
    super(client, token);
    this.name = "sse";
  }

  async open() {
    const c = this.client;
    try {
      const sid = await this._session();
      const q = new URLSearchParams({ session: sid });
      if (c.lastEvent) q.set("last_event", c.lastEvent);
      if (c._sseId !== null && c._sseSession === sid) q.set("last_event_id", String(c._sseId));
      const r = await fetch(c._httpBase() + "/api/realtime/stream?" + q.toString(), {
        headers: { ...this._headers(false), Accept: "text/event-stream" },
        cache: "no-store", signal: this.abort.signal,
      });
      if (!r.ok) throw await httpError(r);
      await this._read(r.body.getReader(), sid);
      this._end(1006, "the stream ended");
    } catch (e) {
      this._end(e.code || 1006, e.message || "stream failed");
    }
  }

  async _read(reader, sid) {
    const c = this.client;
    const text = new TextDecoder();
    let buf = "";
    let event = "message", data = [], id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.done) return;
      c._alive();   // keep-alive comments count: any byte is a sign of life
      buf += text.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === "\r" && buf[nl + 1] === "\n" ? 2 : 1));
        if (line === "") {   // dispatch
          if (data.length) {
            let m = null;
            try { m = JSON.parse(data.join("\n")); } catch (e) {
              c._emit("error", new RealtimeError("undecodable SSE data", 0));
            }
            if (id !== null && event === "batch") { c._sseId = id; c._sseSession = sid; }
            if (m !== null) {
              if (event === "error" && m.type === "error" && m.close_code) {
                this._end(m.close_code, m.message || "closed by the server");
                return;
              }
              c._message(this, m);
            }
          }
          event = "message"; data = []; id = null;
        } else if (line[0] === ":") {
          // comment: liveness only
        } else {
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          let val = i < 0 ? "" : line.slice(i + 1);
          if (val[0] === " ") val = val.slice(1);
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
          else if (field === "id") id = val;
        }
      }
    }
  }
}

class PollTransport extends HttpTransport {
  static available() { return typeof globalThis.fetch === "function"; }

  constructor(client, token) {
    super(client, token);
    this.name = "poll";
    this.wait = null;   // the AbortController of the poll in flight
  }

  async open() {
    const c = this.client;
    let first = true;
    try {
      const sid = await this._session();
      if (c._pollSession !== sid) { c._pollSession = sid; c._cursor = 0; }
      while (!this.done) {
        // the first poll answers at once: it is how this transport shows it works
        const q = new URLSearchParams({ session: sid, cursor: String(c._cursor),
          timeout: String(first ? 0 : POLL_TIMEOUT_S) });
        if (first && c.lastEvent) q.set("last_event", c.lastEvent);
        this.wait = new AbortController();
        const stop = () => this.wait.abort();
        this.abort.signal.addEventListener("abort", stop);
        const timer = setTimeout(stop, (POLL_TIMEOUT_S + 10) * 1000);
        let r;
        try {
          r = await fetch(c._httpBase() + "/api/realtime/poll?" + q.toString(), {
            headers: this._headers(false), cache: "no-store", signal: this.wait.signal,
          });
          if (!r.ok) throw await httpError(r);
          const body = await r.json();
          c._alive();
          if (this.done) return;
          c._cursor = body.cursor;
          for (const m of body.messages || []) {
            c._message(this, m);
            if (this.done) return;
          }
          if (first) c._pollOpened(this);
        } catch (e) {
          if (e.name === "AbortError" && this.refreshing && !this.done) {
            this.refreshing = false;   // aborted to carry a new token: poll again
            continue;
          }
          throw e;
        } finally {
          clearTimeout(timer);
          this.abort.signal.removeEventListener("abort", stop);
        }
        first = false;
      }
    } catch (e) {
      this._end(e.code || 1006, e.message || "poll failed");
    }
  }

  refresh(token) {
    // the next poll renews the session's token (PROTOCOL §4): start it now
    this.token = token;
    if (this.wait) { this.refreshing = true; this.wait.abort(); }
  }
}

const TRANSPORTS = { websocket: WebSocketTransport, sse: SseTransport, poll: PollTransport };

async function httpError(r) {
  let message = r.statusText || "HTTP " + r.status;
  try { const b = await r.json(); message = b.message || b.error || message; } catch (e) { /* no JSON */ }
  const code = { 401: 4001, 403: 4003, 404: 4404, 410: 4410 }[r.status] || r.status;
  return new RealtimeError(message, code);
}

function eidKey(eid) {
  const [ms, n] = String(eid).split("-");
  return [Number(ms) || 0, Number(n) || 0];
}

function eidAfter(a, b) {
  const x = eidKey(a), y = eidKey(b);
  return x[0] > y[0] || (x[0] === y[0] && x[1] > y[1]);
}

// ---------------------------------------------------------------------------

/**
 * A connection to a realtime server that falls back across transports,
 * reconnects and resumes on its own, and keeps `vehicles` current.
 */
export class RealtimeClient {
  /** @param {Options} options */
  constructor(options) {
    if (!options || !options.token) throw new TypeError("RealtimeClient needs a token (a string or a function)");
    const base = options.url || (typeof location !== "undefined" ? location.origin : "");
    /** @type {string} the server's origin */
    this.url = base.replace(/\/+$/, "");
    /** @type {"json"|"msgpack"} */
    this.format = options.format === "msgpack" ? "msgpack" : "json";
    /** @type {TransportName[]} */
    this.transports = (options.transports || DEFAULT_TRANSPORTS).filter((t) => t in TRANSPORTS);
    if (!this.transports.length) throw new TypeError("no known transport in " + JSON.stringify(options.transports));
    this._tokenSource = options.token;
    this._token = typeof options.token === "string" ? options.token : null;
    this._remember = options.remember !== false;
    /** @type {Map<string|number, Vehicle>} what the server has said is visible */
    this.vehicles = new Map();
    /** @type {?TransportName} */
    this.transport = null;
    /** @type {boolean} the last welcome's `recovered` */
    this.recovered = false;
    /** @type {boolean} the last welcome's `resumed`: the session was found and goes on */
    this.resumed = false;
    /** @type {State} */
    this.state = "closed";
    /** @type {?string} the session resumed on every reconnect */
    this.session = null;
    /** @type {?string} the eid of the newest event received */
    this.lastEvent = null;
    /** @type {?number} round-trip time of the last probe, ms */
    this.rtt = null;
    /** @type {?Object} the last `clusters` message while the view is clustered */
    this.clusters = null;
    this._subscription = options.subscription ? { ...options.subscription } : null;
    this._subDirty = !!this._subscription;
    this._listeners = new Map();
    this._seen = new Set();
    this._seenOrder = [];
    this._t = null;          // the transport in use
    this._attempt = 0;       // reconnect attempts since the last success
    this._timer = null;      // the pending reconnect
    this._afterMs = null;    // the server's `reconnect.after_ms`
    this._heartbeatMs = 30000;
    this._lastRx = 0;
    this._lastTick = 0;
    this._pingSent = null;
    this._pending = new Map();   // request id → {resolve, reject}
    this._subWaiters = [];       // subscribe() promises waiting for `subscribed`
    this._reqId = 0;
    this._sseId = null; this._sseSession = null;
    this._cursor = 0; this._pollSession = null;
    this._needFreshToken = false;
    this._onOnline = () => this._wake("online");
    this._onVisible = () => { if (document.visibilityState === "visible") this._wake("visible"); };
  }

  // -- events ---------------------------------------------------------------

  /**
   * Listens to "state", "vehicle", "leave", "event", "clusters", "error" (and
   * "welcome", "rtt", "message" for every server message).
   * @param {string} type @param {Function} fn @returns {this}
   */
  on(type, fn) {
    if (!this._listeners.has(type)) this._listeners.set(type, new Set());
    this._listeners.get(type).add(fn);
    return this;
  }

  /** @param {string} type @param {Function} fn @returns {this} */
  off(type, fn) {
    const s = this._listeners.get(type);
    if (s) s.delete(fn);
    return this;
  }

  _emit(type, ...args) {
    const s = this._listeners.get(type);
    if (!s) return;
    for (const fn of [...s]) {
      try { fn(...args); } catch (e) { setTimeout(() => { throw e; }); }   // a listener's bug is the page's
    }
  }

  _setState(state) {
    if (this.state === state) return;
    this.state = state;
    this._emit("state", state);
  }

  // -- public API -----------------------------------------------------------

  /**
   * Connects over the first transport that works. Resolves on `welcome`;
   * rejects when every transport failed, at once on a refused token.
   * @returns {Promise<Object>} the welcome message
   */
  connect() {
    if (this._connecting) return this._connecting;
    if (this.state === "connected") return Promise.resolve(this._welcome);
    this._closedByUser = false;
    this._setState("connecting");
    this._listen(true);
    this._connecting = new Promise((resolve, reject) => {
      this._connected = resolve;
      this._connectFailed = reject;
    });
    this._round(false);
    return this._connecting;
  }

  /**
   * Replaces the subscription (PROTOCOL §3 `subscribe`). Resolves on `subscribed`.
   * Called before connect(), it is the one the connection starts with.
   * @param {Subscription} spec @returns {Promise<Object>} the `subscribed` message
   */
  subscribe(spec = {}) {
    const { filters, ...subscriptions } = spec;
    this._subscription = { ...subscriptions };
    if (filters) this._subscription.filters = filters;
    this._subDirty = true;
    const p = new Promise((resolve, reject) => this._subWaiters.push({ resolve, reject }));
    if (this.state === "connected" && this._t) this._sendSubscription();
    return p;
  }

  /** Moves the viewport (PROTOCOL §3 `viewport`). @param {Bounds} bounds @param {number} zoom */
  viewport(bounds, zoom) {
    const sub = this._subscription || (this._subscription = {});
    sub.geographic = { bounds: { ...bounds }, zoom };
    if (this.state !== "connected" || !this._t) this._subDirty = true;
    else if (this._subDirty) this._sendSubscription();
    else this._t.viewport(bounds, zoom);
  }

  /** The long form of a vehicle (PROTOCOL §3.2). @param {string|number} id @returns {Promise<Object>} */
  async get(id) {
    if (this._t && this._t.name === "websocket" && this.state === "connected") {
      const rid = "rt-" + (++this._reqId);
      return new Promise((resolve, reject) => {
        const timer = setTimeout(() => {
          this._pending.delete(rid);
          reject(new RealtimeError("no answer to get", 0));
        }, 10000);
        this._pending.set(rid, { resolve, reject, timer });
        this._t.send({ type: "get", vehicle: id, id: rid });
      });
    }
    const token = await this._currentToken();
    const r = await fetch(this._httpBase() + "/api/vehicles/" + encodeURIComponent(id), {
      headers: { Authorization: "Bearer " + token }, cache: "no-store",
    });
    if (!r.ok) throw await httpError(r);
    return r.json();
  }

  /** Ends the connection for good (an HTTP session is deleted). */
  close() {
    this._closedByUser = true;
    clearTimeout(this._timer);
    this._listen(false);
    const t = this._t;
    this._t = null;
    if (t) {
      t.close();
      if (t.name !== "websocket" && this.session && this._token) {
        fetch(this._httpBase() + "/api/realtime/session/" + encodeURIComponent(this.session), {
          method: "DELETE", headers: { Authorization: "Bearer " + this._token }, keepalive: true,
        }).catch(() => {});
      }
    }
    this._failConnect(new RealtimeError("closed", 1000, true));
    for (const w of this._subWaiters.splice(0)) w.reject(new RealtimeError("closed", 1000, true));
    this._setState("closed");
  }

  // -- connecting -----------------------------------------------------------

  _httpBase() { return this.url; }
  _wsBase() { return this.url.replace(/^http/, "ws"); }

  _storageKey() { return "realtime.transport:" + this.url; }

  _remembered() {
    if (!this._remember) return null;
    try {
      const r = JSON.parse(localStorage.getItem(this._storageKey()) || "null");
      if (r && r.expires > Date.now() && this.transports.includes(r.transport)) return r.transport;
    } catch (e) { /* no storage */ }
    return null;
  }

  _rememberTransport(name) {
    if (!this._remember) return;
    try {
      localStorage.setItem(this._storageKey(), JSON.stringify({ transport: name, expires: Date.now() + REMEMBER_MS }));
    } catch (e) { /* no storage: nothing remembered */ }
  }

  _forgetTransport() {
    try { localStorage.removeItem(this._storageKey()); } catch (e) { /* no storage */ }
  }

  /** The order to try: the one that worked last first, then the configured order. */
  _order() {
    const first = (this._t && this._t.name) || this._lastWorked || this._remembered();
    const order = first ? [first, ...this.transports.filter((t) => t !== first)] : [...this.transports];
    return order.filter((t) => TRANSPORTS[t].available());
  }

  async _currentToken() {
    if (this._token !== null && !this._needFreshToken) return this._token;
    if (typeof this._tokenSource !== "function") return this._token;
    this._token = String(await this._tokenSource());
    this._needFreshToken = false;
    return this._token;
  }

  /** One round over the transports; on failure, the next after backoff. */
  async _round(reconnecting) {
    this._timer = null;
    const order = this._order();
    let last = new RealtimeError("no transport available in this browser: " + this.transports.join(", "), 0);
    for (const name of order) {
      if (this._closedByUser) return;
      let token;
      try {
        token = await this._currentToken();
      } catch (e) {
        last = new RealtimeError("the token function failed: " + (e && e.message), 0);
        break;
      }
      const result = await this._try(name, token);
      if (this._closedByUser) return;
      if (result === true) return;
      last = result;
      if (result.code === 4001 || result.code === 4003) break;   // another transport would not help
      if (result.code === 4404 || result.code === 4410) {
        this._forgetSession();   // ended: a new one, on this transport again
        const again = await this._try(name, token);
        if (again === true) return;
        last = again;
      }
    }
    this._failed(last, reconnecting);
  }

  /** Opens one transport: true on `welcome`, else the error it ended with. */
  _try(name, token) {
    return new Promise((resolve) => {
      const t = new TRANSPORTS[name](this, token);
      this._t = t;
      this._opening = { t, resolve };
      this._welcome = null;
      this._lastRx = performance.now();
      t._silence = setTimeout(() => {
        if (this._opening && this._opening.t === t) {
          this._opening = null;
          t.close();
          resolve(new RealtimeError(name + " was silent for " + SILENT_MS / 1000 + " s", 1006));
        }
      }, SILENT_MS);
      t.open();
    });
  }

  /** The open transport answered (welcome, or a poll that carries on a session). */
  _opened(t) {
    const o = this._opening;
    if (!o || o.t !== t) return;
    this._opening = null;
    clearTimeout(t._silence);
    this._attempt = 0;
    this._afterMs = null;
    this._lastWorked = t.name;
    this._rememberTransport(t.name);
    this.transport = t.name;
    this._setState("connected");
    this._startLiveness();
    if (this._subDirty && this._subscription) this._sendSubscription();
    if (this._connected) {
      const done = this._connected;
      this._connected = this._connectFailed = null;
      this._connecting = null;
      done(this._welcome);
    }
    o.resolve(true);
  }

  _pollOpened(t) { this._opened(t); }

  _failConnect(err) {
    if (this._connectFailed) {
      const fail = this._connectFailed;
      this._connected = this._connectFailed = null;
      this._connecting = null;
      fail(err);
    }
  }

  /** A round failed: connect() rejects; a reconnect waits and tries again. */
  _failed(err, reconnecting) {
    this._t = null;
    this._stopLiveness();
    if (err.code === 4001 && typeof this._tokenSource === "function" && reconnecting) {
      this._needFreshToken = true;   // the next round asks the token function first
    }
    const fatal = err.code === 4003 || (err.code === 4001 && (typeof this._tokenSource !== "function" || !reconnecting));
    if (!reconnecting || fatal) {
      err.fatal = true;
      this._listen(false);
      this._failConnect(err);
      this._emit("error", err);
      this._setState("closed");
      return;
    }
    this._emit("error", err);
    this._schedule();
  }

  /** Full-jitter exponential backoff, or the server's `reconnect.after_ms`. */
  _schedule() {
    clearTimeout(this._timer);
    let delay;
    if (this._afterMs !== null) {
      delay = this._afterMs;
      this._afterMs = null;
    } else {
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** this._attempt);
      delay = BACKOFF_MIN_MS + Math.random() * (cap - BACKOFF_MIN_MS);
    }
    this._attempt++;
    this._setState("reconnecting");
    this._nextAt = Date.now() + delay;
    this._timer = setTimeout(() => this._round(true), delay);
  }

  /** A transport ended: while opening, the round goes on; once open, reconnect. */
  _ended(t, code, reason) {
    clearTimeout(t._silence);
    const o = this._opening;
    if (o && o.t === t) {
      this._opening = null;
      o.resolve(new RealtimeError(reason || "closed", code));
      return;
    }
    if (t !== this._t || this._closedByUser) return;
    this._t = null;
    this._stopLiveness();
    if (code === 4404 || code === 4410) this._forgetSession();
    if (code === 4001) {
      if (typeof this._tokenSource !== "function") {
        const err = new RealtimeError("the token was refused or expired (4001)", 4001, true);
        this._listen(false);
        this._emit("error", err);
        this._setState("closed");
        return;
      }
      this._needFreshToken = true;   // fetched before reconnecting
    }
    if (code === 4003) {
      const err = new RealtimeError(reason || "forbidden (4003)", 4003, true);
      this._listen(false);
      this._emit("error", err);
      this._setState("closed");
      return;
    }
    if (code === 1013 || code === 4009) this._attempt = Math.max(this._attempt, 1);
    this._schedule();
  }

  _forgetSession() {
    this.session = null;
    this._sseId = null;
    this._pollSession = null;
    this._cursor = 0;
    this._subDirty = !!this._subscription;
  }

  /** Reconnect now (network back, tab visible after a sleep), or probe an open link. */
  _wake(why) {
    if (this._closedByUser || this.state === "closed" || this.state === "connecting") return;
    if (this.state === "reconnecting" && this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
      this._attempt = 0;
      this._round(true);
    } else if (this.state === "connected") {
      this._lastRx = performance.now();
      this._probe();
    }
  }

  _listen(on) {
    if (typeof window === "undefined") return;
    const f = on ? "addEventListener" : "removeEventListener";
    window[f]("online", this._onOnline);
    document[f]("visibilitychange", this._onVisible);
  }

  // -- liveness -------------------------------------------------------------

  _alive() { this._lastRx = performance.now(); }

  _startLiveness() {
    this._stopLiveness();
    this._lastRx = performance.now();
    this._lastTick = Date.now();
    this._probeAt = null;
    this._live = setInterval(() => this._checkLiveness(), 1000);
    this._probe();   // a first round-trip time for the badge
  }

  _stopLiveness() {
    clearInterval(this._live);
    this._live = null;
  }

  _probe() {
    if (!this._t) return;
    this._probeAt = performance.now();
    this._t.probe();
  }

  _checkLiveness() {
    const now = performance.now();
    const wall = Date.now();
    const late = wall - this._lastTick > SILENT_MS;
    this._lastTick = wall;
    if (late) {
      // the timer could not run (sleep, a throttled background tab): the
      // silence is ours, not the server's; re-arm and ask again
      this._lastRx = now;
      this._probe();
      return;
    }
    if (this._probeAt !== null && this._lastRx >= this._probeAt) this._probeAt = null;
    const idle = now - this._lastRx;
    if (this._probeAt !== null && now - this._probeAt > PROBE_WAIT_MS && idle > PROBE_WAIT_MS) {
      const t = this._t;
      if (t) {
        t.close();
        this._ended(t, 1006, "no answer for " + Math.round(idle / 1000) + " s");
      }
      return;
    }
    const every = this._t && this._t.name === "sse" ? Math.min(this._heartbeatMs, 15000) + PROBE_WAIT_MS
      : PROBE_AFTER_MS;
    if (this._probeAt === null && idle > every) this._probe();
  }

  // -- messages -------------------------------------------------------------

  _subscribeMessage() {
    const s = this._subscription || {};
    const msg = { type: "subscribe", subscriptions: {} };
    if (s.vehicles) msg.subscriptions.vehicles = s.vehicles;
    if (s.groups) msg.subscriptions.groups = s.groups;
    if (s.geographic) msg.subscriptions.geographic = s.geographic;
    if (s.filters) msg.filters = s.filters;
    return msg;
  }

  _sendSubscription() {
    this._subDirty = false;
    const msg = this._subscribeMessage();
    msg.id = "rt-sub-" + (++this._reqId);
    this._t.subscribe(msg);
  }

  /** Every server message of every transport comes through here. */
  _message(t, m) {
    if (t !== this._t || !m || typeof m !== "object") return;
    this._emit("message", m);
    switch (m.type) {
      case "batch":
        this._batch(m.messages || []);
        break;
      case "welcome":
        this._onWelcome(t, m);
        break;
      case "subscribed":
        for (const w of this._subWaiters.splice(0)) w.resolve(m);
        break;
      case "pong":
        if (this._pingSent !== null) {
          this.rtt = Math.round(performance.now() - this._pingSent);
          this._pingSent = null;
          this._emit("rtt", this.rtt);
        }
        break;
      case "token_expiring":
        this._refreshToken(t);
        break;
      case "reconnect":
        if (typeof m.after_ms === "number" && m.after_ms >= 0) this._afterMs = Math.min(m.after_ms, 600000);
        break;
      case "error":
        this._onError(m);
        break;
      case "vehicle_update":
      case "refreshed":
      case "unsubscribed":
        break;
      default:
        break;
    }
    if (m.id !== undefined && this._pending.has(m.id)) {
      const p = this._pending.get(m.id);
      this._pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.type === "error") p.reject(new RealtimeError(m.message || m.code, m.code));
      else p.resolve(m);
    }
  }

  _onWelcome(t, m) {
    this._welcome = m;
    this.recovered = !!m.recovered;
    this.resumed = !!m.resumed;
    if (typeof m.heartbeat_s === "number") this._heartbeatMs = m.heartbeat_s * 1000;
    if (m.session && m.session !== this.session) {
      this.session = m.session;
    }
    // a client that has had no event yet resumes from where the log stood when it joined
    if (!this.lastEvent && m.last_event) this.lastEvent = m.last_event;
    if (!m.continued) this._reset();   // a new copy: the full state follows
    // a new session has no subscription unless it was made with ours
    if (!m.resumed && this._subscription && !t.madeSession) this._subDirty = true;
    this._emit("welcome", m);
    this._opened(t);
  }

  /** The server sends the full state after a welcome: what was shown before is gone. */
  _reset() {
    this.clusters = null;
    if (!this.vehicles.size) return;
    const ids = [...this.vehicles.keys()];
    this.vehicles.clear();
    for (const id of ids) this._emit("leave", id, "reset");
  }

  _onError(m) {
    const err = new RealtimeError(m.message || m.code, m.code);
    if (m.id !== undefined && String(m.id).startsWith("rt-sub-")) {
      for (const w of this._subWaiters.splice(0)) w.reject(err);
    }
    if (m.id === undefined || !this._pending.has(m.id)) this._emit("error", err);
  }

  async _refreshToken(t) {
    if (typeof this._tokenSource !== "function") return;   // it will close with 4001 at exp
    try {
      const old = this._token;
      this._needFreshToken = true;
      const token = await this._currentToken();
      // the same token again would only be warned about again: wait for the
      // 4001 at its exp, which asks the function once more before reconnecting
      if (this._t === t && token !== old) t.refresh(token);
    } catch (e) {
      this._emit("error", new RealtimeError("the token function failed: " + (e && e.message), 0));
    }
  }

  _batch(messages) {
    const vs = this.vehicles;
    for (const m of messages) {
      switch (m.t) {
        case "full": {
          const v = { id: m.v, lat: m.p ? m.p[0] : null, lon: m.p ? m.p[1] : null, speed: m.s, course: m.c,
            status: m.st, vehicle_type: m.vt, ts: m.ts, alerts: m.al || [], driver: m.dr ?? null,
            assignment: m.as ?? null };
          if (this.clusters) this.clusters = null;
          vs.set(m.v, v);
          this._emit("vehicle", v, "full");
          break;
        }
        case "pos": {
          const v = vs.get(m.v);
          if (!v) break;
          if (m.p) { v.lat = m.p[0]; v.lon = m.p[1]; }
          if (m.s !== undefined) v.speed = m.s;
          if (m.c !== undefined) v.course = m.c;
          if (m.ts !== undefined) v.ts = m.ts;
          this._emit("vehicle", v, "pos");
          break;
        }
        case "delta": {
          const v = vs.get(m.v);
          if (!v) break;
          for (const [k, val] of Object.entries(m.ch || {})) {
            if (k === "p") { v.lat = val[0]; v.lon = val[1]; }
            else v[LONG[k] || k] = k === "al" ? (val || []) : val;
          }
          if (m.ts !== undefined) v.ts = m.ts;
          this._emit("vehicle", v, "delta");
          break;
        }
        case "leave":
          if (vs.delete(m.v)) this._emit("leave", m.v, m.r);
          break;
        case "event":
          this._event(m);
          break;
        case "clusters": {
          const ids = [...vs.keys()];
          vs.clear();
          for (const id of ids) this._emit("leave", id, "clusters");
          this.clusters = m;
          this._emit("clusters", m);
          break;
        }
        default:
          break;
      }
    }
  }

  /** Once per eid, and the newest eid is where a resume starts. */
  _event(m) {
    const eid = m.eid;
    if (eid !== undefined && eid !== null) {
      if (this._seen.has(eid)) return;
      this._seen.add(eid);
      this._seenOrder.push(eid);
      if (this._seenOrder.length > SEEN_EIDS) this._seen.delete(this._seenOrder.shift());
      if (!this.lastEvent || eidAfter(eid, this.lastEvent)) this.lastEvent = String(eid);
    }
    this._emit("event", m);
  }
}

export default RealtimeClient;
