"""Key material that changes while the server runs: the TLS certificate and
key, the JWT public key and the JWKS (docs/security.md, "Key rotation").

SIGHUP reloads all of it; a JWKS or public-key file that changes on disk is
picked up within WATCH_S without a signal. A reload builds the new material
completely and only then swaps it in, so a missing file, a half-written PEM or
a key that does not match its certificate keeps the old material, and the
log says why. Open connections are never touched: a TLS session keeps the
keys it was set up with, and a connection's token was checked when it opened
(its next `refresh` is checked against the new keys).
"""
from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl

log = logging.getLogger("realtime.keys")

WATCH_S = 2.0   # "within a minute" (issue 13); a stat of a few files every 2 s costs nothing


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3  # PROTOCOL §7: TLS 1.3 only
    ctx.load_cert_chain(cert, key)
    return ctx


def _not_after(cert_pem: bytes) -> float:
    """The certificate's expiry as a Unix time (the first one of a chain)."""
    from cryptography import x509
    c = x509.load_pem_x509_certificate(cert_pem)
    after = getattr(c, "not_valid_after_utc", None)   # cryptography >= 42
    if after is None:
        after = c.not_valid_after.replace(tzinfo=datetime.timezone.utc)
    return after.timestamp()


class Tls:
    """The listener's TLS material. The listening socket keeps one context
    (`front`) for good; its SNI callback, which OpenSSL calls for every
    ClientHello (with or without a server name), moves each new handshake to
    the newest context. gRPC asks `grpc_config` at each handshake."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self.front, self.pem = self._load()
        self.current = self.front
        self.front.sni_callback = self._pick
        self.not_after = _not_after(self.pem[1])
        self.generation = 0

    def _pick(self, obj, _server_name, ctx) -> None:
        current = self.current
        if current is not ctx:
            obj.context = current
        return None

    def _read(self) -> tuple[bytes, bytes]:
        with open(self.key, "rb") as k, open(self.cert, "rb") as c:
            return k.read(), c.read()

    def _load(self) -> tuple[ssl.SSLContext, tuple[bytes, bytes]]:
        """A context and the (key, certificate) bytes it was made from.
        OpenSSL reads the files itself, so they are read before and after it:
        a renewal that lands in between is tried again, or the context, the
        expiry and gRPC's pair could each hold another certificate."""
        for _ in range(3):
            before = self._read()
            ctx = tls_context(self.cert, self.key)   # also checks that the key matches
            if self._read() == before:
                return ctx, before
        raise RuntimeError("the certificate or key changed while being read, three times")

    def reload(self) -> bool:
        """True when the files hold a new certificate or key (now in use);
        raises (keeping the old material) when they cannot be loaded."""
        ctx, pem = self._load()
        if pem == self.pem:
            return False
        not_after = _not_after(pem[1])
        self.current, self.pem, self.not_after = ctx, pem, not_after
        self.generation += 1
        return True

    def grpc_fetcher(self):
        """For grpc.dynamic_ssl_server_credentials: called at each handshake,
        in a gRPC thread; answers a new configuration only when there is one."""
        import grpc
        served = [self.generation]

        def fetch():
            if served[0] == self.generation:
                return None
            served[0] = self.generation
            return grpc.ssl_server_certificate_configuration([self.pem])
        return fetch

    def grpc_credentials(self):
        import grpc
        initial = grpc.ssl_server_certificate_configuration([self.pem])
        return grpc.dynamic_ssl_server_credentials(initial, self.grpc_fetcher())


def _stamp(path: str | None):
    """What says a file changed: inode (an atomic rename), size and mtime."""
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class Keys:
    """Reloads the TLS material and the authenticator's keys on SIGHUP, and
    the JWT key files when they change on disk. Counts every reload by
    what and result for GET /metrics."""

    def __init__(self, settings, auth, tls: Tls | None):
        self.settings, self.auth, self.tls = settings, auth, tls
        self.counts: dict[tuple[str, str], int] = {}
        self._files = [p for p in (settings.jwt_jwks, settings.jwt_public_key) if p]
        self._stamps = {p: _stamp(p) for p in self._files}
        self._task: asyncio.Task | None = None

    def _count(self, what: str, result: str) -> None:
        self.counts[(what, result)] = self.counts.get((what, result), 0) + 1

    def reload(self, why: str = "SIGHUP") -> None:
        """Everything, each part on its own: a bad certificate does not stop
        new JWT keys, nor the other way round."""
        if self.tls is not None:
            self._tls(why)
        if self._files:
            self._jwt(why)

    def _tls(self, why: str) -> None:
        try:
            changed = self.tls.reload()
        except Exception as e:   # ssl.SSLError, OSError, a PEM cryptography cannot read
            self._count("tls", "failed")
            log.error("TLS reload failed; keeping the certificate in use", extra={"fields": {
                "why": why, "cert": self.tls.cert, "key": self.tls.key, "error": str(e)[:300]}})
            return
        self._count("tls", "ok" if changed else "unchanged")
        log.info("TLS certificate reloaded" if changed else "TLS certificate unchanged", extra={"fields": {
            "why": why, "cert": self.tls.cert, "not_after": int(self.tls.not_after)}})

    def _jwt(self, why: str) -> None:
        self._stamps = {p: _stamp(p) for p in self._files}   # before reading: a later write is seen again
        try:
            changed = self.auth.reload_keys(self.settings)
        except Exception as e:
            self._count("jwt", "failed")
            log.error("JWT key reload failed; keeping the keys in use", extra={"fields": {
                "why": why, "files": self._files, "error": str(e)[:300]}})
            return
        self._count("jwt", "ok" if changed else "unchanged")
        log.info("JWT keys reloaded" if changed else "JWT keys unchanged", extra={"fields": {
            "why": why, "files": self._files, "keys": self.auth.key_count()}})

    def start(self) -> None:
        if self._files:
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_S)
            try:
                if any(_stamp(p) != self._stamps.get(p) for p in self._files):
                    self._jwt("file changed")
            except Exception:   # never let the watcher die
                log.exception("JWT key watch failed")
