// The dispatcher map at `/`: Leaflet with the canvas renderer, fed by the
// public client library (realtime-client.js, PROTOCOL §8). Nothing here
// speaks the wire protocol itself.
import { RealtimeClient } from "/static/realtime-client.js";

const L = window.L;
const config = window.REALTIME_CONFIG || {};
const COLORS = { moving: "#3fbf3f", idle: "#f2c232", stopped: "#f0642e", offline: "#8a8f98" };
const STATUS_ORDER = ["moving", "idle", "stopped", "offline"];   // a cluster cell's breakdown
const START = { lat: 55.7558, lon: 37.6173, zoom: 11 };   // the simulated fleet drives around Moscow
const VIEWPORT_DEBOUNCE_MS = 150;
const MAX_ALERTS = 100;

const $ = (id) => document.getElementById(id);
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (ch) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch]));

// -- the token ----------------------------------------------------------------
// `?token=` wins; in development mode the page carries a viewer token and the
// server mints a fresh one at /dev/token when it runs out; otherwise ask.
function pageToken() {
  const q = new URLSearchParams(location.search).get("token");
  if (q) return q;
  if (config.token) return config.token;
  return window.prompt("Access token (JWT)") || "";
}
let token = pageToken();
const tokenSource = config.dev && !new URLSearchParams(location.search).get("token")
  ? async () => {
      const r = await fetch("/dev/token", { cache: "no-store" });
      if (!r.ok) throw new Error("no development token: HTTP " + r.status);
      token = (await r.json()).token;
      return token;
    }
  : token;

// -- the map ------------------------------------------------------------------
const params = new URLSearchParams(location.search);
const map = L.map("map", {
  center: [Number(params.get("lat")) || START.lat, Number(params.get("lon")) || START.lon],
  zoom: Number(params.get("zoom")) || START.zoom,
  preferCanvas: true, zoomSnap: 1, worldCopyJump: true, minZoom: 2, maxZoom: 19,
});
const renderer = L.canvas({ padding: 0.3 });
if (config.tiles) {
  L.tileLayer(config.tiles, {
    maxZoom: 19, attribution: config.tiles_attribution || "&copy; OpenStreetMap contributors",
  }).addTo(map);
}
L.control.scale({ imperial: false }).addTo(map);

// A graticule: with no tiles reachable the map is still readable.
const graticule = L.layerGroup().addTo(map);
function drawGraticule() {
  graticule.clearLayers();
  const b = map.getBounds();
  const span = Math.max(b.getNorth() - b.getSouth(), 1e-6);
  const steps = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 15, 30];
  const step = steps.find((s) => span / s <= 10) || 30;
  const style = { color: "#3a4656", weight: 1, interactive: false, renderer };
  const south = Math.max(-85, Math.floor(b.getSouth() / step) * step);
  const north = Math.min(85, b.getNorth());
  const west = Math.max(-180, Math.floor(b.getWest() / step) * step);
  const east = Math.min(180, b.getEast());
  for (let lat = south; lat <= north; lat += step) {
    graticule.addLayer(L.polyline([[lat, Math.max(-180, b.getWest())], [lat, east]], style));
  }
  for (let lon = west; lon <= east; lon += step) {
    graticule.addLayer(L.polyline([[south, lon], [north, lon]], style));
  }
}

// A vehicle: an arrow coloured by status and turned to its course, drawn on
// the shared canvas (thousands of DOM markers would not stay smooth).
const VehicleMarker = L.CircleMarker.extend({
  _updatePath() {
    const r = this._renderer;
    if (!r._drawing || this._empty()) return;
    const ctx = r._ctx, p = this._point, s = this._radius;
    ctx.save();
    ctx.translate(p.x, p.y);
    ctx.rotate(((this.options.course || 0) * Math.PI) / 180);
    ctx.beginPath();
    ctx.moveTo(0, -s * 1.5); ctx.lineTo(s, s); ctx.lineTo(0, s * 0.4); ctx.lineTo(-s, s);
    ctx.closePath();
    ctx.globalAlpha = 1;
    ctx.fillStyle = this.options.fillColor;
    ctx.fill();
    ctx.lineWidth = this.options.alert ? 2.5 : 1;
    ctx.strokeStyle = this.options.alert ? "#ff2d2d" : "rgba(0,0,0,.65)";
    ctx.stroke();
    ctx.restore();
  },
});

// A server-side cluster cell (PROTOCOL §3.1 `clusters`): a disc with its count,
// ringed by the share of each status when the server sends the breakdown.
const ClusterMarker = L.CircleMarker.extend({
  _updatePath() {
    const r = this._renderer;
    if (!r._drawing || this._empty()) return;
    const ctx = r._ctx, p = this._point, s = this._radius;
    ctx.beginPath();
    ctx.arc(p.x, p.y, s, 0, 2 * Math.PI);
    ctx.globalAlpha = 0.8;
    ctx.fillStyle = "#2f7fc1";
    ctx.fill();
    ctx.globalAlpha = 1;
    ctx.lineWidth = 2;
    ctx.strokeStyle = "#cfe6ff";
    ctx.stroke();
    const by = this.options.by;
    if (Array.isArray(by) && this.options.count > 0) {
      let at = -Math.PI / 2;
      ctx.lineWidth = 4;
      STATUS_ORDER.forEach((name, k) => {
        const n = Number(by[k]) || 0;
        if (n <= 0) return;
        const span = (2 * Math.PI * n) / this.options.count;
        ctx.beginPath();
        ctx.arc(p.x, p.y, s + 1, at, at + span);
        ctx.strokeStyle = COLORS[name];
        ctx.stroke();
        at += span;
      });
    }
    ctx.fillStyle = "#fff";
    ctx.font = "bold 11px system-ui, sans-serif";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText(String(this.options.count), p.x, p.y);
  },
});

const markers = new Map();          // vehicle id → VehicleMarker
const clusterLayer = L.layerGroup().addTo(map);
const vehicleLayer = L.layerGroup().addTo(map);
let clusterCells = [];
const dirty = new Set();
let onlyAlerts = false;

function radius() { return Math.max(4, Math.min(8, map.getZoom() - 6)); }

function shown(v) { return !onlyAlerts || (v.alerts && v.alerts.length > 0); }

function place(v) {
  let m = markers.get(v.id);
  if (!shown(v)) {
    if (m) { vehicleLayer.removeLayer(m); markers.delete(v.id); }
    return;
  }
  const style = { fillColor: COLORS[v.status] || "#aab", course: v.course || 0, alert: !!(v.alerts && v.alerts.length) };
  if (!m) {
    const r = radius();
    m = new VehicleMarker([v.lat, v.lon], { renderer, radius: r, weight: r * 1.2, stroke: true, ...style });
    m.vehicleId = v.id;
    m.on("click", () => showDetails(v.id, m));
    markers.set(v.id, m);
    vehicleLayer.addLayer(m);
  } else {
    Object.assign(m.options, style);
    m.setLatLng([v.lat, v.lon]);   // redraws (the canvas renderer batches per frame)
  }
}

function frame() {
  requestAnimationFrame(frame);   // first: a bad vehicle must not stop the drawing
  if (dirty.size) {
    for (const id of dirty) {
      const v = client.vehicles.get(id);
      try {
        if (v && Number.isFinite(v.lat) && Number.isFinite(v.lon)) place(v);
        else {
          const m = markers.get(id);
          if (m) { vehicleLayer.removeLayer(m); markers.delete(id); }
        }
      } catch (e) {
        console.warn("realtime map: cannot draw", id, e);
      }
    }
    dirty.clear();
    $("count").textContent = clusterCells.length
      ? clusterCells.reduce((n, c) => n + c[2], 0) + " (clustered)" : String(client.vehicles.size);
  }
}

function drawClusters(cells) {
  clusterLayer.clearLayers();
  clusterCells = (cells || []).filter((c) => Array.isArray(c) && Number.isFinite(c[0]) && Number.isFinite(c[1]));
  for (const cell of clusterCells) {
    const [lat, lon, count, by] = cell;
    const r = 8 + 3 * Math.log2(1 + count);
    const m = new ClusterMarker([lat, lon], { renderer, radius: r, weight: 2, count, by });
    m.on("click", () => map.setView([lat, lon], Math.min(map.getZoom() + 2, 18)));
    clusterLayer.addLayer(m);
  }
  dirty.add(null);   // recount
}

// -- the client ---------------------------------------------------------------
const client = new RealtimeClient({
  url: location.origin,
  token: tokenSource,
  format: params.get("format") === "msgpack" ? "msgpack" : "json",
  transports: params.get("transports") ? params.get("transports").split(",") : undefined,
});
window.realtimeClient = client;
window.dispatcher = { map, markers, clusters: clusterLayer, graticule };   // for scripts and tests

let updates = 0;
client.on("vehicle", (v) => {
  updates++;
  if (clusterCells.length) drawClusters([]);
  dirty.add(v.id);
});
client.on("leave", (id) => dirty.add(id));
client.on("clusters", (m) => drawClusters(m.cells));
client.on("event", addEvent);
client.on("state", badge);
client.on("rtt", badge);
client.on("welcome", badge);
client.on("error", (e) => {
  console.warn("realtime:", e.message, e.code);
  if (!e.fatal) return;
  const why = e.code === 4001 ? "the token expired or was refused: reload the page with a new one"
    : e.code === 4003 ? "forbidden: " + e.message : e.message;
  $("badge-text").textContent = "closed — " + why;
});
setInterval(() => { $("rate").textContent = String(updates); updates = 0; }, 1000);

function badge() {
  const b = $("badge");
  b.dataset.state = client.state;
  b.dataset.transport = client.transport || "";
  b.dataset.recovered = String(client.recovered);
  const parts = [client.transport || "—", client.state];
  if (client.rtt !== null) parts.push(client.rtt + " ms");
  if (client.resumed) parts.push(client.recovered ? "resumed, recovered" : "resumed, not recovered");
  $("badge-text").textContent = parts.join(" · ");
}

// as Leaflet gives them: the library clamps latitudes and wraps longitudes
// (a view across the antimeridian has east < west)
function viewBounds() {
  const b = map.getBounds();
  return { north: b.getNorth(), south: b.getSouth(), east: b.getEast(), west: b.getWest() };
}

function checked(id) {
  return [...document.querySelectorAll("#" + id + " input:checked")].map((i) => i.value);
}

function filters() {
  // "only vehicles with alerts" needs the alerts: it implies "show alerts"
  const f = { show_alerts: $("show-alerts").checked || $("only-alerts").checked };
  const st = checked("filter-status");
  if (st.length < 4) f.status = st;
  const vt = checked("filter-type");
  if (vt.length < 4) f.vehicle_types = vt;
  return f;
}

function subscription() {
  return { geographic: { bounds: viewBounds(), zoom: map.getZoom() }, filters: filters() };
}

let vpTimer = null;
map.on("moveend", () => {
  drawGraticule();
  clearTimeout(vpTimer);
  vpTimer = setTimeout(() => client.viewport(viewBounds(), map.getZoom()), VIEWPORT_DEBOUNCE_MS);
});
map.on("zoomend", () => {
  const r = radius();
  for (const m of markers.values()) { m.setRadius(r); m.options.weight = r * 1.2; }
});
for (const input of document.querySelectorAll("#panel input")) {
  input.addEventListener("change", () => {
    // an empty list means "no filter" on the wire: the last box of a group stays checked
    const group = input.closest("fieldset");
    if (group.id !== "filter-alerts" && !group.querySelector("input:checked")) { input.checked = true; return; }
    onlyAlerts = $("only-alerts").checked;
    for (const id of client.vehicles.keys()) dirty.add(id);
    client.subscribe(subscription()).catch((e) => console.warn("subscribe:", e.message));
  });
}

// -- details and alerts -----------------------------------------------------------
async function showDetails(id, marker) {
  const popup = L.popup({ maxWidth: 320 }).setLatLng(marker.getLatLng())
    .setContent('<div class="vehicle-popup">loading ' + esc(id) + "…</div>").openOn(map);
  try {
    const d = await client.get(id);
    const rows = [
      ["status", d.status], ["type", d.vehicle_type],
      ["speed", d.speed != null ? Math.round(d.speed) + " km/h" : ""],
      ["course", d.course != null ? Math.round(d.course) + "°" : ""],
      ["groups", (d.groups || []).join(", ")],
      ["driver", d.driver ? d.driver.name : ""],
    ];
    if (d.driver && d.driver.phone) rows.push(["phone", d.driver.phone]);   // only with view_driver_contacts
    for (const [k, v] of Object.entries(d.assignment || {})) rows.push([k, typeof v === "object" ? JSON.stringify(v) : v]);
    rows.push(["updated", d.timestamp]);
    const alerts = (d.alerts || []).map((a) => '<div class="alert">⚠ ' + esc(a) + "</div>").join("");
    popup.setContent('<div class="vehicle-popup" data-vehicle="' + esc(id) + '"><h3>' + esc(id) + "</h3><dl>" +
      rows.filter(([, v]) => v !== "" && v != null).map(([k, v]) => "<dt>" + esc(k) + "</dt><dd>" + esc(v) + "</dd>").join("") +
      "</dl>" + alerts + "</div>");
  } catch (e) {
    popup.setContent('<div class="vehicle-popup">' + esc(id) + ": " + esc(e.message) + "</div>");
  }
}

let alertCount = 0;
function addEvent(m) {
  const list = $("alert-list");
  const li = document.createElement("li");
  li.dataset.eid = m.eid || "";
  li.dataset.vehicle = m.v;
  const when = new Date(m.ts || Date.now()).toLocaleTimeString();
  const body = m.d && typeof m.d === "object" ? Object.entries(m.d).map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ") : String(m.d ?? "");
  li.innerHTML = "<time>" + esc(when) + "</time><b>" + esc(m.v) + '</b> <span class="kind">' + esc(m.e) + "</span> " + esc(body);
  li.addEventListener("click", () => {
    const v = client.vehicles.get(m.v);
    if (v) map.setView([v.lat, v.lon], Math.max(map.getZoom(), 14));
  });
  list.insertBefore(li, list.firstChild);
  while (list.childNodes.length > MAX_ALERTS) list.removeChild(list.lastChild);
  $("alert-count").textContent = String(++alertCount);
}

// -- start ---------------------------------------------------------------------
drawGraticule();
badge();
requestAnimationFrame(frame);
client.subscribe(subscription()).catch(() => {});   // the connection starts with it
// the first connect may find the server restarting: try again, unless the token is the problem
(function start(delay) {
  client.connect().catch((e) => {
    if (e.code === 4001 || e.code === 4003) return;   // shown by the error listener
    $("badge-text").textContent = "cannot connect (" + e.message + "): trying again";
    setTimeout(() => start(Math.min(delay * 2, 20000)), delay);
  });
})(2000);
