# cython: language_level=3
"""The per-tick fan-out: each client's `batch` envelope and its one socket write.

The kernels (_core.pyx) hand back [(body, client rows)]; for every client this
loop wraps the shared body in the client's own envelope (its `seq`), puts the
WebSocket frame header in front and writes the whole frame with one
`transport.write` of one buffer: uvloop then takes its single-buffer fast path
(one `send`, no write context). Interpreted, this loop cost ~4 µs per frame;
here it is the attribute reads and the write call.

It works on the hub's Session and RawWriter objects (transports/websocket.py)
and follows RawWriter.write_parts exactly; connections with permessage-deflate
are handed to that Python method, since their frame is built differently.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM
from libc.stdint cimport int64_t, uint64_t
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.string cimport memcpy, memset
cdef extern from "<sys/types.h>" nogil:
    ctypedef long ssize_t

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void* iov_base
        size_t iov_len

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void* msg_name
        unsigned int msg_namelen
        iovec* msg_iov
        size_t msg_iovlen
        void* msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int fd, const msghdr* msg, int flags)
    enum:
        MSG_DONTWAIT
        MSG_NOSIGNAL

DEF CLOSE_TRY_AGAIN = 1013

cdef bytes J_HEAD = b'{"type":"batch","batch_id":"'
cdef bytes J_SEQ = b'","seq":'
cdef bytes J_MSGS = b',"messages":'
cdef bytes M_HEAD = b"\x84\xa4type\xa5batch\xa8batch_id"
cdef bytes M_SEQ = b"\xa3seq"
cdef bytes M_MSGS = b"\xa8messages"


cdef inline Py_ssize_t put(char* out, Py_ssize_t at, bytes b) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(b)
    memcpy(out + at, PyBytes_AS_STRING(b), n)
    return at + n


cdef inline Py_ssize_t put_uint_text(char* out, Py_ssize_t at, uint64_t v) noexcept:
    cdef char tmp[24]
    cdef int n = 0
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    while n:
        n -= 1
        out[at] = tmp[n]
        at += 1
    return at


cdef inline Py_ssize_t put_uint_mp(char* out, Py_ssize_t at, uint64_t v) noexcept:
    """msgpack's smallest encoding of a non-negative int, as msgpack.packb does."""
    cdef int n, i
    if v < 128:
        out[at] = <char>v
        return at + 1
    if v < 256:
        out[at] = <char>0xcc
        n = 1
    elif v < 65536:
        out[at] = <char>0xcd
        n = 2
    elif v < 4294967296:
        out[at] = <char>0xce
        n = 4
    else:
        out[at] = <char>0xcf
        n = 8
    for i in range(n):
        out[at + 1 + i] = <char>((v >> (8 * (n - 1 - i))) & 0xff)
    return at + 1 + n


cdef inline Py_ssize_t put_frame_head(char* out, int first, Py_ssize_t n) noexcept:
    out[0] = <char>first
    if n < 126:
        out[1] = <char>n
        return 2
    if n < 65536:
        out[1] = <char>126
        out[2] = <char>(n >> 8)
        out[3] = <char>(n & 0xff)
        return 4
    out[1] = <char>127
    cdef int i
    for i in range(8):
        out[2 + i] = <char>((<uint64_t>n >> (8 * (7 - i))) & 0xff)
    return 10


cdef struct Head:
    char env[128]       # the envelope before the body
    Py_ssize_t e
    char head[10]       # the WebSocket frame header
    Py_ssize_t h
    Py_ssize_t total    # the whole frame


cdef int frame_head(int fmt, bytes batch_id, uint64_t seq, Py_ssize_t blen, Head* fh) except -1:
    """The frame's header and envelope around a body of `blen` bytes."""
    cdef Py_ssize_t idlen = PyBytes_GET_SIZE(batch_id)
    cdef char* env = fh.env
    cdef Py_ssize_t e = 0
    if idlen > 64:
        raise ValueError("batch_id too long")
    if fmt == 0:
        e = put(env, e, J_HEAD)
        e = put(env, e, batch_id)
        e = put(env, e, J_SEQ)
        e = put_uint_text(env, e, seq)
        e = put(env, e, J_MSGS)
    else:
        e = put(env, e, M_HEAD)
        if idlen < 32:
            env[e] = <char>(0xa0 | idlen)
            e += 1
        else:
            env[e] = <char>0xd9
            env[e + 1] = <char>idlen
            e += 2
        e = put(env, e, batch_id)
        e = put(env, e, M_SEQ)
        e = put_uint_mp(env, e, seq)
        e = put(env, e, M_MSGS)
    cdef Py_ssize_t payload = e + blen + (1 if fmt == 0 else 0)
    fh.e = e
    fh.h = put_frame_head(fh.head, 0x80 | (0x1 if fmt == 0 else 0x2), payload)
    fh.total = fh.h + payload
    return 0


cdef inline void frame_into(char* p, Head* fh, int fmt, bytes body) noexcept:
    cdef Py_ssize_t blen = PyBytes_GET_SIZE(body)
    memcpy(p, fh.head, fh.h)
    memcpy(p + fh.h, fh.env, fh.e)
    memcpy(p + fh.h + fh.e, PyBytes_AS_STRING(body), blen)
    if fmt == 0:
        p[fh.h + fh.e + blen] = b'}'


cdef bytes frame_bytes(Head* fh, int fmt, bytes body):
    """The frame of `fh` around `body` as one bytes object."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, fh.total)
    frame_into(PyBytes_AS_STRING(out), fh, fmt, body)
    return out


cdef bytes frame(int fmt, bytes batch_id, uint64_t seq, bytes body):
    """The whole WebSocket frame of one client's batch: the same bytes as
    frame_header() + CoreBase.envelope() + body, without req_id."""
    cdef Head fh
    frame_head(fmt, batch_id, seq, PyBytes_GET_SIZE(body), &fh)
    return frame_bytes(&fh, fmt, body)


cdef char CLOSE_BRACE = b'}'


cdef Py_ssize_t write_direct(int fd, t, Head* fh, int fmt, bytes body) except -1:
    """The frame into the socket with one sendmsg() of its pieces (header,
    envelope, the shared body, the closing brace): no bytes object made and
    the body not copied in user space. Only when nothing is queued before
    it (uvloop's buffer and libuv's queue empty, so the order holds). What
    the kernel did not take -- a full socket buffer, or an error uvloop must
    see and report -- goes to transport.write() as bytes, as a frame always
    did (this rare path copies; the common one does not)."""
    cdef iovec iov[4]
    cdef msghdr msg
    cdef ssize_t sent
    iov[0].iov_base = <void*>fh.head
    iov[0].iov_len = fh.h
    iov[1].iov_base = <void*>fh.env
    iov[1].iov_len = fh.e
    iov[2].iov_base = <void*>PyBytes_AS_STRING(body)
    iov[2].iov_len = PyBytes_GET_SIZE(body)
    iov[3].iov_base = <void*>&CLOSE_BRACE
    iov[3].iov_len = 1
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = 4 if fmt == 0 else 3
    sent = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL)
    if sent == fh.total:
        return sent
    data = frame_bytes(fh, fmt, body)
    t.write(data[sent:] if sent > 0 else data)
    return fh.total


def ws_frame(int fmt, bytes batch_id, uint64_t seq, bytes body):
    """For tests: the frame fan_out writes."""
    return frame(fmt, batch_id, seq, body)


cdef class Outlet:
    """A connection's write state as C fields, so that the fan-out reads no
    Python attributes per frame (perf: slot lookups were 5% of a busy worker).
    transports/websocket.RawWriter subclasses it with the Python side."""
    cdef public object transport   # the uvloop transport
    cdef public object ws          # aiohttp's WebSocketResponse (its closing state)
    cdef public int fmt            # FMT_JSON 0, FMT_MSGPACK 1
    cdef public long long seq      # the connection's batch sequence number
    cdef public long long messages, nbytes
    cdef public Py_ssize_t limit   # write buffer: close 1013 above this
    cdef public Py_ssize_t hwm     # write buffer: conflate above this
    cdef public bint congested     # above hwm (and the allowance) at the last write
    # Bytes of the backlog that are not the client's slowness: what a
    # snapshot or a catch-up put in the buffer at once (tolerate()). It only
    # shrinks, to the smallest backlog seen since: once the client has read
    # them, backlog that builds up again counts in full.
    cdef public Py_ssize_t allowance
    cdef public bint closed        # closed, or closing: write nothing more
    cdef public bint conflating    # the hub holds its position batches
    cdef public bint deflate       # permessage-deflate: frames built in Python
    # the socket of a plain (not TLS) uvloop TCP transport, written directly
    # when nothing is queued (write_direct); -1: always through the transport
    cdef public int fd

    def __cinit__(self):
        self.fd = -1

    cpdef bint note_backlog(self, Py_ssize_t size):
        """`congested` for a backlog of `size` bytes (unsent or unread):
        above the high-water mark beyond what is allowed for."""
        if size < self.allowance:
            self.allowance = size
        self.congested = size > self.hwm + self.allowance
        return self.congested

    cpdef void tolerate(self):
        """A snapshot or catch-up was just written: however large, its bytes
        do not make the client slow. The next note_backlog() allows for the
        backlog it finds; only what piles up on top of that counts. Without
        this, a catch-up larger than the high-water mark conflated the client
        again at once, and it got catch-up after catch-up, never live ticks."""
        self.allowance = PY_SSIZE_T_MAX
        self.congested = False

    def rights_narrowed(self):
        """The client's rights just took something away. A socket keeps
        nothing it has sent, so nothing changes; an Outlet that keeps what
        its reader had, to hand it out again (the HTTP sessions' Mailbox),
        lets it go: it was read under the rights before."""


@cython.boundscheck(False)
def fan_out(list out, list outlets, bytes batch_id, envelope):
    """Write each body of `out` ([(body, client rows)], from Core.tick) to its
    clients' outlets (a list: row -> Outlet or None). Returns (frames written, frames skipped
    for conflating clients, rows whose write buffer passed the high-water mark,
    [(row, exception)] for writes that raised).

    A write that raises is one client's fault: it is noted and the loop goes
    on, so every other client still gets this tick (the hub closes that one,
    and it resumes to a full snapshot)."""
    cdef Py_ssize_t frames = 0, skipped = 0, size
    cdef list congested = []
    cdef list failed = []
    cdef bytes body
    cdef Outlet o
    cdef Head fh
    cdef Py_ssize_t i, n_outlets = len(outlets)
    for item in out:
        body = <bytes>item[0]
        for row in <list>item[1]:
            i = <Py_ssize_t>row
            if i < 0 or i >= n_outlets:
                continue
            w = <object>PyList_GET_ITEM(outlets, i)
            if w is None:
                continue
            o = <Outlet>w
            if o.conflating:        # the hub holds its events
                skipped += 1
                continue
            if o.closed:
                continue
            try:
                if o.deflate:
                    w.write_batch(envelope, batch_id, body)
                    frames += 1
                    if o.congested:
                        congested.append(row)
                    continue
                t = o.transport
                if t is None or t.is_closing() or o.ws.closed:
                    continue
                size = t.get_write_buffer_size()
                if size > o.limit:
                    w.close(CLOSE_TRY_AGAIN, "slow client: write buffer over limit")
                    continue
                o.seq += 1
                frame_head(o.fmt, batch_id, o.seq, PyBytes_GET_SIZE(body), &fh)
                if o.fd >= 0 and size == 0:
                    write_direct(o.fd, t, &fh, o.fmt, body)
                else:
                    t.write(frame_bytes(&fh, o.fmt, body))
                o.messages += 1
                o.nbytes += fh.total
                frames += 1
                if o.note_backlog(size):
                    congested.append(row)
            except Exception as e:
                failed.append((row, e))
    return frames, skipped, congested, failed
