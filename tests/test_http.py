"""Integration: POST /api/ingest, GET /api/vehicles/{id}, health, the map page."""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import ROOT, SECRET, ingest, token, update

pytestmark = pytest.mark.integration


def get(server, path, tok=None):
    req = urllib.request.Request(server.url + path,
                                 headers={"Authorization": f"Bearer {tok}"} if tok else {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_ingest_accepts_and_rejects_by_index(server, uid):
    status, body = ingest(server, [
        update(uid + "ok"),
        {"vehicle_id": uid + "x", "timestamp": "2024-01-15T10:30:00.123Z"},       # no position
        update(uid + "lat", 91.0, 0.0),                                            # lat out of range
        update("", 1, 1),                                                          # empty id
        update(uid + "ts", ts="yesterday"),                                        # bad timestamp
        "not an object",
        update(uid + "iso", ts="2024-01-15T10:30:00.123Z", heading=45),
    ])
    assert status == 200
    assert body["accepted"] == 2
    assert [(r["index"], r["reason"]) for r in body["rejected"]] == [
        (1, "missing_field"), (2, "invalid_position"), (3, "invalid_vehicle_id"),
        (4, "invalid_timestamp"), (5, "not_object")]
    status, raw = get(server, f"/api/vehicles/{uid}iso", token())
    d = json.loads(raw)
    assert status == 200 and d["timestamp"] == "2024-01-15T10:30:00.123Z" and d["course"] == 45


def test_ingest_ndjson(server, uid):
    lines = b"\n".join(json.dumps(update(uid + str(i))).encode() for i in range(3)) + b"\n{broken\n"
    status, body = ingest(server, None, raw=lines)
    assert status == 200 and body["accepted"] == 3
    assert body["rejected"][0]["index"] == 3 and body["rejected"][0]["reason"] == "invalid_json"


def test_ingest_needs_the_ingest_permission(server):
    """...and its errors, as every HTTP error here, are §3's error shape
    (`type`, `code`, `message`; `error` repeats the code)."""
    for (status, body), (want, code) in (
            (ingest(server, [], tok="garbage"), (401, "unauthorized")),
            (ingest(server, [], tok=token(permissions=["view_all_vehicles"])), (403, "forbidden")),
            (ingest(server, None, raw=b"[1,2"), (400, "bad_request"))):
        assert status == want
        assert body["type"] == "error" and body["code"] == body["error"] == code and body["message"]
    status, raw = get(server, "/api/vehicles/nobody-has-this-one", token())
    assert status == 404 and json.loads(raw)["code"] == "not_found" and json.loads(raw)["type"] == "error"


def test_vehicle_long_form_and_rights(server, uid):
    vid = uid + "lf"
    ingest(server, [update(vid, 55.5, 37.5, 1705314600123, speed=65.2, course=180, status="moving",
                           vehicle_type="truck", groups=["north_fleet"],
                           driver={"name": "Иванов И.И.", "phone": "+79161234567"},
                           assignment={"client": "ООО Ромашка", "eta": "11:15"}, alerts=["a"])])
    status, raw = get(server, f"/api/vehicles/{vid}", token(permissions=["view_all_vehicles"]))
    d = json.loads(raw)
    assert status == 200
    assert d == {"type": "vehicle_update", "vehicle_id": vid, "position": {"lat": 55.5, "lon": 37.5},
                 "speed": 65.2, "course": 180.0, "status": "moving", "vehicle_type": "truck",
                 "groups": ["north_fleet"], "driver": {"name": "Иванов И.И."},
                 "assignment": {"client": "ООО Ромашка", "eta": "11:15"}, "alerts": ["a"],
                 "timestamp": "2024-01-15T10:30:00.123Z"}
    status, raw = get(server, f"/api/vehicles/{vid}",
                      token(permissions=["view_all_vehicles", "view_driver_contacts"]))
    assert json.loads(raw)["driver"]["phone"] == "+79161234567"
    assert get(server, f"/api/vehicles/{vid}", token(permissions=[], vehicles=["x"]))[0] == 403
    assert get(server, f"/api/vehicles/{vid}", token(permissions=[], groups=["north_fleet"]))[0] == 200
    assert get(server, f"/api/vehicles/{uid}missing", token())[0] == 404
    assert get(server, f"/api/vehicles/{vid}")[0] == 401


def test_health_and_map_page(server):
    status, raw = get(server, "/health/live")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, raw = get(server, "/")
    assert status == 200 and b"/static/map.js" in raw and b"/static/vendor/leaflet/leaflet.js" in raw
    for asset in ("map.js", "map.css", "realtime-client.js"):
        assert get(server, "/static/" + asset)[0] == 200, asset
    # the page's settings are JSON in a script: the tile template is there, no placeholder left
    assert b"__REALTIME_CONFIG__" not in raw and b"tile.openstreetmap.org" in raw
    # with a key configured: no embedded token, and no token minted for anyone who asks
    assert b'"token": ""' in raw and b'"dev": false' in raw
    assert get(server, "/dev/token")[0] == 404


def test_vendored_browser_libraries_are_served_with_their_licenses(server):
    """Leaflet and the msgpack decoder, vendored from npm (realtime/web/vendor/README.md):
    served from the package, an ES module as JavaScript, each with its license."""
    import urllib.request
    for path, kind in (("/static/vendor/msgpack/index.mjs", "javascript"),
                       ("/static/vendor/msgpack/utils/utf8.mjs", "javascript"),
                       ("/static/vendor/leaflet/leaflet.js", "javascript"),
                       ("/static/vendor/leaflet/leaflet.css", "text/css"),
                       ("/static/vendor/leaflet/images/marker-icon.png", "image/png")):
        with urllib.request.urlopen(server.url + path, timeout=5) as r:
            assert r.status == 200 and kind in r.headers["Content-Type"], (path, r.headers["Content-Type"])
            assert r.read()
    for lib in ("leaflet", "msgpack"):
        assert get(server, f"/static/vendor/{lib}/LICENSE")[0] == 200
    assert b"export" in get(server, "/static/vendor/msgpack/index.mjs")[1]


def test_cli_token_is_accepted_by_the_server(server):
    out = subprocess.run([sys.executable, "-m", "realtime", "token", "--sub", "cli-user",
                          "--perm", "view_all_vehicles", "--ttl", "60", "--jwt-secret", SECRET],
                         cwd=ROOT, capture_output=True, text=True, check=True)
    tok = out.stdout.strip()
    assert get(server, "/api/vehicles/none", tok)[0] == 404
    # signed with the algorithm the server is configured for, which verifies it
    import jwt
    env = {**os.environ, "REALTIME_JWT_ALGORITHMS": "HS512"}
    out = subprocess.run([sys.executable, "-m", "realtime", "token", "--sub", "cli-user", "--ttl", "60",
                          "--jwt-secret", SECRET], cwd=ROOT, capture_output=True, text=True, check=True, env=env)
    tok = out.stdout.strip()
    assert jwt.get_unverified_header(tok)["alg"] == "HS512"
    assert jwt.decode(tok, SECRET, algorithms=["HS512"])["sub"] == "cli-user"


def test_workers_without_redis_refuse_to_start():
    p = subprocess.run([sys.executable, "-m", "realtime", "serve", "--workers", "2", "--port", "1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert p.returncode != 0 and "--redis" in p.stderr


def test_env_options_are_read():
    import argparse

    from realtime import config
    ns = argparse.Namespace(**{k: None for k in config.Settings.__dataclass_fields__})
    s = config.from_args(ns, env={"REALTIME_PORT": "9123", "REALTIME_TICK_MS": "25",
                                  "REALTIME_JWT_SECRET": "x" * 32})
    assert s.port == 9123 and s.tick_ms == 25 and s.jwt_secret == "x" * 32
    assert not s.development and s.simulate_count == 0   # a key: nothing simulated unless asked


def test_metrics_names(server, uid):
    ingest(server, [update(uid + "m"), {"vehicle_id": uid + "bad", "timestamp": 1}])
    status, raw = get(server, "/metrics")
    text = raw.decode()
    assert status == 200
    for name in ("websocket_connections_active", "messages_sent_total", "subscriptions_per_user_avg",
                 "redis_operations_total", "ingest_updates_total", "ingest_rejected_total",
                 "vehicle_types_overflowed_total"):
        assert name in text, name
    assert 'ingest_rejected_total{reason="missing_field"}' in text
