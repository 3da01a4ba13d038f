// realtime-client.js — the browser client library of PROTOCOL §8.
//
// An ES module with no build step. It speaks WebSocket, then SSE, then long
// polling (PROTOCOL §3, §4), keeps one session across all of them, resumes
// with the last event on every reconnect, delivers each event once, and keeps
// `vehicles` equal to what the server has said. docs/client.md is the guide.
//
// Why it is built the way it is (what users of other libraries report):
// - liveness is judged by bytes received on the connection itself, and a
//   timer that fires late (a laptop that slept, a throttled background tab)
//   re-arms the deadline instead of declaring the server dead;
// - `online` and a tab becoming visible reconnect at once, not after backoff;
// - SSE is read with fetch(), not EventSource: the token goes in a header, the
//   keep-alive comments count as liveness, HTTP status codes are visible, and
//   EventSource's own zero-delay reconnect loop never runs (the backoff here
//   does). A browser without EventSource counts as one without SSE.
// - every connection attempt belongs to a generation: close(), connect() and
//   each new round start a new one, and whatever an older one opens is closed,
//   so two transports never read one session at once.

import { decode as decodeMsgpack } from "./vendor/msgpack/index.mjs";

const DEFAULT_TRANSPORTS = ["websocket", "sse", "poll"];
const SILENT_MS = 5000;          // a transport silent this long while connecting has failed
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 20000;
const STABLE_MS = 10000;         // a connection up this long resets the backoff
const PROBE_AFTER_MS = 15000;    // WebSocket idle this long: send a `ping`
const PROBE_WAIT_MS = 5000;      // no byte this long after a probe: the link is dead
const RTT_EVERY_MS = 15000;      // HTTP transports: time a health check for the badge
const REMEMBER_MS = 30 * 60 * 1000;
const POLL_TIMEOUT_S = 25;
const SEEN_EIDS = 10000;         // events remembered for once-only delivery
const MAX_MESSAGE_BYTES = 60 * 1024;   // below the server's 64 KiB (PROTOCOL §3.3)
const REFRESH_GAP_MS = 5000;     // token refreshes at most this often
const LONG = { s: "speed", c: "course", st: "status", vt: "vehicle_type", ts: "ts", al: "alerts",
  dr: "driver", as: "assignment" };
const RESUMABLE_EID = /^\d+-\d+$/;   // `…-local` ids of an instance cut off from Redis are not

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
// Transports. Each one opens, hands server messages to client._message(),
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
      if (this.done) return;
      c._alive(this);
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
  viewport(msg) { this.send(msg); }
  refresh(token) { this.token = token; this.send({ type: "refresh", token }); }
  probe() { this.client._pingSent = performance.now(); this.send({ type: "ping", id: "rt-ping" }); }
  wake() { this.client._probe(); }

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
    this.madeSession = false;   // this transport made the session, with the subscription it sent
  }

  /** An AbortController that the transport's end aborts too; release() unlinks it. */
  _linked() {
    const ctl = new AbortController();
    const stop = () => ctl.abort();
    this.abort.signal.addEventListener("abort", stop);
    ctl.release = () => this.abort.signal.removeEventListener("abort", stop);
    return ctl;
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
    let withSubscription = !!c._subscription;
    for (;;) {
      const sent = withSubscription ? c._subscribeMessage() : null;
      // no subscription yet: a session that sees nothing until one comes (not
      // `{}`, which is every vehicle the token allows: a snapshot for nothing)
      const r = await fetch(c._httpBase() + "/api/realtime/session" + (sent ? "" : "?subscription=none"), {
        method: "POST", headers: this._headers(true), signal: this.abort.signal,
        body: JSON.stringify(sent || {}),
      });
      if ((r.status === 400 || r.status === 413) && sent) {
        // the subscription itself is refused: its promise fails, the session is made without it
        c._subscriptionRefused(sent.id, await httpError(r));
        withSubscription = false;
        continue;
      }
      if (r.status !== 201) throw await httpError(r);
      c.session = (await r.json()).session;
      c._unread = c.session;   // read from its first message by whichever transport comes next
      this.madeSession = true;
      if (sent) c._subscriptionApplied(sent.id);
      return c.session;
    }
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
    let body = null;
    try {
      while (this.next && !this.done) {
        body = this.next;
        this.next = null;
        const r = await fetch(c._httpBase() + "/api/realtime/session/" + encodeURIComponent(c.session), {
          method: "PUT", headers: this._headers(true), body: JSON.stringify(body), signal: this.abort.signal,
        });
        if (r.ok) {
          c._subscriptionApplied(body.id);
        } else if (r.status === 400 || r.status === 413) {
          c._subscriptionRefused(body.id, await httpError(r));
        } else if ([401, 403, 404, 410].includes(r.status)) {
          const e = await httpError(r, true);
          this._end(e.code, e.message, e.session);
        } else {
          // 429, 5xx: sent again after a pause, while this transport lasts
          c._emit("error", await httpError(r));
          setTimeout(() => { if (!this.done && !this.next) c._syncSubscription(this); }, 1000 + Math.random() * 1000);
        }
      }
    } catch (e) {
      // the network failed: again after a pause while this transport lasts, else
      // after the next welcome (what the server has not confirmed is sent again)
      if (!this.done) setTimeout(() => { if (!this.done && !this.next) c._syncSubscription(this); }, 1000 + Math.random() * 1000);
    } finally {
      this.putting = false;
    }
  }

  viewport(msg) { this.subscribe(msg); }

  /** Round-trip time for the badge: not a sign of life of the stream itself. */
  async rtt() {
    const c = this.client;
    const t0 = performance.now();
    try {
      const r = await fetch(c._httpBase() + "/health/live", { cache: "no-store", signal: this.abort.signal });
      if (r.ok && !this.done) {
        c.rtt = Math.round(performance.now() - t0);
        c._emit("rtt", c.rtt);
      }
    } catch (e) { /* no figure this time */ }
  }

  _end(code, reason, session = false) {
    if (this.done) return;
    this.done = true;
    this.abort.abort();
    this.client._ended(this, code, reason, session);
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
    this.stream = null;   // the AbortController of the stream being read
  }

  async open() {
    const c = this.client;
    try {
      const sid = await this._session();
      for (;;) {
        const q = new URLSearchParams({ session: sid });
        if (c.lastEvent) q.set("last_event", c.lastEvent);
        const id = c._readerPosition("sse", sid);
        if (id !== null) q.set("last_event_id", String(id));
        this.stream = this._linked();
        try {
          const r = await fetch(c._httpBase() + "/api/realtime/stream?" + q.toString(), {
            headers: { ...this._headers(false), Accept: "text/event-stream" },
            cache: "no-store", signal: this.stream.signal,
          });
          if (!r.ok) throw await httpError(r, true);
          await this._read(r.body.getReader(), sid);
          if (this.done) return;
          throw new RealtimeError("the stream ended", 1006);
        } catch (e) {
          if (this.restarting && !this.done) {
            this.restarting = false;   // a new stream on the same session: it goes on without a gap
            continue;
          }
          throw e;
        } finally {
          this.stream.release();
        }
      }
    } catch (e) {
      this._end(e.code || 1006, e.message || "stream failed", !!e.session);
    }
  }

  /** A new stream from the last batch read (network changed, or a new token). */
  restart() {
    if (this.done || !this.stream) return;
    this.restarting = true;
    this.stream.abort();
  }

  async _read(reader, sid) {
    const c = this.client;
    const text = new TextDecoder();
    let buf = "";
    let event = "message", data = [], id = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done || this.done) return;
      c._alive(this);   // keep-alive comments count: any byte is a sign of life
      buf += text.decode(value, { stream: true });
      let nl;
      while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + (buf[nl] === "\r" && buf[nl + 1] === "\n" ? 2 : 1));
        if (line === "") {   // the event is complete
          if (data.length) {
            let m = null;
            try { m = JSON.parse(data.join("\n")); } catch (e) {
              c._emit("error", new RealtimeError("undecodable SSE data", 0));
            }
            if (m !== null && typeof m === "object") {
              if (event === "error" && m.type === "error" && m.close_code) {
                this._end(m.close_code, m.message || "closed by the server");
                return;
              }
              c._message(this, m);
              if (this.done) return;
            }
            // the position moves once the batch is applied: a reconnect asks for what follows
            if (id !== null && event === "batch") c._readAt("sse", sid, id);
          }
          event = "message"; data = []; id = null;
        } else if (line[0] !== ":") {   // a comment is liveness only
          const i = line.indexOf(":");
          const field = i < 0 ? line : line.slice(0, i);
          let val = i < 0 ? "" : line.slice(i + 1);
          if (val[0] === " ") val = val.slice(1);
          if (field === "event") event = val;
          else if (field === "data") data.push(val);
          else if (field === "id") id = val;
        }
      }
      if (buf.length > 8 * 1024 * 1024) throw new RealtimeError("an SSE line over 8 MiB", 1009);
    }
  }

  refresh(token) {
    // a new stream with the new token renews the session's (PROTOCOL §4)
    // and goes on from the last batch, without a snapshot
    this.token = token;
    this.restart();
  }

  wake() { this.restart(); }
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
      let cursor = c._readerPosition("poll", sid);
      // a session this transport did not read: cursor 1 is older than any
      // copy, so the server starts a new copy (welcome, full state, missed events)
      if (cursor === null) cursor = c._unread === sid ? 0 : 1;
      while (!this.done) {
        // the first poll answers at once: it is how this transport shows it works
        const q = new URLSearchParams({ session: sid, cursor: String(cursor),
          timeout: String(first ? 0 : POLL_TIMEOUT_S) });
        if (c.lastEvent) q.set("last_event", c.lastEvent);
        this.wait = this._linked();
        this.kicked = false;
        const wait = this.wait;
        const timer = setTimeout(() => wait.abort(), (POLL_TIMEOUT_S + 10) * 1000);
        try {
          const r = await fetch(c._httpBase() + "/api/realtime/poll?" + q.toString(), {
            headers: this._headers(false), cache: "no-store", signal: this.wait.signal,
          });
          if (!r.ok) throw await httpError(r, true);
          const body = await r.json();
          if (this.done) return;
          c._alive(this);
          const messages = Array.isArray(body.messages) ? body.messages : [];
          for (const m of messages) {
            if (m && m.type === "error" && m.close_code) {
              this._end(m.close_code, m.message || "closed by the server");
              return;
            }
            c._message(this, m);
            if (this.done) return;
          }
          if (Number.isSafeInteger(body.cursor)) {
            cursor = body.cursor;   // acknowledged with the next poll, once applied
            c._readAt("poll", sid, cursor);
          }
          if (first) c._opened(this);
        } catch (e) {
          if (e.name === "AbortError" && this.kicked && !this.done) {
            this.kicked = false;   // aborted on purpose (new token, wake-up): poll again now
            continue;
          }
          throw e;
        } finally {
          clearTimeout(timer);
          wait.release();
        }
        first = false;
      }
    } catch (e) {
      this._end(e.code || 1006, e.message || "poll failed", !!e.session);
    }
  }

  /** Ends the waiting poll so that a new one starts at once. */
  kick() {
    if (this.wait && !this.done) { this.kicked = true; this.wait.abort(); }
  }

  refresh(token) {
    // the next poll carries the new token, which renews the session's (PROTOCOL §4)
    this.token = token;
    this.kick();
  }

  wake() { this.kick(); }
}

const TRANSPORTS = { websocket: WebSocketTransport, sse: SseTransport, poll: PollTransport };

async function httpError(r, session = false) {
  let message = r.statusText || "HTTP " + r.status;
  try { const b = await r.json(); message = b.message || b.error || message; } catch (e) { /* no JSON */ }
  const code = { 401: 4001, 403: 4003, 404: 4404, 410: 4410 }[r.status] || r.status;
  const e = new RealtimeError(message, code);
  e.session = session;   // the request named the session: a 403/404/410 is about it
  return e;
}

/**
 * Bounds the server takes (PROTOCOL §3): finite, latitudes within ±90 with
 * south ≤ north, longitudes wrapped into ±180 (east < west crosses the
 * antimeridian), zoom 0 to 30. A map dragged past the poles or around the
 * world gives such values; NaN is the page's bug and throws.
 */
function normalGeographic(g) {
  const b = g && g.bounds;
  const nums = b ? [b.north, b.south, b.east, b.west] : [];
  if (!b || !nums.every(Number.isFinite) || (g.zoom != null && !Number.isFinite(g.zoom))) {
    throw new TypeError("bounds need finite north, south, east and west (and a finite zoom)");
  }
  const lat = (x) => Math.max(-90, Math.min(90, x));
  const lon = (x) => ((((x + 180) % 360) + 360) % 360) - 180;
  let north = lat(b.north), south = lat(b.south);
  if (south > north) [south, north] = [north, south];
  let west = lon(b.west), east = lon(b.east);
  if (b.east - b.west >= 360) { west = -180; east = 180; }   // the whole world in view
  const out = { bounds: { north, south, east, west } };
  if (g.zoom != null) out.zoom = Math.max(0, Math.min(30, g.zoom));
  return out;
}

function eidAfter(a, b) {
  const [x0, x1] = String(a).split("-").map(Number);
  const [y0, y1] = String(b).split("-").map(Number);
  return x0 > y0 || (x0 === y0 && x1 > y1);
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
    this.url = String(base).replace(/\/+$/, "");
    /** @type {"json"|"msgpack"} */
    this.format = options.format === "msgpack" ? "msgpack" : "json";
    /** @type {TransportName[]} */
    this.transports = (Array.isArray(options.transports) ? options.transports : DEFAULT_TRANSPORTS)
      .filter((t) => Object.prototype.hasOwnProperty.call(TRANSPORTS, t));
    if (!this.transports.length) throw new TypeError("no known transport in " + JSON.stringify(options.transports));
    this._tokenSource = options.token;
    this._token = typeof options.token === "function" ? null : String(options.token);
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
    this._listeners = new Map();
    this._seen = new Set();
    this._seenOrder = [];
    // the subscription, and what the server has confirmed of it: subscribe()
    // and viewport() each count a version; a reconnect sends what is unconfirmed
    this._subscription = null;
    this._subVersion = 0; this._subAcked = 0;
    this._vpVersion = 0; this._vpAcked = 0;
    this._subWaiters = [];       // {version, resolve, reject}: subscribe() promises
    this._specs = new Map();     // version → spec, while unconfirmed
    this._accepted = null;       // the last spec the server took
    if (options.subscription) this._setSubscription(options.subscription);
    this._gen = 0;               // connection attempts of older generations are closed
    this._t = null;              // the transport in use
    this._opening = null;        // {t, gen, resolve}: the transport being opened
    this._roundGen = -1;         // the generation whose round is running
    this._attempt = 0;           // reconnect attempts since a stable connection
    this._timer = null;          // the pending reconnect
    this._afterMs = null;        // the server's `reconnect.after_ms`, and when it came
    this._afterAt = 0;
    this._openedAt = 0;
    this._heartbeatMs = 30000;
    this._lastRx = 0;
    this._lastTick = 0;
    this._probeAt = null;
    this._rttAt = 0;
    this._pingSent = null;
    this._pending = new Map();   // request id → {resolve, reject, timer}: get() over WebSocket
    this._reqId = 0;
    this._reader = { transport: null, session: null, position: null };
    this._needFreshToken = false;
    this._lastRefresh = -Infinity;
    this._refreshTimer = null;
    this._memo = null;           // the remembered transport when localStorage is not there
    this._hiddenAt = null;
    this._onOnline = () => this._wake("online");
    this._onVisible = () => {
      if (document.visibilityState === "hidden") { this._hiddenAt = Date.now(); return; }
      const away = this._hiddenAt !== null ? Date.now() - this._hiddenAt : 0;
      this._hiddenAt = null;
      this._wake(away > PROBE_AFTER_MS ? "visible-after-sleep" : "visible");
    };
  }

  // -- events ---------------------------------------------------------------

  /**
   * Listens to "state", "vehicle", "leave", "event", "clusters", "error" (and
   * "welcome", "rtt", "retry" {delay, attempt} before each reconnect attempt,
   * "message" for every server message).
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
   * Connects over the first transport that works. Resolves with the
   * `welcome`; rejects when every transport failed, at once on a refused
   * (4001) or forbidden (4003) token. While reconnecting it tries at once and
   * resolves on the next `welcome`.
   * @returns {Promise<Object>} the welcome message
   */
  connect() {
    if (this.state === "connected") return Promise.resolve(this._welcome);
    if (this._connecting) return this._connecting;
    this._connecting = new Promise((resolve, reject) => {
      this._connected = resolve;
      this._connectFailed = reject;
    });
    if (this.state === "reconnecting") {
      if (this._timer !== null) this._now();
      return this._connecting;
    }
    this._closedByUser = false;
    this._attempt = 0;
    this._setState("connecting");
    this._listen(true);
    this._round(false);
    return this._connecting;
  }

  /**
   * Replaces the subscription (PROTOCOL §3 `subscribe`). Resolves with the
   * `subscribed` reply; rejects with the server's `error`. Called before
   * connect(), it is the one the connection starts with.
   * @param {Subscription} spec @returns {Promise<Object>} the `subscribed` message
   */
  subscribe(spec = {}) {
    const before = this._subscription;
    this._setSubscription(spec);
    const msg = this._subscribeMessage();
    if (new TextEncoder().encode(JSON.stringify(msg)).length > MAX_MESSAGE_BYTES) {
      this._specs.delete(this._subVersion);
      this._subscription = before;   // the server would close the connection (1009): keep the old one
      this._subVersion--;
      return Promise.reject(new RealtimeError("the subscription is over 60 KiB", "too_large"));
    }
    const version = this._subVersion;
    const p = new Promise((resolve, reject) => this._subWaiters.push({ version, resolve, reject }));
    if (this.state === "connected" && this._t) this._t.subscribe(msg);
    return p;
  }

  /** Moves the viewport (PROTOCOL §3 `viewport`). @param {Bounds} bounds @param {number} zoom */
  viewport(bounds, zoom) {
    const geographic = normalGeographic({ bounds, zoom });
    if (!this._subscription) {   // a viewport alone is a subscription to it
      this._setSubscription({ geographic });
    }
    const sub = this._subscription;
    sub.geographic = geographic;
    this._vpVersion++;
    if (this.state === "connected" && this._t) this._sendViewport();
  }

  /** The long form of a vehicle (PROTOCOL §3.2). @param {string|number} id @returns {Promise<Object>} */
  async get(id) {
    if (this._t && this._t.name === "websocket" && this.state === "connected") {
      const rid = "rt-get-" + (++this._reqId);
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
    this._gen++;
    clearTimeout(this._timer);
    this._timer = null;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._stopLiveness();
    this._listen(false);
    const t = this._t;
    this._t = null;
    if (this._opening) {
      const o = this._opening;
      this._opening = null;
      o.t.close();
      o.resolve(new RealtimeError("closed", 1000, true));
    }
    if (t) t.close();
    if (this.transport && this.transport !== "websocket" && this.session && this._token) {
      // an HTTP session would otherwise wait for its idle timeout (2 minutes)
      fetch(this._httpBase() + "/api/realtime/session/" + encodeURIComponent(this.session), {
        method: "DELETE", headers: { Authorization: "Bearer " + this._token }, keepalive: true,
      }).catch(() => {});
      this._forgetSession();
    }
    this._stop(new RealtimeError("closed", 1000, true), false);
  }

  // -- connecting -----------------------------------------------------------

  _httpBase() { return this.url; }
  _wsBase() { return this.url.replace(/^http/, "ws"); }
  _storageKey() { return "realtime.transport:" + this.url; }

  _remembered() {
    if (!this._remember) return null;
    let r = this._memo;
    try { r = JSON.parse(localStorage.getItem(this._storageKey()) || "null") || r; } catch (e) { /* no storage */ }
    if (r && r.expires > Date.now() && this.transports.includes(r.transport)) return r.transport;
    return null;
  }

  /**
   * A fallback that worked after a transport before it failed, for 30 minutes
   * from when it first worked: then the configured order is tried again.
   * WebSocket working forgets it. (A client configured with a shorter list
   * remembers nothing by itself: other clients of the page keep their order.)
   */
  _rememberTransport(name, fellBack, reconnecting) {
    if (!this._remember) return;
    if (name === "websocket") {
      this._memo = null;
      this._fallbacks = 0;
      try { localStorage.removeItem(this._storageKey()); } catch (e) { /* no storage */ }
      return;
    }
    // on a page load a fallback is what this network allows; while reconnecting
    // it may be a glitch (a restart, a slow welcome, a laptop waking up): only
    // a second round in a row that falls back is remembered, for every tab
    this._fallbacks = fellBack ? (this._fallbacks || 0) + 1 : 0;
    if (!fellBack || (reconnecting && this._fallbacks < 2) || this._remembered() === name) return;
    this._memo = { transport: name, expires: Date.now() + REMEMBER_MS };
    try { localStorage.setItem(this._storageKey(), JSON.stringify(this._memo)); } catch (e) { /* no storage */ }
  }

  /** The order to try: the remembered one first, then the configured order. */
  _order() {
    const first = this._remembered();
    const order = first ? [first, ...this.transports.filter((t) => t !== first)] : [...this.transports];
    return order.filter((t) => { try { return TRANSPORTS[t].available(); } catch (e) { return false; } });
  }

  async _currentToken() {
    if (this._token !== null && !this._needFreshToken) return this._token;
    if (typeof this._tokenSource !== "function") return this._token;
    let timer;
    const t = await Promise.race([
      Promise.resolve().then(() => this._tokenSource()),
      new Promise((_, no) => { timer = setTimeout(() => no(new Error("no answer in 10 s")), 10000); }),
    ]).finally(() => clearTimeout(timer));
    if (typeof t !== "string" || !t) throw new RealtimeError("the token function returned no token", 4001);
    this._token = t;
    this._needFreshToken = false;
    return this._token;
  }

  /** One round over the transports; on failure, the next after backoff. */
  async _round(reconnecting) {
    const gen = ++this._gen;
    this._roundGen = gen;
    this._timer = null;
    const stale = () => gen !== this._gen || this._closedByUser;
    let last = new RealtimeError("no transport available in this browser: " + this.transports.join(", "), 0);
    this._fellBack = false;
    this._reconnecting = reconnecting;
    let freshTried = this._needFreshToken || typeof this._tokenSource !== "function";
    for (const name of this._order()) {
      let token;
      try {
        token = await this._currentToken();
      } catch (e) {
        last = e instanceof RealtimeError ? e : new RealtimeError("the token function failed: " + (e && e.message), 0);
        break;
      }
      if (stale()) return;
      let result = await this._try(name, token, gen);
      if (stale()) return;
      if (result === true) return;
      if ((result.code === 4404 || result.code === 4410 || (result.code === 4003 && result.session)) && this.session) {
        this._forgetSession();   // unknown, ended or another user's: a new one, on this transport again
        result = await this._try(name, token, gen);
        if (stale()) return;
        if (result === true) return;
      }
      if (result.code === 4001 && !freshTried) {
        // the token kept from before ran out meanwhile: ask the function now, not after a backoff
        freshTried = true;
        this._needFreshToken = true;
        try { token = await this._currentToken(); } catch (e) { last = result; break; }
        if (stale()) return;
        result = await this._try(name, token, gen);
        if (stale()) return;
        if (result === true) return;
      }
      last = result;
      this._fellBack = true;
      if (result.code === 4001 || result.code === 4003) break;   // another transport would not help
    }
    this._roundGen = -1;
    this._failed(last, reconnecting);
  }

  /** Opens one transport: true on `welcome`, else the error it ended with. */
  _try(name, token, gen) {
    return new Promise((resolve) => {
      const t = new TRANSPORTS[name](this, token);
      this._t = t;
      this._opening = { t, gen, resolve, fellBack: this._fellBack, reconnecting: this._reconnecting };
      this._welcome = null;
      const armed = Date.now();
      const silent = () => {
        if (!this._opening || this._opening.t !== t) return;
        if (Date.now() - armed > SILENT_MS + 2000 && !t._rearmed) {
          t._rearmed = true;   // the timer fired late (a sleep): the 5 s were not the server's
          t._silence = setTimeout(silent, SILENT_MS);
          return;
        }
        this._opening = null;
        t.close();
        resolve(new RealtimeError(name + " was silent for " + SILENT_MS / 1000 + " s", 1006));
      };
      t._silence = setTimeout(silent, SILENT_MS);
      try {
        t.open();
      } catch (e) {   // e.g. the WebSocket constructor refuses the URL
        this._ended(t, 1006, e && e.message);
      }
    });
  }

  /** The transport being opened answered (a welcome, or a first poll that carries on a session). */
  _opened(t) {
    const o = this._opening;
    if (!o || o.t !== t) return;
    this._opening = null;
    clearTimeout(t._silence);
    if (o.gen !== this._gen || this._closedByUser) {   // a round that was given up on
      t.close();
      o.resolve(new RealtimeError("superseded", 1000));
      return;
    }
    this._openedAt = Date.now();
    this._rememberTransport(t.name, !!o.fellBack, !!o.reconnecting);
    if (this.transport !== t.name) this._reader = { transport: null, session: null, position: null };
    this.transport = t.name;
    this._setState("connected");
    if (o.gen !== this._gen || this._closedByUser) { o.resolve(true); return; }   // a listener closed it
    this._startLiveness();
    this._syncSubscription(t);
    if (this._connected) {
      const done = this._connected;
      this._connected = this._connectFailed = null;
      this._connecting = null;
      done(this._welcome || this._lastWelcome);   // a poll that carries on its session has none of its own
    }
    o.resolve(true);
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
      this._stop(err, true);
      return;
    }
    this._emit("error", err);
    this._schedule();
  }

  /** The client stops for good: every promise settles, the error is reported. */
  _stop(err, report) {
    this._closedByUser = true;
    this._gen++;
    clearTimeout(this._refreshTimer);
    this._refreshTimer = null;
    this._stopLiveness();
    this._listen(false);
    clearTimeout(this._timer);
    this._timer = null;
    if (this._connectFailed) {
      const fail = this._connectFailed;
      this._connected = this._connectFailed = null;
      this._connecting = null;
      fail(err);
    }
    for (const w of this._subWaiters.splice(0)) w.reject(err);
    this._rejectPending(err);
    if (report) this._emit("error", err);
    this._setState("closed");
  }

  _rejectPending(err) {
    for (const [, p] of this._pending) { clearTimeout(p.timer); p.reject(err); }
    this._pending.clear();
  }

  /** Full-jitter exponential backoff, or the server's `reconnect.after_ms`. */
  _schedule() {
    clearTimeout(this._timer);
    let delay;
    if (this._afterMs !== null && Date.now() - this._afterAt < 60000) {
      delay = this._afterMs;
    } else {
      // from the first retry on a random delay: clients cut off together do not come back together
      const cap = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(this._attempt + 1, 16));
      delay = BACKOFF_MIN_MS + Math.random() * (cap - BACKOFF_MIN_MS);
    }
    this._afterMs = null;
    this._setState("reconnecting");
    this._emit("retry", { delay: Math.round(delay), attempt: this._attempt });
    this._attempt++;
    this._timer = setTimeout(() => this._round(true), delay);
  }

  /** Reconnect now instead of after the backoff. */
  _now() {
    clearTimeout(this._timer);
    this._timer = null;
    this._round(true);
  }

  /** A transport ended: while opening, the round goes on; once open, reconnect. */
  _ended(t, code, reason, session = false) {
    clearTimeout(t._silence);
    const o = this._opening;
    if (o && o.t === t) {
      this._opening = null;
      const e = new RealtimeError(reason || "closed", code);
      e.session = session;
      o.resolve(e);
      return;
    }
    if (t !== this._t || this._closedByUser) return;
    this._t = null;
    this._stopLiveness();
    this._rejectPending(new RealtimeError("the connection closed", code));
    if (Date.now() - this._openedAt > STABLE_MS) this._attempt = 0;   // a stable link: backoff starts over
    if (code === 4404 || code === 4410 || (code === 4003 && session)) this._forgetSession();
    else if (code === 4003) {
      this._stop(new RealtimeError(reason || "forbidden (4003)", 4003, true), true);
      return;
    }
    if (code === 4001) {
      if (typeof this._tokenSource !== "function") {
        this._stop(new RealtimeError("the token was refused or expired (4001)", 4001, true), true);
        return;
      }
      this._needFreshToken = true;   // fetched before reconnecting
    }
    this._schedule();
  }

  _forgetSession() {
    this.session = null;
    this._reader = { transport: null, session: null, position: null };
    this._subAcked = 0;   // a new session has none of it
    this._vpAcked = 0;
  }

  /** Where a transport reads a session from: only its own position counts. */
  _readerPosition(transport, session) {
    const r = this._reader;
    return r.transport === transport && r.session === session ? r.position : null;
  }

  _readAt(transport, session, position) {
    this._reader = { transport, session, position };
  }

  /** Network back, or the tab visible again: reconnect now, or check the open link. */
  _wake(why) {
    if (this._closedByUser || this.state === "closed" || this.state === "connecting") return;
    if (this.state === "reconnecting") {
      if (this._timer !== null) { this._attempt = 0; this._now(); }
    } else if (this.state === "connected" && this._t) {
      this._lastRx = performance.now();
      // after a network change or a sleep the old TCP connection is likely
      // dead without knowing it: SSE opens a new stream (it goes on from the
      // last batch), polling polls again, WebSocket sends a ping
      if (why === "visible" && this._t.name === "sse") return;
      this._t.wake();
    }
  }

  _listen(on) {
    if (typeof window === "undefined" || typeof document === "undefined") return;
    const f = on ? "addEventListener" : "removeEventListener";
    window[f]("online", this._onOnline);
    document[f]("visibilitychange", this._onVisible);
  }

  // -- liveness -------------------------------------------------------------

  _alive(t) { if (t === this._t) this._lastRx = performance.now(); }

  _startLiveness() {
    this._stopLiveness();
    this._lastRx = performance.now();
    this._lastTick = Date.now();
    this._probeAt = null;
    this._rttAt = 0;
    this._live = setInterval(() => this._checkLiveness(), 1000);
    this._measure();
  }

  _stopLiveness() {
    clearInterval(this._live);
    this._live = null;
    this._probeAt = null;
  }

  /** WebSocket only: a `ping` whose answer (any byte) must come within 5 s. */
  _probe() {
    if (!this._t || this._t.name !== "websocket") return;
    this._probeAt = performance.now();
    this._t.probe();
  }

  /** The round trip for the badge: `ping` on WebSocket, a health check over HTTP. */
  _measure() {
    this._rttAt = performance.now();
    if (!this._t) return;
    if (this._t.name === "websocket") this._probe();
    else this._t.rtt();
  }

  _checkLiveness() {
    const t = this._t;
    if (!t) return;
    const now = performance.now();
    const wall = Date.now();
    const late = wall - this._lastTick > SILENT_MS;
    this._lastTick = wall;
    if (late) {
      // the timer could not run (sleep, a throttled background tab): the
      // silence is ours, not the server's; re-arm and check the link
      this._lastRx = now;
      this._probeAt = null;
      if (t.name === "websocket") this._probe();
      return;
    }
    if (now - this._rttAt > RTT_EVERY_MS && t.name !== "websocket") this._measure();
    const idle = now - this._lastRx;
    if (t.name === "websocket") {
      if (this._probeAt !== null && this._lastRx > this._probeAt) this._probeAt = null;   // an answer came
      if (this._probeAt !== null && now - this._probeAt > PROBE_WAIT_MS) {
        return this._dead(t, idle);
      }
      if (this._probeAt === null && idle > PROBE_AFTER_MS) this._probe();
    } else if (t.name === "sse") {
      // the server writes a keep-alive comment at least this often (docs/protocol.md)
      const every = Math.min(this._heartbeatMs, 15000);
      if (idle > every + 2 * PROBE_WAIT_MS) this._dead(t, idle);
    }
    // polling: each poll has its own deadline (its timeout + 10 s)
  }

  _dead(t, idle) {
    t.close();
    this._ended(t, 1006, "nothing received for " + Math.round(idle / 1000) + " s");
  }

  // -- the subscription -------------------------------------------------------

  _setSubscription(spec) {
    const { filters, geographic, vehicles, groups } = spec || {};
    const sub = {};
    if (vehicles) sub.vehicles = vehicles;
    if (groups) sub.groups = groups;
    if (geographic) sub.geographic = normalGeographic(geographic);
    if (filters) sub.filters = filters;
    this._subscription = sub;
    this._subVersion++;
    this._specs.set(this._subVersion, { ...sub });   // until the server confirms or refuses it
  }

  _subscribeMessage() {
    const s = this._subscription || {};
    const msg = { type: "subscribe", subscriptions: {} };
    if (s.vehicles) msg.subscriptions.vehicles = s.vehicles;
    if (s.groups) msg.subscriptions.groups = s.groups;
    if (s.geographic) msg.subscriptions.geographic = s.geographic;
    if (s.filters) msg.filters = s.filters;
    msg.id = "rt-sub-" + this._subVersion + "-" + this._vpVersion;
    return msg;
  }

  _sendViewport() {
    const g = this._subscription && this._subscription.geographic;
    if (!g || !this._t) return;
    if (this._subAcked < this._subVersion) return this._t.subscribe(this._subscribeMessage());
    if (this._t.name === "websocket") {
      this._t.viewport({ type: "viewport", bounds: g.bounds, zoom: g.zoom, id: "rt-vp-" + this._vpVersion });
    } else {
      this._t.viewport(this._subscribeMessage());   // a PUT of the whole subscription: the server sends the difference
    }
  }

  /** After a welcome: send what the server does not have of the subscription. */
  _syncSubscription(t) {
    if (t !== this._t || !this._subscription) return;
    if (this._subAcked < this._subVersion) {
      t.subscribe(this._subscribeMessage());
    } else if (this._subscription.geographic && (this._vpAcked < this._vpVersion ||
               (this.resumed && !(this._welcome && this._welcome.continued)))) {
      // the stored session may hold an older viewport (a viewport in flight
      // when the link died): sending it again costs only the difference
      this._sendViewport();
    }
  }

  /** `rt-sub-<sub>-<vp>` or `rt-vp-<vp>`: the versions a reply confirms. */
  _versions(id) {
    const m = /^rt-(sub|vp)-(\d+)(?:-(\d+))?$/.exec(String(id));
    if (!m) return null;
    return m[1] === "sub" ? { sub: Number(m[2]), vp: Number(m[3]) } : { sub: null, vp: Number(m[2]) };
  }

  _subscriptionApplied(id, reply) {
    const v = this._versions(id);
    if (!v) return;
    if (v.sub !== null && v.sub > this._subAcked) {
      this._subAcked = v.sub;
      if (this._specs.has(v.sub)) this._accepted = this._specs.get(v.sub);
      for (const k of [...this._specs.keys()]) if (k <= v.sub) this._specs.delete(k);
    }
    this._vpAcked = Math.max(this._vpAcked, v.vp);
    if (reply === undefined) return;
    const done = this._subWaiters.filter((w) => w.version <= this._subAcked);
    this._subWaiters = this._subWaiters.filter((w) => w.version > this._subAcked);
    for (const w of done) w.resolve(reply);
  }

  /** The server refused a subscription: its promises fail, and it is not sent again. */
  _subscriptionRefused(id, err) {
    const v = this._versions(id);
    if (!v || v.sub === null) return;
    if (v.sub >= this._subVersion) {
      // the newest was refused: the page's subscription is the last one taken
      // (with the current viewport), so later viewports are not refused with it
      const geographic = this._subscription && this._subscription.geographic;
      this._subscription = this._accepted ? { ...this._accepted } : null;
      if (this._subscription && geographic) this._subscription.geographic = geographic;
    }
    this._subAcked = Math.max(this._subAcked, v.sub);
    for (const k of [...this._specs.keys()]) if (k <= v.sub) this._specs.delete(k);
    const failed = this._subWaiters.filter((w) => w.version <= v.sub);
    this._subWaiters = this._subWaiters.filter((w) => w.version > v.sub);
    for (const w of failed) w.reject(err);
    if (!failed.length) this._emit("error", err);
  }

  // -- messages -------------------------------------------------------------

  /** Every server message of every transport comes through here. */
  _message(t, m) {
    if (t !== this._t || !m || typeof m !== "object") return;
    this._unread = null;
    this._emit("message", m);
    switch (m.type) {
      case "batch":
        if (m.id !== undefined) this._subscriptionApplied(m.id);   // a viewport's reply
        this._batch(Array.isArray(m.messages) ? m.messages : []);
        // a snapshot of more than 1,000 vehicles comes as several batches, each
        // but the last with `more`: it is whole, and what it did not name gone,
        // only after the last
        if (m.more === true) {
          if (this._replied) this._armReplied();
          break;
        }
        if (this._snapshotDue) this._snapshotApplied();
        if (this._replied) {   // subscribe() settles once its batch is applied
          const { id, reply } = this._replied;
          this._replied = null;
          clearTimeout(this._repliedTimer);
          this._subscriptionApplied(id, reply);
        }
        break;
      case "welcome":
        this._onWelcome(t, m);
        break;
      case "subscribed": {
        // its batch follows: the promise settles when that is applied (or in 1 s)
        const id = m.id !== undefined && this._versions(m.id) ? m.id
          : t.madeSession ? "rt-sub-" + this._subAcked + "-0" : null;
        if (id === null) break;
        if (this._replied) this._subscriptionApplied(this._replied.id, this._replied.reply);
        this._replied = { id, reply: m };
        this._armReplied();
        break;
      }
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
        if (typeof m.after_ms === "number" && m.after_ms >= 0) {
          this._afterMs = Math.min(m.after_ms, 600000);
          this._afterAt = Date.now();
        }
        break;
      case "error":
        this._onError(m);
        break;
      default:
        break;
    }
    if (m.id !== undefined && this._pending.has(m.id)) {
      const p = this._pending.get(m.id);
      this._pending.delete(m.id);
      clearTimeout(p.timer);
      if (m.type === "error") p.reject(new RealtimeError(m.message || m.code, m.code));
      else {
        const { id, ...long } = m;   // the §3.2 long form, as GET /api/vehicles/{id} gives it
        p.resolve(long);
      }
    }
  }

  /** subscribe() settles when its batch is applied, or 1 s after the last sign of it. */
  _armReplied() {
    clearTimeout(this._repliedTimer);
    this._repliedTimer = setTimeout(() => {
      if (this._replied) { const r = this._replied; this._replied = null; this._subscriptionApplied(r.id, r.reply); }
    }, 1000);
  }

  _onWelcome(t, m) {
    this._welcome = this._lastWelcome = m;
    this.recovered = !!m.recovered;
    this.resumed = !!m.resumed;
    if (typeof m.heartbeat_s === "number" && m.heartbeat_s > 0) this._heartbeatMs = m.heartbeat_s * 1000;
    if (typeof m.session === "string" && m.session) this.session = m.session;
    // a new session (not a resume, whose replay may still be on its way) starts
    // where the log stood when it joined: a client with no newer event resumes from there
    if (!m.resumed && typeof m.last_event === "string" && RESUMABLE_EID.test(m.last_event) &&
        (!this.lastEvent || eidAfter(m.last_event, this.lastEvent))) {
      this.lastEvent = m.last_event;
    }
    if (!m.resumed && !t.madeSession) { this._subAcked = 0; this._vpAcked = 0; }   // a new session has nothing
    // a resumed session whose subscription did not come back (none was stored,
    // or one this server cannot read): it is sent again (_syncSubscription)
    if (m.resumed && m.restored === false) { this._subAcked = 0; this._vpAcked = 0; }
    // a subscription whose `subscribed` never came (the copy that took it is
    // gone) is asked again, except on the first copy of the session it made
    if (this._subWaiters.length && !m.continued && !(t.madeSession && !m.resumed)) {
      this._subAcked = Math.min(this._subAcked, this._subWaiters[0].version - 1);
    }
    if (!m.continued) {
      // the next batch is the full state (PROTOCOL §3.4): what it does not name is gone then
      this._unconfirmed = new Set(this.vehicles.keys());
      this._snapshotDue = true;
      if (this.clusters) {
        this.clusters = null;
        this._emit("clusters", { t: "clusters", z: null, cells: [] });
      }
    }
    this._emit("welcome", m);
    if (this._opening && this._opening.t === t) this._opened(t);
    else if (t === this._t && !m.continued) this._syncSubscription(t);   // a new copy of an open HTTP session
  }

  /** After the snapshot that follows a welcome: vehicles it did not name are gone. */
  _snapshotApplied() {
    this._snapshotDue = false;
    const gone = this._unconfirmed;
    this._unconfirmed = null;
    for (const id of gone || []) {
      if (this.vehicles.delete(id)) this._emit("leave", id, "reset");
    }
  }

  _onError(m) {
    const err = new RealtimeError(m.message || m.code, m.code);
    const v = m.id !== undefined ? this._versions(m.id) : null;
    if (v && v.sub !== null) {
      this._subscriptionRefused(m.id, err);
      return;
    }
    if (m.code === "rate_limited" && !this._rateRetry) {
      // a subscribe or viewport may have been dropped (the server's error names
      // no request then): what is unconfirmed goes again, once, a second later
      const t = this._t;
      this._rateRetry = setTimeout(() => {
        this._rateRetry = null;
        if (t === this._t && this.state === "connected") this._syncSubscription(t);
      }, 1000);
    }
    if (m.id === undefined || !this._pending.has(m.id)) this._emit("error", err);
  }

  /** token_expiring: a new token from the function, at most every 5 s. */
  _refreshToken(t) {
    if (typeof this._tokenSource !== "function") return;   // it will close with 4001 at exp
    const wait = this._lastRefresh + REFRESH_GAP_MS - Date.now();
    if (wait > 0) {
      if (this._refreshTimer === null) {
        this._refreshTimer = setTimeout(() => { this._refreshTimer = null; this._refreshToken(this._t); }, wait);
      }
      return;
    }
    this._lastRefresh = Date.now();
    const old = this._token;
    this._needFreshToken = true;
    this._currentToken().then((token) => {
      // the same token again would only be warned about again: wait for the
      // 4001 at its exp, which asks the function once more before reconnecting
      if (t && t === this._t && token !== old) t.refresh(token);
    }, (e) => {
      this._emit("error", new RealtimeError("the token function failed: " + (e && e.message), 0));
    });
  }

  _batch(messages) {
    for (const m of messages) {
      try {
        this._apply(m);
      } catch (e) {   // one malformed message does not cost the rest of the batch
        this._emit("error", new RealtimeError("a message could not be applied: " + e.message, 0));
      }
    }
  }

  _apply(m) {
    if (!m || typeof m !== "object") return;
    const vs = this.vehicles;
    switch (m.t) {
      case "full": {
        const p = Array.isArray(m.p) ? m.p : [null, null];
        const v = { id: m.v, lat: p[0], lon: p[1], speed: m.s ?? null, course: m.c ?? null,
          status: m.st ?? null, vehicle_type: m.vt ?? null, ts: m.ts ?? null,
          alerts: Array.isArray(m.al) ? m.al : [], driver: m.dr ?? null, assignment: m.as ?? null };
        vs.set(m.v, v);
        if (this._unconfirmed) this._unconfirmed.delete(m.v);
        this._emit("vehicle", v, "full");
        break;
      }
      case "pos": {
        const v = vs.get(m.v);
        if (!v) break;
        if (Array.isArray(m.p)) { v.lat = m.p[0]; v.lon = m.p[1]; }
        if (m.s !== undefined) v.speed = m.s;
        if (m.c !== undefined) v.course = m.c;
        if (m.ts !== undefined) v.ts = m.ts;
        this._emit("vehicle", v, "pos");
        break;
      }
      case "delta": {
        const v = vs.get(m.v);
        if (!v) break;
        const ch = m.ch && typeof m.ch === "object" ? m.ch : {};
        for (const [k, val] of Object.entries(ch)) {
          if (k === "p") { if (Array.isArray(val)) { v.lat = val[0]; v.lon = val[1]; } }
          else if (k === "al") v.alerts = Array.isArray(val) ? val : [];
          else if (Object.prototype.hasOwnProperty.call(LONG, k)) v[LONG[k]] = val;   // unknown keys are dropped
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
        this._unconfirmed = null;
        for (const id of ids) this._emit("leave", id, "clusters");
        const cells = Array.isArray(m.cells) ? m.cells.filter((c) => Array.isArray(c) && c.length >= 3) : [];
        const msg = { ...m, cells };
        this.clusters = cells.length ? msg : null;   // an empty one ends the clustered view
        this._emit("clusters", msg);
        break;
      }
      default:
        break;
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
      if (RESUMABLE_EID.test(String(eid)) && (!this.lastEvent || eidAfter(eid, this.lastEvent))) {
        this.lastEvent = String(eid);
      }
    }
    this._emit("event", m);
  }
}

export default RealtimeClient;
