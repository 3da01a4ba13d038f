"""Integration: TLS 1.3 only, allowed origins, connection limits, RS256 tokens from a JWKS."""
import asyncio
import json
import ssl
import subprocess
import time

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conftest import Server, token

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    s = Server("--simulate", "0", "--tls-cert", str(cert), "--tls-key", str(key),
               "--allowed-origins", "https://dispatch.example", "--max-connections-per-user", "2",
               scheme="https")
    s.cert = str(cert)
    yield s
    s.stop()


def client_ctx(cert, max_version=None):
    ctx = ssl.create_default_context(cafile=cert)
    if max_version:
        ctx.maximum_version = max_version
    return ctx


async def first_or_close(url, **kw):
    ws = await websockets.connect(url, **kw)
    try:
        return json.loads(await ws.recv()), ws
    except ConnectionClosed as e:
        return e.rcvd.code, ws


async def test_wss_with_tls13_and_no_tls12(tls_server):
    url = f"wss://127.0.0.1:{tls_server.port}/ws?token={token()}"
    msg, ws = await first_or_close(url, ssl=client_ctx(tls_server.cert))
    assert msg["type"] == "welcome"
    assert ws.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
    await ws.close()
    with pytest.raises((ssl.SSLError, OSError, InvalidHandshake)):
        await websockets.connect(url, ssl=client_ctx(tls_server.cert, ssl.TLSVersion.TLSv1_2))


async def test_origin_must_be_allowed(tls_server):
    url = f"wss://127.0.0.1:{tls_server.port}/ws?token={token()}"
    code, ws = await first_or_close(url, ssl=client_ctx(tls_server.cert), origin="https://evil.example")
    assert code == 4003
    msg, ws = await first_or_close(url, ssl=client_ctx(tls_server.cert), origin="https://dispatch.example")
    assert msg["type"] == "welcome"
    await ws.close()


async def test_connections_per_user_are_limited(tls_server):
    url = f"wss://127.0.0.1:{tls_server.port}/ws?token={token(sub='greedy')}"
    open_ = []
    for _ in range(2):
        msg, ws = await first_or_close(url, ssl=client_ctx(tls_server.cert))
        assert msg["type"] == "welcome"
        open_.append(ws)
    code, _ = await first_or_close(url, ssl=client_ctx(tls_server.cert))
    assert code == 1008
    await open_[0].close()
    # the server frees the slot once it has seen the close: try until it has
    deadline = time.monotonic() + 20
    while True:
        msg, ws = await first_or_close(url, ssl=client_ctx(tls_server.cert))
        if msg != 1008 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.1)
    assert msg["type"] == "welcome"
    for w in open_[1:] + [ws]:
        await w.close()


async def test_rs256_tokens_checked_against_a_jwks(tmp_path):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": "k1", "use": "sig", "alg": "RS256"})
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    s = Server("--simulate", "0", "--jwt-jwks", str(tmp_path / "jwks.json"), "--jwt-issuer", "idp",
               secret=None)
    try:
        now = int(time.time())
        claims = {"sub": "u", "permissions": ["view_all_vehicles"], "exp": now + 60, "iss": "idp"}
        good = jwt.encode(claims, pem, algorithm="RS256", headers={"kid": "k1"})
        msg, ws = await first_or_close(s.ws_url + "?token=" + good)
        assert msg["type"] == "welcome"
        await ws.close()
        wrong_iss = jwt.encode({**claims, "iss": "other"}, pem, algorithm="RS256", headers={"kid": "k1"})
        hs = token()  # an HS256 token cannot pass for an RS256 one
        for bad in (wrong_iss, hs):
            code, _ = await first_or_close(s.ws_url + "?token=" + bad)
            assert code == 4001
    finally:
        s.stop()
