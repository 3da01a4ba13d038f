"""SSE and long polling behind a real nginx (Debian's package), configured
with the server block of docs/deployment.md as it is written there: only the
upstream addresses, the listening address and the certificate paths are
replaced. The proxy must pass SSE events one by one, unbuffered, and must
not cut off a 30 s poll."""
import asyncio
import re
import shutil
import ssl
import subprocess
import time

import aiohttp
import pytest

from conftest import ROOT, Server, free_port, ingest, require, token, update
from test_sse import events

pytestmark = pytest.mark.integration


def documented_nginx() -> str:
    text = (ROOT / "docs" / "deployment.md").read_text()
    m = re.search(r"## nginx\s+```nginx\n(.*?)```", text, re.S)
    assert m, "docs/deployment.md has no nginx configuration"
    return m.group(1)


@pytest.fixture(scope="module")
def proxied(tmp_path_factory):
    require("nginx", shutil.which("nginx") is not None)
    d = tmp_path_factory.mktemp("nginx")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = Server("--simulate", "0", "--tick-ms", "50", "--heartbeat-s", "20")
    port = free_port()
    conf = documented_nginx()
    conf = re.sub(r"(upstream realtime \{.*?)(\s+server [^;]+;)+", lambda m: m.group(1) +
                  f"\n    server 127.0.0.1:{server.port} max_fails=2 fail_timeout=5s;", conf, count=1, flags=re.S)
    conf = conf.replace("listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    conf = conf.replace("/etc/ssl/dispatch.pem", str(cert)).replace("/etc/ssl/dispatch.key", str(key))
    conf = conf.replace("/var/log/nginx/realtime.access.log", str(d / "realtime.access.log"))
    assert f"127.0.0.1:{server.port}" in conf and f"127.0.0.1:{port}" in conf
    for t in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (d / t).mkdir()
    (d / "nginx.conf").write_text(f"""
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
{conf}
}}
""")
    check = subprocess.run(["nginx", "-t", "-p", str(d), "-c", str(d / "nginx.conf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen(["nginx", "-p", str(d), "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 10
    import socket
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert time.time() < deadline and proc.poll() is None, "nginx did not start"
            time.sleep(0.1)
    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    server.access_log = d / "realtime.access.log"
    yield server, f"https://127.0.0.1:{port}", ctx
    proc.terminate()
    proc.wait(10)
    server.stop()


async def test_sse_and_a_30_s_poll_pass_through_nginx(proxied, uid):
    server, url, ctx = proxied
    auth = {"Authorization": f"Bearer {token()}"}
    ingest(server, [update(uid, 55.75, 37.62)])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.post(f"{url}/api/realtime/session", json={"subscriptions": {"vehicles": [uid]}},
                             headers=auth) as r:
            assert r.status == 201
            sid = (await r.json())["session"]
        async with http.get(f"{url}/api/realtime/poll", params={"session": sid, "cursor": "0", "timeout": "1"},
                            headers=auth) as r:
            assert r.status == 200
            cursor = (await r.json())["cursor"]

        async def long_poll():
            t0 = time.monotonic()
            async with http.get(f"{url}/api/realtime/poll",
                                params={"session": sid, "cursor": str(cursor), "timeout": "30"}, headers=auth) as r:
                return r.status, await r.json(), time.monotonic() - t0
        waiting = asyncio.ensure_future(long_poll())

        # SSE meanwhile: each event arrives on its own, right after its update
        other = uid + "sse"
        ingest(server, [update(other, 50.0, 30.0)])
        async with http.get(f"{url}/api/realtime/stream", headers=auth) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            await events(resp, lambda ev: any(e == "batch" for e, _, _ in ev))
            for k in range(4):
                lat = round(50.01 + k / 100, 6)
                t0 = time.monotonic()
                ingest(server, [update(other, lat, 30.0)])
                got = await events(resp, lambda ev: any(e == "batch" and any(
                    m.get("v") == other and m.get("p", [0])[0] == lat for m in d["messages"]) for e, _, d in ev),
                    timeout=5)
                assert time.monotonic() - t0 < 1.5, "the proxy held the event back"
                await asyncio.sleep(0.5)
        status, body, took = await waiting
        assert status == 200, body
        assert body["messages"] == [] and body["cursor"] == cursor
        assert 29 <= took < 40, took


async def test_a_query_token_stays_out_of_the_documented_access_log(proxied):
    """`?token=` (an EventSource cannot set headers) passes through nginx to
    the server, and the access log of docs/deployment.md records the request
    without it (docs/security.md)."""
    server, url, ctx = proxied
    tok = token()
    # The module's server is shared: count from what earlier tests left.
    before = server.access_log.read_text().count("GET /api/realtime/stream ")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as http:
        async with http.get(f"{url}/api/realtime/stream", params={"token": tok}) as resp:
            assert resp.status == 200
            await resp.content.readline()
        async with http.get(f"{url}/api/realtime/stream", params={"token": "forged" + tok[-20:]}) as resp:
            assert resp.status == 401
    # A stream is logged when it ends, and the server learns that the proxy
    # dropped it at its next write: the keepalive comment, within 15 s.
    deadline = time.monotonic() + 20
    while (server.access_log.read_text().count("GET /api/realtime/stream ") < before + 2
           and time.monotonic() < deadline):
        await asyncio.sleep(0.1)
    text = server.access_log.read_text()
    assert text.count("GET /api/realtime/stream ") >= before + 2, text[-500:]
    assert tok not in text and tok.split(".")[2] not in text and "token=" not in text
