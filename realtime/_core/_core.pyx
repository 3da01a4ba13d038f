# cython: language_level=3
"""The compiled kernels of the core: apply, routing, encoding, assembly.

CoreBase (_base.py) owns the arrays; each function here is called once per
batch, per client command or per tick, takes the core object, views its arrays
as C structs and loops in C. No I/O, no asyncio: sockets are Python's.

Routing cost grows with matches, not clients x vehicles: for a changed vehicle
the candidates are the clients that saw it (a bitset row), the clients whose
viewport cell contains it (a multi-level grid, see build_grid), the clients
subscribed by selection with no viewport (one bit test per distinct
selection) and the clients that watch everything. Only candidates are tested.
"""
cimport cython
cimport numpy as cnp
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject
from libc.math cimport floor, isnan, llround
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import numpy as np

from . import _schema as S

cnp.import_array()

# ---------------------------------------------------------------- layouts
# Mirrors of _schema.VEHICLE_DTYPE and _base.CLIENT_DTYPE (checked by tests).
cdef struct VehicleRec:
    double lat
    double lon
    double speed
    double course
    int64_t ts
    uint32_t al_ver
    uint32_t dr_ver
    uint32_t drr_ver
    uint32_t as_ver
    uint32_t version
    uint8_t status
    uint8_t vtype
    uint8_t has_alerts
    uint8_t _pad

cdef struct ClientRec:
    double south
    double west
    double north
    double east
    uint64_t type_mask
    int32_t rights_sel
    int32_t sub_sel
    float zoom
    uint8_t used
    uint8_t active
    uint8_t fmt
    uint8_t show_alerts
    uint8_t contacts
    uint8_t has_bbox
    uint8_t status_mask
    uint8_t clustered

def layout():
    """(sizeof, {field: offset}) of both structs, for the layout test."""
    cdef VehicleRec v
    cdef ClientRec c
    cdef size_t vb = <size_t>&v, cb = <size_t>&c
    return (
        (sizeof(VehicleRec), {
            "lat": <size_t>&v.lat - vb, "lon": <size_t>&v.lon - vb, "speed": <size_t>&v.speed - vb,
            "course": <size_t>&v.course - vb, "ts": <size_t>&v.ts - vb, "al_ver": <size_t>&v.al_ver - vb,
            "dr_ver": <size_t>&v.dr_ver - vb, "drr_ver": <size_t>&v.drr_ver - vb,
            "as_ver": <size_t>&v.as_ver - vb, "version": <size_t>&v.version - vb,
            "status": <size_t>&v.status - vb, "vtype": <size_t>&v.vtype - vb,
            "has_alerts": <size_t>&v.has_alerts - vb, "_pad": <size_t>&v._pad - vb}),
        (sizeof(ClientRec), {
            "south": <size_t>&c.south - cb, "west": <size_t>&c.west - cb, "north": <size_t>&c.north - cb,
            "east": <size_t>&c.east - cb, "type_mask": <size_t>&c.type_mask - cb,
            "rights_sel": <size_t>&c.rights_sel - cb, "sub_sel": <size_t>&c.sub_sel - cb,
            "zoom": <size_t>&c.zoom - cb, "used": <size_t>&c.used - cb, "active": <size_t>&c.active - cb,
            "fmt": <size_t>&c.fmt - cb, "show_alerts": <size_t>&c.show_alerts - cb,
            "contacts": <size_t>&c.contacts - cb, "has_bbox": <size_t>&c.has_bbox - cb,
            "status_mask": <size_t>&c.status_mask - cb, "clustered": <size_t>&c.clustered - cb}),
    )

# ---------------------------------------------------------------- constants
DEF F_P = 1
DEF F_S = 2
DEF F_C = 4
DEF F_ST = 8
DEF F_VT = 16
DEF F_AL = 32
DEF F_DR = 64
DEF F_DRR = 128
DEF F_AS = 256
DEF F_G = 512
DEF F_TS = 1024
DEF POS_FIELDS = 7

DEF K_FULL = 0
DEF K_POS = 1
DEF K_DELTA = 2
DEF K_LEAVE_VIEWPORT = 3
DEF K_LEAVE_FILTER = 4
DEF K_LEAVE_SUBSCRIPTION = 5
DEF K_LEAVE_PERMISSION = 6
DEF K_LEAVE_STALE = 7
DEF K_EVENT = 8

DEF ST_MOVING = 0
DEF KEEP = 255
DEF LANE_EVENT = 0
DEF LANE_MOVING = 1
DEF LANE_OTHER = 2

# Piece cache slots per changed vehicle: full x 8 variants, delta x 8
# variants, pos x 2 formats, leave x 5 reasons x 2 formats.
DEF SLOT_FULL = 0
DEF SLOT_DELTA = 8
DEF SLOT_POS = 16
DEF SLOT_LEAVE = 18
DEF N_SLOTS = 28
DEF PREFETCH_ROWS = 8   # k_tick: rows ahead whose memory is asked for early

cdef extern from *:
    int __builtin_ctzll(unsigned long long) nogil
    void __builtin_prefetch(const void*) nogil

# borrowed, no reference counts: only to ask for memory early (_prefetch_ids)
cdef extern from "Python.h":
    PyObject* list_item "PyList_GET_ITEM" (PyObject* lst, Py_ssize_t i) nogil
    PyObject* tuple_item "PyTuple_GET_ITEM" (PyObject* t, Py_ssize_t i) nogil
    bint is_tuple "PyTuple_CheckExact" (PyObject* o) nogil
    Py_ssize_t tuple_size "PyTuple_GET_SIZE" (PyObject* t) nogil

# a 64-bit word that may alias a double: copy_rec reads and writes records'
# doubles through it (gcc's strict aliasing would otherwise allow reordering)
cdef extern from *:
    """
    typedef uint64_t __attribute__((__may_alias__)) rt_u64a;
    """
    ctypedef uint64_t rt_u64a

cdef inline int _ctz(uint64_t x) noexcept nogil:
    return __builtin_ctzll(x)

cdef inline void copy_rec(VehicleRec* d, VehicleRec* s) noexcept nogil:
    # word by word: gcc made both `d[0] = s[0]` and memcpy of these 64 bytes
    # a `rep movs`, whose start-up cost is most of a copy this small
    cdef rt_u64a* a = <rt_u64a*>d
    cdef rt_u64a* b = <rt_u64a*>s
    a[0] = b[0]
    a[1] = b[1]
    a[2] = b[2]
    a[3] = b[3]
    a[4] = b[4]
    a[5] = b[5]
    a[6] = b[6]
    a[7] = b[7]

if sizeof(VehicleRec) != 64:   # copy_rec's eight words
    raise ImportError("VehicleRec is not 64 bytes")

cdef inline VehicleRec* vrecs(cnp.ndarray a):
    return <VehicleRec*>cnp.PyArray_DATA(a)

cdef inline ClientRec* crecs(cnp.ndarray a):
    return <ClientRec*>cnp.PyArray_DATA(a)

cdef inline uint64_t* words(cnp.ndarray a):
    return <uint64_t*>cnp.PyArray_DATA(a)

cdef inline bint bit(uint64_t* bits, Py_ssize_t row_words, Py_ssize_t row, Py_ssize_t col) noexcept nogil:
    return (bits[row * row_words + (col >> 6)] >> (col & 63)) & 1

# ---------------------------------------------------------------- apply
@cython.boundscheck(False)
def k_apply(core, int32_t[::1] rows, b):
    """Numeric part of apply(), in batch order. Returns (accepted, masks)."""
    cdef Py_ssize_t n = rows.shape[0], i
    cdef VehicleRec* cur = vrecs(core.cur)
    cdef uint8_t[::1] dirty = core.dirty
    cdef double[::1] lat = b.lat, lon = b.lon, speed = b.speed, course = b.course
    cdef uint8_t[::1] status = b.status, vtype = b.vtype
    cdef int64_t[::1] ts = b.ts
    accepted_a = np.zeros(n, np.bool_)
    masks_a = np.zeros(n, np.int64)
    cdef uint8_t[::1] accepted = accepted_a.view(np.uint8)
    cdef int64_t[::1] masks = masks_a
    cdef VehicleRec* v
    cdef int64_t m
    with nogil:
        for i in range(n):
            v = &cur[rows[i]]
            if ts[i] < v.ts:
                continue
            accepted[i] = 1
            m = 0
            if v.version == 0 or lat[i] != v.lat or lon[i] != v.lon:
                m |= F_P
            v.lat = lat[i]
            v.lon = lon[i]
            if not isnan(speed[i]) and speed[i] != v.speed:
                v.speed = speed[i]
                m |= F_S
            if not isnan(course[i]) and course[i] != v.course:
                v.course = course[i]
                m |= F_C
            if status[i] != KEEP and status[i] != v.status:
                v.status = status[i]
                m |= F_ST
            if vtype[i] != KEEP and vtype[i] != v.vtype:
                v.vtype = vtype[i]
                m |= F_VT
            if ts[i] != v.ts:
                m |= F_TS
            v.ts = ts[i]
            v.version += 1
            dirty[rows[i]] = 1
            masks[i] = m
    return accepted_a, masks_a

# ---------------------------------------------------------------- mirror
@cython.boundscheck(False)
def k_mirror(core, const int64_t[::1] xlate, const int32_t[::1] orows, const uint8_t[::1] recs,
             const uint8_t[::1] types):
    """A follower's copy of the owner's rows (mirror.py, CoreBase.mirror_rows):
    each owner row through `xlate` to this core's row, its numbers copied, its
    type code mapped through `types`, the row made dirty. Rows not mapped are
    skipped. A record older than the one held here is not taken: an owner
    restarted from a snapshot a little behind (the writer's last 100 ms), or
    reading Kafka again, must not move a follower's vehicle back in time
    (found by a review). Returns (local rows in frame order, how many were
    skipped as not mapped)."""
    cdef Py_ssize_t n = orows.shape[0], i, k = 0, older = 0, nx = xlate.shape[0], nt = types.shape[0]
    cdef Py_ssize_t size = sizeof(VehicleRec)
    if recs.shape[0] != n * size:
        raise ValueError("rows and records differ in length")
    cdef VehicleRec* cur = vrecs(core.cur)
    cdef Py_ssize_t cap = core.cur.shape[0]
    cdef uint8_t[::1] dirty = core.dirty
    local_a = np.empty(n, np.int64)
    cdef int64_t[::1] local = local_a
    cdef VehicleRec src
    cdef VehicleRec* d
    cdef int64_t r
    cdef int32_t o
    with nogil:
        for i in range(n):
            o = orows[i]
            r = xlate[o] if 0 <= o < nx else -1
            if r < 0 or r >= cap:
                continue
            # the frame's bytes need not be aligned for a VehicleRec
            memcpy(&src, &recs[i * size], size)
            d = &cur[r]
            if d.version != 0 and src.ts < d.ts:
                older += 1
                continue
            d.lat = src.lat
            d.lon = src.lon
            d.speed = src.speed
            d.course = src.course
            d.ts = src.ts
            d.version = src.version
            d.status = src.status
            d.vtype = types[src.vtype] if src.vtype < nt else 0
            dirty[r] = 1
            local[k] = r
            k += 1
    return local_a[:k], n - k - older

# ---------------------------------------------------------------- visibility
cdef inline bint visible(ClientRec* cl, VehicleRec* v, Py_ssize_t r,
                         uint64_t* sel_bits, Py_ssize_t vwords, int* reason) noexcept nogil:
    """PROTOCOL §3: (vehicles ∪ groups | all) ∩ bounds ∩ filters ∩ rights.
    On False, `reason` is the leave kind, checked in a fixed order."""
    if not cl.used or not cl.active or v.version == 0:
        reason[0] = K_LEAVE_SUBSCRIPTION
        return False
    if cl.rights_sel >= 0 and not bit(sel_bits, vwords, cl.rights_sel, r):
        reason[0] = K_LEAVE_PERMISSION
        return False
    if cl.sub_sel >= 0 and not bit(sel_bits, vwords, cl.sub_sel, r):
        reason[0] = K_LEAVE_SUBSCRIPTION
        return False
    if not ((cl.status_mask >> v.status) & 1) or not ((cl.type_mask >> v.vtype) & 1):
        reason[0] = K_LEAVE_FILTER
        return False
    if cl.has_bbox:
        if v.lat < cl.south or v.lat > cl.north:
            reason[0] = K_LEAVE_VIEWPORT
            return False
        if cl.west <= cl.east:
            if v.lon < cl.west or v.lon > cl.east:
                reason[0] = K_LEAVE_VIEWPORT
                return False
        elif v.lon < cl.west and v.lon > cl.east:
            reason[0] = K_LEAVE_VIEWPORT
            return False
    return True

cdef inline int client_mask(VehicleRec* a, VehicleRec* b, ClientRec* cl) noexcept nogil:
    cdef int m = 0
    if a.lat != b.lat or a.lon != b.lon:
        m |= F_P
    if a.speed != b.speed:
        m |= F_S
    if a.course != b.course:
        m |= F_C
    if a.status != b.status:
        m |= F_ST
    if a.vtype != b.vtype:
        m |= F_VT
    if cl.show_alerts and a.al_ver != b.al_ver:
        m |= F_AL
    if cl.contacts:
        if a.dr_ver != b.dr_ver:
            m |= F_DR
    elif a.drr_ver != b.drr_ver:
        m |= F_DRR
    if a.as_ver != b.as_ver:
        m |= F_AS
    return m

cdef inline int lane_of(VehicleRec* v, int kind) noexcept nogil:
    if kind <= K_DELTA and v.status == ST_MOVING:
        return LANE_MOVING
    return LANE_OTHER

# ---------------------------------------------------------------- byte buffer
cdef struct Buf:
    char* data
    Py_ssize_t len
    Py_ssize_t cap

cdef int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.len + extra, cap
    cdef char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 4096
    while cap < need:
        cap *= 2
    p = <char*>realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0

cdef inline int put(Buf* b, const char* s, Py_ssize_t n) except -1:
    buf_reserve(b, n)
    memcpy(b.data + b.len, s, n)
    b.len += n
    return 0

cdef inline int put_bytes(Buf* b, bytes s) except -1:
    return put(b, PyBytes_AS_STRING(s), PyBytes_GET_SIZE(s))

cdef inline int put_u8(Buf* b, uint8_t x) except -1:
    buf_reserve(b, 1)
    b.data[b.len] = <char>x
    b.len += 1
    return 0

cdef inline int put_null(Buf* b, int f) except -1:
    if f == 0:
        return put_bytes(b, b"null")
    return put_u8(b, 0xc0)

cdef int64_t[7] POW10 = [1, 10, 100, 1000, 10000, 100000, 1000000]

cdef int fmt_num(char* out, double x, int dec) noexcept nogil:
    """Shortest fixed-point text with at most `dec` decimals (_schema.fmt_num).

    Values are rounded to `dec` decimals on input (UpdateBatch), so the scaled
    integer is exact and this agrees digit for digit with printf("%.*f"),
    at a tenth of its cost."""
    return fmt_scaled(out, llround(x * POW10[dec]), dec)

cdef int fmt_scaled(char* out, int64_t k, int dec) noexcept nogil:
    """k / 10^dec as text, trailing zeros of the fraction cut (dec 0: k as
    "%lld" writes it); NUL-terminated, at most 22 bytes with it. The digits
    come right to left from k alone, by divisions by 10, which compile to
    multiplications: a division by 10^dec, unknown at compile time, cost as
    much as the rest of a number, four numbers a position, in every worker."""
    cdef uint64_t u = <uint64_t>k
    cdef char tmp[32]
    cdef int p = 32, fd = dec
    cdef bint neg = k < 0
    if neg:
        u = (~u) + 1                  # the magnitude, INT64_MIN included
    while fd > 0 and u % 10 == 0:     # trailing zeros of the fraction: not written
        u //= 10
        fd -= 1
    if fd > 0:
        while fd > 0:
            p -= 1
            tmp[p] = <char>(c'0' + u % 10)
            u //= 10
            fd -= 1
        p -= 1
        tmp[p] = c'.'
    while True:
        p -= 1
        tmp[p] = <char>(c'0' + u % 10)
        u //= 10
        if u == 0:
            break
    if neg:                           # k != 0, so never "-0"
        p -= 1
        tmp[p] = c'-'
    memcpy(out, &tmp[p], 32 - p)
    out[32 - p] = 0
    return 32 - p

def fmt_scaled_text(int64_t k, int dec) -> bytes:
    """fmt_scaled from Python, for tests: k / 10^dec as the encoder writes it."""
    if not 0 <= dec <= 6:
        raise ValueError("dec")
    cdef char out[32]
    cdef int n = fmt_scaled(out, k, dec)
    return out[:n]

cdef int put_num_json(Buf* b, double x, int dec) except -1:
    buf_reserve(b, 34)
    b.len += fmt_num(b.data + b.len, x, dec)
    return 0

cdef int put_be64(Buf* b, uint64_t u) except -1:
    cdef int i
    buf_reserve(b, 8)
    for i in range(8):
        b.data[b.len + i] = <char>((u >> (56 - 8 * i)) & 0xff)
    b.len += 8
    return 0

cdef int put_num_mp(Buf* b, double x, int dec) except -1:
    # the value the JSON text stands for, so both formats decode alike:
    # k / 10^dec is correctly rounded, as strtod of the text would be
    cdef double d = (<double>llround(x * POW10[dec])) / POW10[dec]
    cdef uint64_t u
    memcpy(&u, &d, 8)
    put_u8(b, 0xcb)
    return put_be64(b, u)

cdef int put_int_json(Buf* b, int64_t x) except -1:
    # not snprintf("%lld"): that was a quarter of a position's encoding
    buf_reserve(b, 34)
    b.len += fmt_scaled(b.data + b.len, x, 0)
    return 0

cdef int put_int_mp(Buf* b, int64_t x) except -1:
    # msgpack-python's choice of the smallest encoding
    cdef int i
    if 0 <= x < 128:
        return put_u8(b, <uint8_t>x)
    if -32 <= x < 0:
        return put_u8(b, <uint8_t>(0xe0 | (x + 32)))
    if 0 <= x <= 0xff:
        put_u8(b, 0xcc)
        return put_u8(b, <uint8_t>x)
    if 0 <= x <= 0xffff:
        put_u8(b, 0xcd)
        put_u8(b, <uint8_t>(x >> 8))
        return put_u8(b, <uint8_t>(x & 0xff))
    if 0 <= x <= 0xffffffff:
        put_u8(b, 0xce)
        for i in range(4):
            put_u8(b, <uint8_t>((x >> (24 - 8 * i)) & 0xff))
        return 0
    if x > 0:
        put_u8(b, 0xcf)
        return put_be64(b, <uint64_t>x)
    put_u8(b, 0xd3)
    return put_be64(b, <uint64_t>x)

cdef int put_array_head_mp(Buf* b, Py_ssize_t n) except -1:
    if n < 16:
        return put_u8(b, <uint8_t>(0x90 | n))
    if n < 65536:
        put_u8(b, 0xdc)
        put_u8(b, <uint8_t>(n >> 8))
        return put_u8(b, <uint8_t>(n & 0xff))
    put_u8(b, 0xdd)
    for i in range(4):
        put_u8(b, <uint8_t>((n >> (24 - 8 * i)) & 0xff))
    return 0

# ---------------------------------------------------------------- piece encoder
cdef class Encoder:
    """Writes one message piece for (vehicle row, kind, client variant).

    Reads the pre-encoded rich fields (id, alerts, driver, assignment, type and
    status names) that CoreBase keeps per row, as (json, msgpack) pairs.
    """
    cdef object core
    cdef list enc_id, enc_al, enc_dr, enc_drr, enc_as, enc_types, enc_statuses
    cdef VehicleRec* cur

    def __init__(self, core):
        self.core = core
        self.enc_id = core.enc_id
        self.enc_al = core.enc_al
        self.enc_dr = core.enc_dr
        self.enc_drr = core.enc_drr
        self.enc_as = core.enc_as
        self.enc_types = core.enc_types
        self.enc_statuses = core.enc_statuses
        self.cur = vrecs(core.cur)

    cdef int write(self, Buf* b, Py_ssize_t r, int kind, int m, int fmt,
                   bint show_alerts, bint contacts) except -1:
        cdef VehicleRec* v = &self.cur[r]
        cdef int f = fmt
        cdef object dr
        cdef int nkeys
        cdef bytes rid = (<tuple>self.enc_id[r])[f]
        if kind >= K_LEAVE_VIEWPORT:
            reason = _LEAVE_REASON_BYTES[kind - K_LEAVE_VIEWPORT]
            if f == 0:
                put_bytes(b, b'{"t":"leave","v":')
                put_bytes(b, rid)
                put_bytes(b, b',"r":"')
                put_bytes(b, reason)
                put_bytes(b, b'"}')
            else:
                put_bytes(b, b"\x83\xa1t\xa5leave\xa1v")
                put_bytes(b, rid)
                put_bytes(b, b"\xa1r")
                put_u8(b, <uint8_t>(0xa0 | len(reason)))
                put_bytes(b, reason)
            return 0
        if kind == K_POS:
            if f == 0:
                put_bytes(b, b'{"t":"pos","v":')
                put_bytes(b, rid)
                self._pos_json(b, v)
                put_bytes(b, b'}')
            else:
                put_bytes(b, b"\x86\xa1t\xa3pos\xa1v")
                put_bytes(b, rid)
                self._pos_mp(b, v)
            return 0
        dr = (self.enc_dr[r] if contacts else self.enc_drr[r])
        if kind == K_FULL:
            if f == 0:
                put_bytes(b, b'{"t":"full","v":')
                put_bytes(b, rid)
                put_bytes(b, b',"p":[')
                put_num_json(b, v.lat, 6)
                put_bytes(b, b',')
                put_num_json(b, v.lon, 6)
                put_bytes(b, b'],"s":')
                put_num_json(b, v.speed, 2)
                put_bytes(b, b',"c":')
                put_num_json(b, v.course, 1)
                put_bytes(b, b',"st":')
                put_bytes(b, self.enc_statuses[v.status][0])
                put_bytes(b, b',"vt":')
                put_bytes(b, self.enc_types[v.vtype][0])
                put_bytes(b, b',"ts":')
                put_int_json(b, v.ts)
                if show_alerts:
                    put_bytes(b, b',"al":')
                    put_bytes(b, self.enc_al[r][0])
                if dr is not None:
                    put_bytes(b, b',"dr":')
                    put_bytes(b, dr[0])
                if self.enc_as[r] is not None:
                    put_bytes(b, b',"as":')
                    put_bytes(b, self.enc_as[r][0])
                put_bytes(b, b'}')
            else:
                nkeys = 8 + (1 if show_alerts else 0) + (1 if dr is not None else 0) + \
                    (1 if self.enc_as[r] is not None else 0)
                put_u8(b, <uint8_t>(0x80 | nkeys))
                put_bytes(b, b"\xa1t\xa4full\xa1v")
                put_bytes(b, rid)
                put_bytes(b, b"\xa1p\x92")
                put_num_mp(b, v.lat, 6)
                put_num_mp(b, v.lon, 6)
                put_bytes(b, b"\xa1s")
                put_num_mp(b, v.speed, 2)
                put_bytes(b, b"\xa1c")
                put_num_mp(b, v.course, 1)
                put_bytes(b, b"\xa2st")
                put_bytes(b, self.enc_statuses[v.status][1])
                put_bytes(b, b"\xa2vt")
                put_bytes(b, self.enc_types[v.vtype][1])
                put_bytes(b, b"\xa2ts")
                put_int_mp(b, v.ts)
                if show_alerts:
                    put_bytes(b, b"\xa2al")
                    put_bytes(b, self.enc_al[r][1])
                if dr is not None:
                    put_bytes(b, b"\xa2dr")
                    put_bytes(b, dr[1])
                if self.enc_as[r] is not None:
                    put_bytes(b, b"\xa2as")
                    put_bytes(b, self.enc_as[r][1])
            return 0
        # delta: only the keys in m
        return self._delta(b, r, v, m, f, dr, rid)

    cdef int _pos_json(self, Buf* b, VehicleRec* v) except -1:
        put_bytes(b, b',"p":[')
        put_num_json(b, v.lat, 6)
        put_bytes(b, b',')
        put_num_json(b, v.lon, 6)
        put_bytes(b, b'],"s":')
        put_num_json(b, v.speed, 2)
        put_bytes(b, b',"c":')
        put_num_json(b, v.course, 1)
        put_bytes(b, b',"ts":')
        return put_int_json(b, v.ts)

    cdef int _pos_mp(self, Buf* b, VehicleRec* v) except -1:
        put_bytes(b, b"\xa1p\x92")
        put_num_mp(b, v.lat, 6)
        put_num_mp(b, v.lon, 6)
        put_bytes(b, b"\xa1s")
        put_num_mp(b, v.speed, 2)
        put_bytes(b, b"\xa1c")
        put_num_mp(b, v.course, 1)
        put_bytes(b, b"\xa2ts")
        return put_int_mp(b, v.ts)

    cdef int _delta(self, Buf* b, Py_ssize_t r, VehicleRec* v, int m, int f, object dr,
                    bytes rid) except -1:
        cdef int nk = 0
        cdef bint first = True
        cdef object asg = self.enc_as[r]
        if f == 0:
            put_bytes(b, b'{"t":"delta","v":')
            put_bytes(b, rid)
            put_bytes(b, b',"ch":{')
        else:
            put_bytes(b, b"\x84\xa1t\xa5delta\xa1v")
            put_bytes(b, rid)
            put_bytes(b, b"\xa2ch")
            for bitv in (F_P, F_S, F_C, F_ST, F_VT, F_AL, F_DR | F_DRR, F_AS):
                if m & bitv:
                    nk += 1
            put_u8(b, <uint8_t>(0x80 | nk))
        if m & F_P:
            if f == 0:
                put_bytes(b, b'"p":[')
                put_num_json(b, v.lat, 6)
                put_bytes(b, b',')
                put_num_json(b, v.lon, 6)
                put_bytes(b, b']')
                first = False
            else:
                put_bytes(b, b"\xa1p\x92")
                put_num_mp(b, v.lat, 6)
                put_num_mp(b, v.lon, 6)
        if m & F_S:
            if f == 0:
                if not first:
                    put_bytes(b, b',')
                put_bytes(b, b'"s":')
                put_num_json(b, v.speed, 2)
                first = False
            else:
                put_bytes(b, b"\xa1s")
                put_num_mp(b, v.speed, 2)
        if m & F_C:
            if f == 0:
                if not first:
                    put_bytes(b, b',')
                put_bytes(b, b'"c":')
                put_num_json(b, v.course, 1)
                first = False
            else:
                put_bytes(b, b"\xa1c")
                put_num_mp(b, v.course, 1)
        if m & F_ST:
            self._key(b, f, first, b"st")
            first = False
            put_bytes(b, self.enc_statuses[v.status][f])
        if m & F_VT:
            self._key(b, f, first, b"vt")
            first = False
            put_bytes(b, self.enc_types[v.vtype][f])
        if m & F_AL:
            self._key(b, f, first, b"al")
            first = False
            put_bytes(b, self.enc_al[r][f])
        if m & (F_DR | F_DRR):
            self._key(b, f, first, b"dr")
            first = False
            if dr is None:
                put_null(b, f)
            else:
                put_bytes(b, dr[f])
        if m & F_AS:
            self._key(b, f, first, b"as")
            first = False
            if asg is None:
                put_null(b, f)
            else:
                put_bytes(b, asg[f])
        if f == 0:
            put_bytes(b, b'},"ts":')
            put_int_json(b, v.ts)
            put_bytes(b, b'}')
        else:
            put_bytes(b, b"\xa2ts")
            put_int_mp(b, v.ts)
        return 0

    cdef int _key(self, Buf* b, int f, bint first, bytes key) except -1:
        if f == 0:
            if not first:
                put_bytes(b, b',')
            put_bytes(b, b'"')
            put_bytes(b, key)
            put_bytes(b, b'":')
        else:
            put_u8(b, <uint8_t>(0xa0 | len(key)))
            put_bytes(b, key)
        return 0

_LEAVE_REASON_BYTES = [S.LEAVE_REASONS[k].encode() for k in range(3, 8)]

# ---------------------------------------------------------------- grid
DEF MAX_LEVEL = 24

cdef class Grid:
    """Spatial index over the viewports of active clients.

    Level L has square cells of 360/2^L degrees. A viewport goes to the level
    whose cell is between half and all of its longer side, so it covers at
    most 3x3 cells there. A vehicle looks up one cell per level in use: a
    binary search in the sorted keys. Rebuilt (vectorised) when any
    subscription changed since the last tick.
    """
    cdef public object keys, clients, levels, sel_ids, sel_off, sel_clients, global_clients

    def __init__(self, core):
        cl = core.clients[: core.n_clients]
        rows = np.arange(len(cl), dtype=np.int32)
        live = (cl["used"] == 1) & (cl["active"] == 1)
        boxed = live & (cl["has_bbox"] == 1)
        unboxed = live & (cl["has_bbox"] == 0)
        # clients with no viewport: by selection, or watching everything
        g = unboxed & (cl["sub_sel"] == -1)
        self.global_clients = rows[g]
        s = unboxed & (cl["sub_sel"] >= 0)
        order = np.argsort(cl["sub_sel"][s], kind="stable")
        sc = rows[s][order]
        ss = cl["sub_sel"][s][order]
        self.sel_ids, starts = np.unique(ss, return_index=True)
        self.sel_off = np.append(starts, len(ss)).astype(np.int64)
        self.sel_ids = self.sel_ids.astype(np.int32)
        self.sel_clients = sc.astype(np.int32)
        # viewports, split at the antimeridian
        b = cl[boxed]
        br = rows[boxed]
        wrap = b["west"] > b["east"]
        south = np.concatenate([b["south"], b["south"][wrap]])
        north = np.concatenate([b["north"], b["north"][wrap]])
        west = np.concatenate([np.where(wrap, -180.0, b["west"]), b["west"][wrap]])
        east = np.concatenate([b["east"], np.full(int(wrap.sum()), 180.0)])
        owner = np.concatenate([br, br[wrap]])
        extent = np.maximum(np.maximum(north - south, east - west), 1e-9)
        # one level finer than "cell >= viewport": up to 3x3 cells per
        # viewport, but the cells around a vehicle hold ~2-4x fewer
        # non-matching viewports, and testing those is the routing's cost
        level = np.clip(np.floor(np.log2(360.0 / extent)) + 1, 0, MAX_LEVEL).astype(np.int64)
        d = 360.0 / (2.0 ** level)
        ix0 = np.floor((west + 180.0) / d).astype(np.int64)
        ix1 = np.floor((east + 180.0) / d).astype(np.int64)
        iy0 = np.floor((south + 90.0) / d).astype(np.int64)
        iy1 = np.floor((north + 90.0) / d).astype(np.int64)
        keys = []
        owners = []
        for dx in range(4):
            for dy in range(4):
                ok = (ix0 + dx <= ix1) & (iy0 + dy <= iy1)
                keys.append(_cell_keys(level[ok], ix0[ok] + dx, iy0[ok] + dy))
                owners.append(owner[ok])
        k = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        o = np.concatenate(owners) if owners else np.zeros(0, np.int32)
        order = np.argsort(k, kind="stable")
        self.keys = k[order].astype(np.int64)
        self.clients = o[order].astype(np.int32)
        self.levels = np.unique(level).astype(np.int64)

def _cell_keys(level, ix, iy):
    return (level << 58) | (iy << 29) | ix

cdef inline int64_t cell_key(int64_t level, double lat, double lon) noexcept nogil:
    cdef double d = 360.0 / (<double>((<int64_t>1) << level))
    cdef int64_t ix = <int64_t>floor((lon + 180.0) / d)
    cdef int64_t iy = <int64_t>floor((lat + 90.0) / d)
    return (level << 58) | (iy << 29) | ix

cdef inline Py_ssize_t lower_bound(int64_t* a, Py_ssize_t n, int64_t x) noexcept nogil:
    cdef Py_ssize_t lo = 0, hi = n, mid
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo

# ---------------------------------------------------------------- records
cdef struct Rec:
    int32_t client
    int32_t row       # vehicle row, or event index for K_EVENT
    int32_t kind
    int32_t m
    int32_t lane
    int32_t slot      # piece cache slot index for vehicle records

cdef struct Recs:
    Rec* data
    Py_ssize_t len
    Py_ssize_t cap

cdef int recs_push(Recs* rs, int32_t client, int32_t row, int32_t kind, int32_t m,
                   int32_t lane, int32_t slot) except -1:
    cdef Rec* p
    if rs.len == rs.cap:
        rs.cap = rs.cap * 2 if rs.cap else 1024
        p = <Rec*>realloc(rs.data, rs.cap * sizeof(Rec))
        if p == NULL:
            raise MemoryError()
        rs.data = p
    p = &rs.data[rs.len]
    p.client = client
    p.row = row
    p.kind = kind
    p.m = m
    p.lane = lane
    p.slot = slot
    rs.len += 1
    return 0

cdef inline int variant_of(ClientRec* cl) noexcept nogil:
    return (cl.fmt << 2) | (cl.show_alerts << 1) | cl.contacts

cdef inline int slot_of(int kind, ClientRec* cl) noexcept nogil:
    if kind == K_FULL:
        return SLOT_FULL + variant_of(cl)
    if kind == K_DELTA:
        return SLOT_DELTA + variant_of(cl)
    if kind == K_POS:
        return SLOT_POS + cl.fmt
    return SLOT_LEAVE + (kind - K_LEAVE_VIEWPORT) * 2 + cl.fmt

# ---------------------------------------------------------------- client diff
def k_client_diff(core, Py_ssize_t c, bint full_all):
    """Visibility of one client against every vehicle, after a command.
    Returns the body of `full` for what came in (every visible vehicle when
    full_all) and `leave` for what went out."""
    cdef Py_ssize_t n = core.n, r, vwords = core.sel_bits.shape[1]
    cdef Py_ssize_t cwords = core.vis.shape[1]
    cdef VehicleRec* cur = vrecs(core.cur)
    cdef ClientRec* cl = &crecs(core.clients)[c]
    cdef uint64_t* vis = words(core.vis)
    cdef uint64_t* sel = words(core.sel_bits)
    cdef uint64_t cbit = (<uint64_t>1) << (c & 63)
    cdef Py_ssize_t cw = c >> 6
    cdef int reason = 0, kind, lane
    cdef bint new, old
    cdef Recs rs
    rs.data = NULL
    rs.len = rs.cap = 0
    cdef Buf b
    b.data = NULL
    b.len = b.cap = 0
    cdef Encoder enc = Encoder(core)
    cdef Py_ssize_t i, count = 0
    try:
        for r in range(n):
            new = visible(cl, &cur[r], r, sel, vwords, &reason)
            old = (vis[r * cwords + cw] & cbit) != 0
            if cl.clustered:
                pass  # bits only: a clustered client gets `clusters` from the hub
            elif new and (full_all or not old):
                recs_push(&rs, <int32_t>c, <int32_t>r, K_FULL, 0, lane_of(&cur[r], K_FULL), 0)
            elif old and not new:
                recs_push(&rs, <int32_t>c, <int32_t>r, reason, 0, lane_of(&cur[r], reason), 0)
            if new:
                vis[r * cwords + cw] |= cbit
            else:
                vis[r * cwords + cw] &= ~cbit
        if cl.fmt == 0:
            put_bytes(&b, b'[')
        else:
            put_array_head_mp(&b, rs.len)
        for lane in range(LANE_MOVING, LANE_OTHER + 1):
            for i in range(rs.len):
                if rs.data[i].lane != lane:
                    continue
                if cl.fmt == 0 and count:
                    put_bytes(&b, b',')
                enc.write(&b, rs.data[i].row, rs.data[i].kind, 0, cl.fmt, cl.show_alerts, cl.contacts)
                count += 1
        if cl.fmt == 0:
            put_bytes(&b, b']')
        return PyBytes_FromStringAndSize(b.data, b.len)
    finally:
        free(rs.data)
        free(b.data)

# ---------------------------------------------------------------- tick
cdef inline Py_ssize_t add_candidate(int32_t* stamp, int32_t* cand, Py_ssize_t n, int32_t c,
                                     int32_t mark) noexcept nogil:
    """Client c joins the candidates of the vehicle being routed (marked
    `mark`), once whichever way it was found."""
    if stamp[c] != mark:
        stamp[c] = mark
        cand[n] = c
        n += 1
    return n


def k_tick(core, bint rebuild, rows_a):
    """Route every dirty vehicle (`rows_a`: core.dirty_rows()) and pending
    event; return [(body, rows)]."""
    cdef Py_ssize_t n = core.n, nc = core.n_clients
    cdef Py_ssize_t vwords = core.sel_bits.shape[1], cwords = core.vis.shape[1]
    cdef VehicleRec* cur = vrecs(core.cur)
    cdef VehicleRec* sent = vrecs(core.sent)
    cdef ClientRec* cls = crecs(core.clients)
    cdef uint64_t* vis = words(core.vis)
    cdef uint64_t* sel = words(core.sel_bits)
    cdef uint8_t[::1] dirty = core.dirty

    if core.kernel_state is None or (core.grid_dirty and rebuild):
        core.kernel_state = Grid(core)
        core.grid_dirty = False
        core.grid_pending.clear()
    # clients changed since the grid was built: candidates for every vehicle
    pending_a = np.fromiter((c for c in core.grid_pending if c < nc), np.int32)
    cdef int32_t[::1] pending = pending_a
    cdef Grid grid = core.kernel_state
    cdef int64_t[::1] gkeys = grid.keys
    cdef int32_t[::1] gclients = grid.clients
    cdef int64_t[::1] glevels = grid.levels
    cdef int32_t[::1] gglobal = grid.global_clients
    cdef int32_t[::1] gsel = grid.sel_ids
    cdef int64_t[::1] gsel_off = grid.sel_off
    cdef int32_t[::1] gsel_cl = grid.sel_clients
    cdef Py_ssize_t nkeys = gkeys.shape[0]
    cdef int64_t* kp = &gkeys[0] if nkeys else NULL

    cdef int32_t[::1] rows = rows_a
    cdef Py_ssize_t nd = rows.shape[0], di, j, k, w, lv
    stamp_a = np.zeros(max(nc, 1), np.int32)
    cdef int32_t[::1] stamp = stamp_a
    cdef Recs rs
    rs.data = NULL
    rs.len = rs.cap = 0
    cdef Buf arena
    arena.data = NULL
    arena.len = arena.cap = 0
    cdef int32_t r, c, kind, m, ahead
    cdef int reason = 0
    cdef uint64_t word
    cdef int64_t key
    cdef bint old, new
    cdef ClientRec* cl
    cdef VehicleRec* v
    cdef Py_ssize_t n_cand
    cand_a = np.empty(max(nc, 1), np.int32)
    cdef int32_t[::1] cand = cand_a
    cdef int32_t* stamp_p = &stamp[0]
    cdef int32_t* cand_p = &cand[0]
    cdef int32_t mark
    events = core.events
    cdef Py_ssize_t ne = len(events)
    try:
        # 1. route changed vehicles
        for di in range(nd):
            r = rows[di]
            v = &cur[r]
            n_cand = 0
            # a few rows ahead: their bitset words and last-sent records. The
            # dirty rows are a sparse ascending sample of the fleet (~1 in 13
            # at 1 Hz), too far apart for the hardware to guess, and these two
            # loads were the routing's main cost, paid again in every worker
            if di + PREFETCH_ROWS < nd:
                ahead = rows[di + PREFETCH_ROWS]
                __builtin_prefetch(&vis[ahead * cwords])
                __builtin_prefetch(&sent[ahead])
                # a 64-byte record is not aligned to a cache line: its end too
                __builtin_prefetch(<char*>&sent[ahead] + sizeof(VehicleRec) - 1)
            mark = <int32_t>di + 1
            # a) clients that saw it
            for w in range(cwords):
                word = vis[r * cwords + w]
                while word:
                    c = <int32_t>(w * 64 + _ctz(word))
                    word &= word - 1
                    n_cand = add_candidate(stamp_p, cand_p, n_cand, c, mark)
            # b) viewports whose cell holds it
            for lv in range(glevels.shape[0]):
                key = cell_key(glevels[lv], v.lat, v.lon)
                j = lower_bound(kp, nkeys, key)
                while j < nkeys and kp[j] == key:
                    c = gclients[j]
                    n_cand = add_candidate(stamp_p, cand_p, n_cand, c, mark)
                    j += 1
            # c) selection subscribers without a viewport
            for j in range(gsel.shape[0]):
                if bit(sel, vwords, gsel[j], r):
                    for k in range(gsel_off[j], gsel_off[j + 1]):
                        c = gsel_cl[k]
                        n_cand = add_candidate(stamp_p, cand_p, n_cand, c, mark)
            # e) clients changed since the grid was built
            for j in range(pending.shape[0]):
                c = pending[j]
                n_cand = add_candidate(stamp_p, cand_p, n_cand, c, mark)
            # d) clients that watch everything
            for j in range(gglobal.shape[0]):
                c = gglobal[j]
                n_cand = add_candidate(stamp_p, cand_p, n_cand, c, mark)
            for j in range(n_cand):
                c = cand[j]
                cl = &cls[c]
                new = visible(cl, v, r, sel, vwords, &reason)
                old = (vis[r * cwords + (c >> 6)] >> (c & 63)) & 1
                if cl.clustered:
                    if new != old:
                        vis[r * cwords + (c >> 6)] ^= (<uint64_t>1) << (c & 63)
                elif new and not old:
                    recs_push(&rs, c, <int32_t>di, K_FULL, 0, lane_of(v, K_FULL), slot_of(K_FULL, cl))
                    vis[r * cwords + (c >> 6)] |= (<uint64_t>1) << (c & 63)
                elif old and not new:
                    recs_push(&rs, c, <int32_t>di, reason, 0, lane_of(v, reason), slot_of(reason, cl))
                    vis[r * cwords + (c >> 6)] &= ~((<uint64_t>1) << (c & 63))
                elif old and new:
                    m = client_mask(v, &sent[r], cl)
                    if m:
                        kind = K_POS if not (m & ~POS_FIELDS) else K_DELTA
                        recs_push(&rs, c, <int32_t>di, kind, m, lane_of(v, kind), slot_of(kind, cl))
        # 2. events, to whoever sees the vehicle now
        ev_rows = np.array([e[0] for e in events], np.int32) if ne else np.zeros(0, np.int32)
        ev_alert = np.array([e[3] for e in events], np.uint8) if ne else np.zeros(0, np.uint8)
        _route_events(&rs, ev_rows, ev_alert, vis, cwords, cls)
        # 3. pieces: one encoding per (vehicle, slot) and per (event, format)
        bodies = _assemble(core, &rs, &arena, rows, ev_rows, events, cls, nc)
        for di in range(nd):
            r = rows[di]
            copy_rec(&sent[r], &cur[r])
            dirty[r] = 0
        core.events = []
        return bodies
    finally:
        free(rs.data)
        free(arena.data)


cdef int _route_events(Recs* rs, int32_t[::1] ev_rows, uint8_t[::1] ev_alert, uint64_t* vis,
                       Py_ssize_t cwords, ClientRec* cls) except -1:
    cdef Py_ssize_t e, w
    cdef int32_t r, c
    cdef uint64_t word
    for e in range(ev_rows.shape[0]):
        r = ev_rows[e]
        for w in range(cwords):
            word = vis[r * cwords + w]
            while word:
                c = <int32_t>(w * 64 + _ctz(word))
                word &= word - 1
                if ev_alert[e] and not cls[c].show_alerts:
                    continue
                recs_push(rs, c, <int32_t>e, K_EVENT, 0, LANE_EVENT, cls[c].fmt)
    return 0

cdef void _prefetch_ids(list enc_id, int32_t[::1] rows) noexcept:
    """Every piece starts with the vehicle's id, encoded ahead of time as a
    Python tuple of bytes (CoreBase.enc_id): the list's slot, the tuple and
    the bytes are three cache misses, one after the other, and waiting for
    them was most of the encoder's own time (each worker pays it again).
    Asked for here, a pass per step over the tick's rows, they are fetched
    side by side instead. Rows are < core.n = len(enc_id), each a tuple."""
    cdef Py_ssize_t nd = rows.shape[0], i, n = len(enc_id)
    cdef PyObject* lst = <PyObject*>enc_id
    cdef PyObject* t
    for i in range(nd):
        if rows[i] < n:
            __builtin_prefetch(list_item(lst, rows[i]))
    for i in range(nd):
        if rows[i] < n:
            t = list_item(lst, rows[i])
            if is_tuple(t) and tuple_size(t) >= 2:
                __builtin_prefetch(tuple_item(t, 0))
                __builtin_prefetch(tuple_item(t, 1))

cdef object _assemble(core, Recs* rs, Buf* arena, int32_t[::1] rows, int32_t[::1] ev_rows,
                      list events, ClientRec* cls, Py_ssize_t nc):
    cdef Py_ssize_t nrec = rs.len, i, j, nd = rows.shape[0], ne = ev_rows.shape[0]
    cdef Rec* rec
    cdef Encoder enc = Encoder(core)
    if nrec:
        _prefetch_ids(<list>core.enc_id, rows)
    # piece cache: [dirty index * N_SLOTS + slot] for vehicles, then 2 per event
    cache_a = np.full(nd * N_SLOTS + ne * 2 + 1, -1, np.int32)
    cdef int32_t[::1] cache = cache_a
    cdef Py_ssize_t npieces = 0, idx
    off_a = np.zeros(nrec + 1, np.int64)
    len_a = np.zeros(nrec + 1, np.int64)
    cdef int64_t[::1] poff = off_a, plen = len_a
    piece_a = np.empty(nrec, np.int32)
    cdef int32_t[::1] piece = piece_a
    cdef Py_ssize_t start
    cdef ClientRec* cl
    for i in range(nrec):
        rec = &rs.data[i]
        if rec.kind == K_EVENT:
            idx = nd * N_SLOTS + rec.row * 2 + rec.slot
        else:
            idx = rec.row * N_SLOTS + rec.slot
        if cache[idx] < 0:
            start = arena.len
            cl = &cls[rec.client]
            if rec.kind == K_EVENT:
                put_bytes(arena, events[rec.row][1 + rec.slot])
            else:
                enc.write(arena, rows[rec.row], rec.kind, rec.m, cl.fmt, cl.show_alerts, cl.contacts)
            poff[npieces] = start
            plen[npieces] = arena.len - start
            cache[idx] = <int32_t>npieces
            npieces += 1
        piece[i] = cache[idx]
    # stable counting sort by (client, lane): generation order already has
    # vehicles by ascending row and events in arrival order
    cnt_a = np.zeros(nc * 3 + 1, np.int64)
    cdef int64_t[::1] cnt = cnt_a
    for i in range(nrec):
        cnt[rs.data[i].client * 3 + rs.data[i].lane + 1] += 1
    for i in range(nc * 3):
        cnt[i + 1] += cnt[i]
    sorted_a = np.empty(nrec, np.int32)
    cdef int32_t[::1] srt = sorted_a
    cdef int64_t[::1] pos = cnt_a.copy()
    cdef Py_ssize_t key
    for i in range(nrec):
        key = rs.data[i].client * 3 + rs.data[i].lane
        srt[pos[key]] = piece[i]
        pos[key] += 1
    # group clients whose piece lists are identical; one body per group
    cdef dict groups = {}
    cdef list members = []
    ga_a = np.empty(max(nc, 1), np.int64)
    gz_a = np.empty(max(nc, 1), np.int64)
    gf_a = np.empty(max(nc, 1), np.int32)
    cdef int64_t[::1] ga = ga_a, gz = gz_a
    cdef int32_t[::1] gf = gf_a
    cdef Py_ssize_t a, z, ng = 0, gi
    cdef int32_t c
    for c in range(nc):
        a = cnt[c * 3]
        z = cnt[c * 3 + 3]
        if a == z:
            continue
        k = PyBytes_FromStringAndSize(<char*>&srt[a], (z - a) * 4)
        g = groups.get(k)
        if g is None:
            groups[k] = ng
            members.append([c])
            ga[ng] = a
            gz[ng] = z
            gf[ng] = cls[c].fmt
            ng += 1
        else:
            (<list>members[<Py_ssize_t>g]).append(c)
    out = []
    cdef Buf body
    cdef int32_t p
    body.data = NULL
    body.len = body.cap = 0
    try:
        for gi in range(ng):
            body.len = 0
            a = ga[gi]
            z = gz[gi]
            if gf[gi] == 0:
                put_bytes(&body, b'[')
            else:
                put_array_head_mp(&body, z - a)
            for j in range(a, z):
                p = srt[j]
                if gf[gi] == 0 and j > a:
                    put_bytes(&body, b',')
                put(&body, arena.data + poff[p], plen[p])
            if gf[gi] == 0:
                put_bytes(&body, b']')
            out.append((PyBytes_FromStringAndSize(body.data, body.len), members[gi]))
    finally:
        free(body.data)
    return out
