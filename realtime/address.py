"""A client's address (PROTOCOL §2, `--trusted-proxies`).

The TCP peer, unless the peer is a trusted proxy: then the right-most address
of `X-Forwarded-For` that is not itself a trusted proxy. Proxies append the
address they saw, so everything left of the first untrusted hop (reading from
the right) was written by the client or by proxies we do not know, and may be
invented. Without --trusted-proxies the header is ignored: a client cannot
choose its address, and so cannot dodge the per-IP limit.

The per-IP limits, the logs and the PostgreSQL records all use this address.
"""
from __future__ import annotations

import ipaddress
from functools import lru_cache

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(text: str | None) -> tuple[Network, ...]:
    """`--trusted-proxies`: CIDRs (or single addresses), comma-separated.
    Raises ValueError on anything else."""
    if not text:
        return ()
    nets = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        nets.append(ipaddress.ip_network(part, strict=False))
    return tuple(nets)


def _ip(text: str):
    text = text.strip()
    if text.startswith("[") and "]" in text:   # [v6]:port
        text = text[1:text.index("]")]
    elif text.count(":") == 1:                 # v4:port
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


class Addresses:
    """Finds client addresses for one set of trusted proxies."""

    def __init__(self, trusted: tuple[Network, ...]):
        self.trusted = trusted
        self._is_trusted = lru_cache(maxsize=4096)(self._check)

    def _check(self, ip) -> bool:
        return any(ip.version == n.version and ip in n for n in self.trusted)

    def client(self, peer: str | None, forwarded_for: list[str] | tuple[str, ...] = ()) -> str:
        """The client's address, from the TCP peer and the X-Forwarded-For
        header(s) (in the order received)."""
        peer = peer or ""
        if not self.trusted:
            return peer
        ip = _ip(peer)
        if ip is None or not self._is_trusted(ip):
            return peer
        hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
        current = str(ip)
        for hop in reversed(hops[-64:]):   # a proxy chain longer than that is not one
            hip = _ip(hop)
            if hip is None:
                # not an address: what a trusted proxy received from someone
                # it did not vouch for; the last trusted hop is all we know
                return current
            current = str(hip)
            if not self._is_trusted(hip):
                return current
        return current   # every hop is a trusted proxy: the left-most one


def of_request(request) -> str:
    """The client address of an aiohttp request (cached on it)."""
    try:
        return request["client_address"]
    except KeyError:
        pass
    addresses: Addresses = request.app["addresses"]
    address = addresses.client(request.remote, request.headers.getall("X-Forwarded-For", ()))
    request["client_address"] = address
    return address
