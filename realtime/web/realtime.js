// Minimal browser client for the realtime WebSocket protocol (PROTOCOL §3).
// Keeps the visible vehicles in a Map, applies full/pos/delta/leave, reconnects
// with backoff. The full client library (resume, fallbacks) comes later.
(function (global) {
  "use strict";
  function RealtimeClient(opts) {
    this.url = opts.url;
    this.token = opts.token;
    this.vehicles = new Map();
    this.onchange = opts.onchange || function () {};
    this.onevent = opts.onevent || function () {};
    this.onstatus = opts.onstatus || function () {};
    this.subscription = null;
    this.clusters = null;  // [[lat, lon, count], …] while zoomed out
    this.backoff = 500;
    this.updates = 0;
    this.connect();
  }
  RealtimeClient.prototype.connect = function () {
    var self = this;
    var ws = new WebSocket(this.url + "?token=" + encodeURIComponent(this.token));
    this.ws = ws;
    ws.onopen = function () { self.backoff = 500; self.onstatus("connected"); };
    ws.onclose = function (e) {
      self.onstatus("closed (" + e.code + ") — reconnecting");
      self.vehicles.clear();
      self.onchange();
      setTimeout(function () { self.connect(); }, self.backoff);
      self.backoff = Math.min(self.backoff * 2, 15000);
    };
    ws.onmessage = function (e) { self.handle(JSON.parse(e.data)); };
  };
  RealtimeClient.prototype.send = function (msg) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(msg));
  };
  RealtimeClient.prototype.subscribe = function (sub) {
    this.subscription = sub;
    this.send(Object.assign({ type: "subscribe" }, sub));
  };
  RealtimeClient.prototype.viewport = function (bounds, zoom) {
    this.send({ type: "viewport", bounds: bounds, zoom: zoom });
  };
  RealtimeClient.prototype.handle = function (msg) {
    if (msg.type === "welcome") {
      if (this.subscription) this.send(Object.assign({ type: "subscribe" }, this.subscription));
      return;
    }
    if (msg.type !== "batch") return;
    var vs = this.vehicles;
    for (var i = 0; i < msg.messages.length; i++) {
      var m = msg.messages[i];
      this.updates++;
      if (m.t === "clusters") { this.clusters = m.cells; vs.clear(); }
      else if (m.t === "full") { this.clusters = null; vs.set(m.v, m); }
      else if (m.t === "pos") {
        var v = vs.get(m.v);
        if (v) { v.p = m.p; v.s = m.s; v.c = m.c; v.ts = m.ts; }
      } else if (m.t === "delta") {
        var d = vs.get(m.v);
        if (d) { Object.assign(d, m.ch); d.ts = m.ts; }
      } else if (m.t === "leave") { vs.delete(m.v); }
      else if (m.t === "event") { this.onevent(m); }
    }
    this.onchange();
  };
  global.RealtimeClient = RealtimeClient;
})(window);
