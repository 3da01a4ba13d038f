// The dispatcher map: a canvas in Web Mercator, no tiles (nothing may be
// fetched from the internet), with Moscow's ring roads drawn for orientation.
(function () {
  "use strict";
  var canvas = document.getElementById("map");
  var ctx = canvas.getContext("2d");
  var center = { lat: 55.7558, lon: 37.6173 };
  var zoom = 11;
  var COLORS = { moving: "#4c4", idle: "#fc3", stopped: "#f63", offline: "#888", unknown: "#aaa" };

  function token() {
    var q = new URLSearchParams(location.search).get("token");
    if (q) return q;
    if (window.REALTIME_DEMO_TOKEN && window.REALTIME_DEMO_TOKEN.indexOf("__") !== 0) return window.REALTIME_DEMO_TOKEN;
    return window.prompt("Access token (JWT)") || "";
  }
  function project(lat, lon) {
    var s = 256 * Math.pow(2, zoom);
    var x = (lon + 180) / 360 * s;
    var sin = Math.sin(lat * Math.PI / 180);
    var y = (0.5 - Math.log((1 + sin) / (1 - sin)) / (4 * Math.PI)) * s;
    return [x, y];
  }
  function unproject(x, y) {
    var s = 256 * Math.pow(2, zoom);
    var lon = x / s * 360 - 180;
    var n = Math.PI - 2 * Math.PI * y / s;
    var lat = 180 / Math.PI * Math.atan(0.5 * (Math.exp(n) - Math.exp(-n)));
    return [lat, lon];
  }
  function toScreen(lat, lon) {
    var c = project(center.lat, center.lon), p = project(lat, lon);
    return [p[0] - c[0] + canvas.width / 2, p[1] - c[1] + canvas.height / 2];
  }
  function bounds() {
    var c = project(center.lat, center.lon);
    var nw = unproject(c[0] - canvas.width / 2, c[1] - canvas.height / 2);
    var se = unproject(c[0] + canvas.width / 2, c[1] + canvas.height / 2);
    return { north: Math.min(85, nw[0]), south: Math.max(-85, se[0]),
             west: Math.max(-180, nw[1]), east: Math.min(180, se[1]) };
  }
  function ring(km) {
    ctx.beginPath();
    for (var a = 0; a <= 64; a++) {
      var ang = a / 64 * 2 * Math.PI;
      var lat = center0.lat + km * Math.sin(ang) / 111.32;
      var lon = center0.lon + km * Math.cos(ang) / (111.32 * Math.cos(center0.lat * Math.PI / 180));
      var p = toScreen(lat, lon);
      if (a === 0) ctx.moveTo(p[0], p[1]); else ctx.lineTo(p[0], p[1]);
    }
    ctx.stroke();
  }
  var center0 = { lat: 55.7558, lon: 37.6173 };
  function draw() {
    ctx.fillStyle = "#10141a";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.strokeStyle = "#2a3340"; ctx.lineWidth = 3;
    [17.5, 6.0, 2.3].forEach(ring);
    ctx.lineWidth = 1; ctx.strokeStyle = "#222a35";
    for (var k = 0; k < 12; k++) {
      var ang = k * Math.PI / 6;
      var a = toScreen(center0.lat, center0.lon);
      var b = toScreen(center0.lat + 24 * Math.sin(ang) / 111.32,
                       center0.lon + 24 * Math.cos(ang) / (111.32 * 0.5628));
      ctx.beginPath(); ctx.moveTo(a[0], a[1]); ctx.lineTo(b[0], b[1]); ctx.stroke();
    }
    if (client.clusters) {
      var total = 0;
      ctx.textAlign = "center"; ctx.textBaseline = "middle"; ctx.font = "11px system-ui";
      client.clusters.forEach(function (cell) {
        var p = toScreen(cell[0], cell[1]);
        var rad = 6 + 3 * Math.log2(1 + cell[2]);
        total += cell[2];
        ctx.fillStyle = "rgba(76,160,220,.55)";
        ctx.beginPath(); ctx.arc(p[0], p[1], rad, 0, 2 * Math.PI); ctx.fill();
        ctx.fillStyle = "#fff"; ctx.fillText(String(cell[2]), p[0], p[1]);
      });
      document.getElementById("count").textContent = total + " (clustered)";
      return;
    }
    var r = Math.max(2, Math.min(6, zoom - 8));
    client.vehicles.forEach(function (v) {
      var p = toScreen(v.p[0], v.p[1]);
      ctx.fillStyle = COLORS[v.st] || "#aaa";
      ctx.beginPath(); ctx.arc(p[0], p[1], r, 0, 2 * Math.PI); ctx.fill();
      if (v.al && v.al.length) { ctx.strokeStyle = "#f33"; ctx.lineWidth = 1.5; ctx.stroke(); }
    });
    document.getElementById("count").textContent = client.vehicles.size;
  }
  function resize() {
    canvas.width = window.innerWidth; canvas.height = window.innerHeight;
    sendViewport(); draw();
  }
  var vpTimer = null;
  function sendViewport() {
    clearTimeout(vpTimer);
    vpTimer = setTimeout(function () { client.viewport(bounds(), zoom); }, 80);
  }

  var client = new RealtimeClient({
    url: (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws",
    token: token(),
    onstatus: function (s) {
      document.getElementById("conn").textContent = s;
      if (s === "connected") client.subscription = { subscriptions: { geographic: { bounds: bounds(), zoom: zoom } } };
    },
    onchange: function () { dirty = true; },
    onevent: function (e) {
      var box = document.getElementById("events");
      var line = document.createElement("div");
      line.textContent = e.v + ": " + e.e + " " + JSON.stringify(e.d);
      box.insertBefore(line, box.firstChild);
      while (box.childNodes.length > 8) box.removeChild(box.lastChild);
    }
  });
  window.realtimeClient = client;
  var dirty = true;
  (function frame() { if (dirty) { draw(); dirty = false; } requestAnimationFrame(frame); })();
  var lastCount = 0;
  setInterval(function () {
    document.getElementById("rate").textContent = client.updates - lastCount;
    lastCount = client.updates;
  }, 1000);

  var drag = null;
  canvas.addEventListener("mousedown", function (e) { drag = [e.clientX, e.clientY]; canvas.style.cursor = "grabbing"; });
  window.addEventListener("mouseup", function () { drag = null; canvas.style.cursor = "grab"; });
  window.addEventListener("mousemove", function (e) {
    if (drag) {
      var c = project(center.lat, center.lon);
      var ll = unproject(c[0] - (e.clientX - drag[0]), c[1] - (e.clientY - drag[1]));
      center.lat = ll[0]; center.lon = ll[1];
      drag = [e.clientX, e.clientY];
      dirty = true; sendViewport();
      return;
    }
    var tip = document.getElementById("tip"), best = null, bd = 64;
    client.vehicles.forEach(function (v) {
      var p = toScreen(v.p[0], v.p[1]);
      var d = (p[0] - e.clientX) * (p[0] - e.clientX) + (p[1] - e.clientY) * (p[1] - e.clientY);
      if (d < bd) { bd = d; best = v; }
    });
    if (best) {
      tip.style.display = "block"; tip.style.left = (e.clientX + 12) + "px"; tip.style.top = (e.clientY + 12) + "px";
      tip.textContent = best.v + " · " + best.vt + " · " + best.st + "\n" + best.s + " km/h" +
        (best.dr ? "\n" + best.dr.name : "") + (best.al && best.al.length ? "\n⚠ " + best.al.join(", ") : "");
    } else tip.style.display = "none";
  });
  canvas.addEventListener("wheel", function (e) {
    e.preventDefault();
    zoom = Math.max(3, Math.min(18, zoom + (e.deltaY < 0 ? 0.5 : -0.5)));
    dirty = true; sendViewport();
  }, { passive: false });
  window.addEventListener("resize", resize);
  resize();
})();
