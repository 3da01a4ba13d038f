"""Key rotation without restarts (issue 13 part 3, docs/security.md): SIGHUP
reloads the TLS certificate and the JWT keys while connections stay open; a
JWKS file that changes is picked up without a signal; a reload that fails
keeps the old material and says why. Real server processes throughout."""
import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request

import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from websockets.exceptions import ConnectionClosed

from conftest import Server, both_ready, token

pytestmark = pytest.mark.integration


def make_cert(d, name: str) -> tuple[str, str]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


def install(src: str, dst: str) -> None:
    """As certbot or a secrets agent does: the new file appears at once."""
    tmp = dst + ".new"
    shutil.copy(src, tmp)
    os.replace(tmp, dst)


def served_cert(port: int) -> str:
    """The PEM certificate a new TLS connection is shown."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with ctx.wrap_socket(raw) as tls:
            return ssl.DER_cert_to_PEM_cert(tls.getpeercert(binary_form=True))


def same_cert(pem_a: str, path_b: str) -> bool:
    der = ssl.PEM_cert_to_DER_cert
    return der(pem_a) == der(open(path_b).read())


def reloads(server, what: str, result: str) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10,
                                  context=ssl._create_unverified_context()).read().decode()
    m = re.search(rf'^key_reloads_total{{result="{result}",what="{what}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def welcome(url: str, **kw):
    ws = await websockets.connect(url, **kw)
    try:
        return json.loads(await ws.recv()), ws
    except ConnectionClosed as e:
        return e.rcvd.code, ws


async def still_open(ws) -> bool:
    await ws.send(json.dumps({"type": "ping", "id": "p"}))
    while True:
        m = json.loads(await asyncio.wait_for(ws.recv(), 5))
        if m.get("type") == "pong":
            return True


async def test_sighup_swaps_the_certificate_and_keeps_connections(tmp_path):
    a_cert, a_key = make_cert(tmp_path, "a")
    b_cert, b_key = make_cert(tmp_path, "b")
    cert, key = str(tmp_path / "live.crt"), str(tmp_path / "live.key")
    install(a_cert, cert)
    install(a_key, key)
    s = Server("--simulate", "0", "--tls-cert", cert, "--tls-key", key, scheme="https")
    try:
        assert same_cert(served_cert(s.port), a_cert)
        trust_a = ssl.create_default_context(cafile=a_cert)
        msg, old = await welcome(f"wss://127.0.0.1:{s.port}/ws?token={token()}", ssl=trust_a)
        assert msg["type"] == "welcome"

        # renewal: the key first, then the certificate, as two separate writes
        install(b_key, key)
        install(b_cert, cert)
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: same_cert(served_cert(s.port), b_cert), 10, "the new certificate")
        assert await still_open(old), "the connection opened under the old certificate stays up"
        trust_b = ssl.create_default_context(cafile=b_cert)
        msg, new = await welcome(f"wss://127.0.0.1:{s.port}/ws?token={token()}", ssl=trust_b)
        assert msg["type"] == "welcome"
        assert new.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await new.close()
        assert reloads(s, "tls", "ok") == 1

        # a key that does not match the certificate: refused, the old pair stays
        install(a_key, key)
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(s, "tls", "failed") == 1, 10, "the failed reload to be counted")
        assert same_cert(served_cert(s.port), b_cert)
        assert "TLS reload failed; keeping the certificate in use" in s.logs()
        msg, new = await welcome(f"wss://127.0.0.1:{s.port}/ws?token={token()}", ssl=trust_b)
        assert msg["type"] == "welcome"
        await new.close()
        # a file that is not a certificate at all: the same
        open(cert, "w").write("not a certificate\n")
        s.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reloads(s, "tls", "failed") == 2, 10, "the second failed reload")
        assert same_cert(served_cert(s.port), b_cert)
        assert await still_open(old)
        assert s.proc.poll() is None
        await old.close()
    finally:
        s.stop()


def rsa_pair(kid: str):
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, jwk


def signed(pem, kid=None, sub="u", alg="RS256"):
    now = int(time.time())
    claims = {"sub": sub, "permissions": ["view_all_vehicles"], "exp": now + 600}
    return jwt.encode(claims, pem, algorithm=alg, headers={"kid": kid} if kid else None)


def http_status(server, tok: str) -> int:
    req = urllib.request.Request(server.url + "/api/realtime/session", data=b"{}", method="POST",
                                 headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


async def test_a_changed_jwks_file_is_picked_up_without_a_signal(tmp_path):
    k1, jwk1 = rsa_pair("k1")
    k2, jwk2 = rsa_pair("k2")
    jwks = str(tmp_path / "jwks.json")
    (tmp_path / "one.json").write_text(json.dumps({"keys": [jwk1]}))
    install(str(tmp_path / "one.json"), jwks)
    s = Server("--simulate", "0", "--jwt-jwks", jwks, secret=None)
    try:
        tok1 = signed(k1, "k1")
        msg, old = await welcome(s.ws_url + "?token=" + tok1)
        assert msg["type"] == "welcome"
        assert http_status(s, tok1) == 201     # verified once, then cached
        code, _ = await welcome(s.ws_url + "?token=" + signed(k2, "k2"))
        assert code == 4001

        # the identity provider rotates: k2 in, k1 out; nobody signals the server
        (tmp_path / "two.json").write_text(json.dumps({"keys": [jwk2]}))
        install(str(tmp_path / "two.json"), jwks)
        started = time.monotonic()
        tok2 = signed(k2, "k2")
        wait_for(lambda: http_status(s, tok2) == 201, 60, "the new JWKS to be used")
        assert time.monotonic() - started < 60
        # the old key is gone for new connections and requests, cached tokens included
        assert http_status(s, tok1) == 401
        code, _ = await welcome(s.ws_url + "?token=" + tok1)
        assert code == 4001
        assert await still_open(old), "a connection authenticated with the old key stays up"
        assert "JWT keys reloaded" in s.logs()

        # a half-written JWKS: refused, k2 stays in force
        open(jwks, "w").write('{"keys": [')
        wait_for(lambda: reloads(s, "jwt", "failed") >= 1, 60, "the broken JWKS to be refused")
        assert "JWT key reload failed; keeping the keys in use" in s.logs()
        assert http_status(s, signed(k2, "k2")) == 201
        await old.close()
    finally:
        s.stop()


async def test_sighup_rereads_the_public_key_in_every_worker(tmp_path, redis_url):
    a = ec.generate_private_key(ec.SECP256R1())
    b = ec.generate_private_key(ec.SECP256R1())

    def pems(k):
        private = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
        public = k.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)
        return private, public
    a_private, a_public = pems(a)
    b_private, b_public = pems(b)
    pub = tmp_path / "public.pem"
    pub.write_bytes(a_public)
    s = Server("--simulate", "0", "--workers", "2", "--redis", redis_url, "--jwt-public-key", str(pub),
               secret=None)
    try:
        wait_for(lambda: s.logs().count("listening on") == 2, 20, "both workers to listen")
        both_ready(s)   # a worker without the owner's fleet yet refuses clients (1013)
        tok_a, tok_b = signed(a_private, alg="ES256"), signed(b_private, alg="ES256")
        assert http_status(s, tok_a) == 201
        msg, old = await welcome(s.ws_url + "?token=" + tok_a)
        assert msg["type"] == "welcome"
        (tmp_path / "next.pem").write_bytes(b_public)
        install(str(tmp_path / "next.pem"), str(pub))
        s.proc.send_signal(signal.SIGHUP)   # the supervisor: it passes it on to each worker

        def by_signal():   # not the file watch: each worker's reload says why
            return [json.loads(line) for line in open(s.log.name).read().splitlines()
                    if line.startswith("{") and '"why": "SIGHUP"' in line]
        wait_for(lambda: len(by_signal()) == 2, 10, "both workers to reload on the signal")
        assert len({d["msg"] for d in by_signal()} - {"JWT keys reloaded", "JWT keys unchanged"}) == 0
        # new connections land on either worker: each must take b and refuse a
        for _ in range(6):
            assert http_status(s, tok_b) == 201
            assert http_status(s, tok_a) == 401
        assert await still_open(old)
        await old.close()
        assert s.proc.poll() is None, "SIGHUP must not stop the server"
    finally:
        s.stop()


def test_sighup_does_not_stop_a_server_without_keys_to_reload():
    s = Server("--simulate", "0")
    try:
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert s.proc.poll() is None
        assert urllib.request.urlopen(s.url + "/health/live", timeout=5).status == 200
    finally:
        s.stop()
