"""What every transport gives the client layer (realtime/client.py) and the hub.

A transport carries one client's messages. It authenticates the client, makes
an Outlet (the compiled write state in _core/_fanout.pyx: `seq`, counters,
`limit`, `hwm`, `allowance`, `congested`, `closed`, `conflating`) and a Session around it,
then hands every inbound message to client.command. Everything above the bytes
(conflation, priorities, rights, filters, clusters, heartbeats, resume) is the
client layer's and the hub's, the same for every transport.

The hub's tick writes position batches to an Outlet in compiled code
(_fanout.fan_out) when the transport's frames can be built there (WebSocket
without deflate); any other Outlet sets `deflate` (the name is historical: "my
frames are built in Python") and gets `write_batch` calls instead.
"""
from __future__ import annotations

from typing import Protocol

from .._core._fanout import Outlet


def direct_fd(transport) -> int:
    """The socket the tick's fan-out may write to itself (_fanout's
    write_direct): a plain uvloop TCP transport's. -1 for TLS, asyncio's own
    transports or anything else, whose bytes must go through the transport."""
    try:
        from uvloop.loop import TCPTransport
    except ImportError:
        return -1
    if type(transport) is not TCPTransport:
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


class StreamOutlet(Outlet):
    """What every transport that writes to a socket of its own shares: the
    write buffer is the measure of a slow client."""

    __slots__ = ()

    def pending(self) -> int:
        t = self.transport
        return 0 if t is None or t.is_closing() else t.get_write_buffer_size()

    def congested_now(self) -> bool:
        """Still above a quarter of the high-water mark (hysteresis)."""
        t = self.transport
        return t is not None and not t.is_closing() and t.get_write_buffer_size() > self.hwm // 4

    def sent(self, t, data: bytes) -> int:
        t.write(data)
        self.messages += 1
        self.nbytes += len(data)
        return len(data)


class Transport(Protocol):
    def write(self, payload: bytes) -> int:
        """One encoded message (JSON or msgpack, the session's format) to the
        client, as one unit (a frame, an SSE event, a poll response entry).
        Returns the bytes queued; 0 when the client is gone. May raise: the
        Session closes that client alone (Session.write_failed)."""

    def write_batch(self, envelope_of, batch_id: bytes, body: bytes, req_id=None, more=False,
                    later=False) -> int:
        """The next `batch`: seq += 1, envelope_of(fmt, batch_id, seq, req_id,
        more) gives the bytes around `body`, which is shared with other clients
        and must not be copied per client where the transport can avoid it.
        later: one of several parts of a snapshot or catch-up; a transport
        whose frames cost real work to build (compression) may build it in a
        later turn of the loop, as long as everything stays in order."""

    def close(self, code: int, reason: str) -> None:
        """Close with a WebSocket-style code (PROTOCOL §3.3: 1013 resume, 1008
        policy, 1011 error, 4001 token); other transports map it (§4)."""

    def pending(self) -> int:
        """Bytes accepted but not yet sent: the shutdown waits for 0."""

    def congested_now(self) -> bool:
        """Still over a quarter of the high-water mark: a conflating client
        is caught up only when this is False (hysteresis)."""

    def note_backlog(self, size: int) -> bool:
        """(Outlet's) sets `congested` for a backlog of `size` bytes: above
        the high-water mark beyond what tolerate() allowed for."""

    def tolerate(self) -> None:
        """(Outlet's) what a snapshot or catch-up just put in the backlog
        does not count as slowness; what piles up behind it does."""

    def keepalive(self, now: float, every_s: float, timeout_s: float) -> bool:
        """Heartbeat (PROTOCOL §3.3): send the transport's ping when due;
        False when nothing came from the client for timeout_s."""
