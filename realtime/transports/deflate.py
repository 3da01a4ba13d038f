"""permessage-deflate (RFC 7692) without per-connection compressor state.

The server always negotiates `server_no_context_takeover`, so a message's
compressed bytes depend on the message alone. That buys two things:
- no zlib stream is kept per connection (a default one holds ~256 KB, which
  would dwarf the ~20 KB an idle connection costs otherwise);
- a batch body shared by many clients is compressed once per tick, not once per
  client. A deflate stream may be a sequence of blocks, so each client's message
  is its own small envelope in a stored (uncompressed) block, then the shared
  compressed body, then the envelope's tail in another stored block.

Messages under `min_bytes` go out uncompressed (RSV1 clear), which RFC 7692
allows: compressing a 60-byte `pong` costs more than it saves.
"""
from __future__ import annotations

import zlib

# A 1 KB window and memLevel 4 cost ~8 µs for a 1.3 KB body against ~50 µs for
# zlib's defaults, nearly all of it allocation, for 2% larger output. The
# client's inflater works with any window up to 32 KB.
WBITS = 10
MEM_LEVEL = 4
LEVEL = 6

_SYNC_TAIL = b"\x00\x00\xff\xff"


def compress(data: bytes) -> bytes:
    """One message body, ending on a byte boundary (sync flush): the output
    can be followed by more blocks or, with its 4-byte tail cut, end a message."""
    c = zlib.compressobj(LEVEL, zlib.DEFLATED, -WBITS, MEM_LEVEL)
    return c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)


def stored(data: bytes) -> bytes:
    """A non-final stored block; at most 65535 bytes, which envelopes are."""
    n = len(data)
    return b"\x00" + n.to_bytes(2, "little") + (n ^ 0xFFFF).to_bytes(2, "little") + data


def message(payload: bytes) -> bytes:
    """A whole compressed message payload (RFC 7692 §7.2.1: drop the tail)."""
    z = compress(payload)
    return z[:-4] if z.endswith(_SYNC_TAIL) else z


class BodyCache:
    """The compressed form of the body being fanned out. The hub hands the same
    body object to every client that shares it, one after another, so keeping
    the last one is enough."""

    __slots__ = ("body", "z")

    def __init__(self):
        self.body = None
        self.z = b""

    def get(self, body: bytes) -> bytes:
        if body is not self.body:
            self.z = compress(body)
            self.body = body
        return self.z


_bodies = BodyCache()


def envelope_message(prefix: bytes, body: bytes, suffix: bytes) -> bytes:
    """prefix + body + suffix as one compressed payload, the body compressed once.
    The final block header byte is left for the receiver's appended tail. A
    message of its own (no envelope) shares nothing: compressed as a whole."""
    if not prefix and not suffix:
        return message(body)
    return stored(prefix) + _bodies.get(body) + (stored(suffix) if suffix else b"") + b"\x00"
