# distutils: language = c++
"""The Kafka poll, decoded in one compiled call (issue 15 part 1).

`RecordDecoder.decode(records)` takes one `getmany` poll's records and
returns the core's UpdateBatch with its rows already looked up, plus the
records that failed validation with their reasons. A JSON record of the
usual shape is scanned here, straight into the columns: no Python object per
record. What the scanner does not take on -- msgpack, escapes in names,
unusual timestamps, anything out of bounds or malformed -- goes through
`ingest.decode.decode_record`, which remains the one definition of what is
valid and of every rejection reason. The scanner only ever says "accepted,
with these values" or "ask decode_record": it never rejects, and it must
never accept what decode_record would refuse (tests/test_ingest_decoder.py
compares both on generated and hostile records).

Rich fields (groups, alerts, driver, assignment) are free-form and must end
up as Python objects in the core. Per vehicle the decoder remembers the raw
text it last parsed for each and the object it made: a record repeating it
costs a memcmp, and when the core still holds an equal value the column says
None ("keep what is stored"), so the core's per-update rich-field loop skips
it. A changed value is parsed by msgspec with UpdateIn's own constraints.
"""
from libc.stdint cimport int64_t, uint8_t
from libc.string cimport memcmp
from libc.math cimport fmod, rint, isfinite, NAN
from libcpp.string cimport string
from libcpp.unordered_map cimport unordered_map
from libcpp.vector cimport vector
from cython.operator cimport dereference as deref
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.object cimport PyObject_RichCompareBool, Py_EQ
from cpython.unicode cimport PyUnicode_DecodeUTF8
from cpython.ref cimport PyObject

import math
import time
import numpy as np
cimport numpy as cnp

from . import _schema as S
from ._schema import STATUS_CODE, UpdateBatch

# the codes of _schema, read once (one definition of statuses and of KEEP)
cdef int KEEP = S.KEEP
cdef int ST_UNKNOWN = S.ST_UNKNOWN
cdef list _STATUS_NAMES = [name.encode() for name in S.STATUSES]   # code = index
cdef int N_STATUSES = len(_STATUS_NAMES)

cnp.import_array()

cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    double PyOS_string_to_double(const char*, char**, PyObject*) except? -1.0
    Py_ssize_t PyUnicode_GET_LENGTH(object)

# fields of a record, as bits (a field named twice goes to decode_record)
cdef enum:
    B_VID = 1
    B_TS = 2
    B_POS = 4
    B_SPEED = 8
    B_COURSE = 16
    B_HEADING = 32
    B_STATUS = 64
    B_VTYPE = 128
    B_GROUPS = 256
    B_ALERTS = 512
    B_DRIVER = 1024
    B_ASSIGN = 2048

# rich fields, in the order of the memo lists
cdef enum:
    R_GROUPS = 0
    R_ALERTS = 1
    R_DRIVER = 2
    R_ASSIGN = 3

DEF MAX_DEPTH = 32
DEF NEW_ROW = -10   # placeholders of a poll's new vehicles: NEW_ROW - k


cdef struct Rec:
    int seen
    const char* vid
    Py_ssize_t vid_len
    int64_t ts
    double lat
    double lon
    double speed
    double course
    double heading
    int status
    const char* vtype
    Py_ssize_t vtype_len
    bint vtype_null
    const char* rich[4]
    Py_ssize_t rich_len[4]


cdef inline const char* ws(const char* p, const char* e) noexcept nogil:
    while p < e and (p[0] == 32 or p[0] == 10 or p[0] == 13 or p[0] == 9):
        p += 1
    return p


cdef const char* plain_string(const char* p, const char* e, const char** s, Py_ssize_t* n) noexcept nogil:
    """p at the opening quote. A string without escapes, control characters
    or bytes beyond ASCII (those go to decode_record); NULL otherwise."""
    cdef const char* q = p + 1
    cdef unsigned char c
    while q < e:
        c = <unsigned char>q[0]
        if c == 34:   # "
            s[0] = p + 1
            n[0] = q - (p + 1)
            return q + 1
        if c == 92 or c < 32 or c >= 128:
            return NULL
        q += 1
    return NULL


cdef const char* utf8_name(const char* p, const char* e, const char** s, Py_ssize_t* n) noexcept nogil:
    """As plain_string, but bytes beyond ASCII are allowed (a vehicle id:
    UTF-8 is checked where the id is first seen, by the str decoder)."""
    cdef const char* q = p + 1
    cdef unsigned char c
    while q < e:
        c = <unsigned char>q[0]
        if c == 34:
            s[0] = p + 1
            n[0] = q - (p + 1)
            return q + 1
        if c == 92 or c < 32:
            return NULL
        q += 1
    return NULL


cdef const char* skip_string(const char* p, const char* e, bint ascii) noexcept nogil:
    """p at the opening quote; past the closing one, escapes checked. With
    `ascii`, a byte beyond ASCII gives up (unknown fields: their UTF-8 is
    left to decode_record)."""
    cdef const char* q = p + 1
    cdef unsigned char c
    cdef int k
    while q < e:
        c = <unsigned char>q[0]
        if c == 34:
            return q + 1
        if c < 32 or (ascii and c >= 128):
            return NULL
        if c == 92:
            q += 1
            if q >= e:
                return NULL
            c = <unsigned char>q[0]
            if c == 117:   # \uXXXX
                if q + 4 >= e:
                    return NULL
                for k in range(1, 5):
                    c = <unsigned char>q[k]
                    if not ((48 <= c <= 57) or (65 <= c <= 70) or (97 <= c <= 102)):
                        return NULL
                q += 4
            elif c not in (34, 92, 47, 98, 102, 110, 114, 116):
                return NULL
        q += 1
    return NULL


cdef const char* number_token(const char* p, const char* e, bint* integral) noexcept nogil:
    """JSON's number grammar; the end of the token or NULL."""
    cdef const char* q = p
    integral[0] = True
    if q < e and q[0] == 45:   # -
        q += 1
    if q >= e:
        return NULL
    if q[0] == 48:   # 0
        q += 1
    elif 49 <= q[0] <= 57:
        while q < e and 48 <= q[0] <= 57:
            q += 1
    else:
        return NULL
    if q < e and q[0] == 46:   # .
        integral[0] = False
        q += 1
        if q >= e or not (48 <= q[0] <= 57):
            return NULL
        while q < e and 48 <= q[0] <= 57:
            q += 1
    if q < e and (q[0] == 101 or q[0] == 69):   # e E
        integral[0] = False
        q += 1
        if q < e and (q[0] == 43 or q[0] == 45):
            q += 1
        if q >= e or not (48 <= q[0] <= 57):
            return NULL
        while q < e and 48 <= q[0] <= 57:
            q += 1
    if q - p > 40:   # long tokens: decode_record's parser decides
        return NULL
    return q


cdef double[23] POW10 = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12,
                         1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22]


cdef const char* read_double(const char* p, const char* e, double* out):
    """A JSON number (or int) as a double, correctly rounded as msgspec's.
    Coordinates and speeds have few digits: their digits as an integer below
    2**53 and a power of ten up to 1e22 are both exact doubles, so one
    division (or product) rounds correctly (Clinger's fast path). Other
    numbers go to CPython's own parser."""
    cdef bint integral
    cdef const char* q = number_token(p, e, &integral)
    cdef char buf[48]
    cdef char* end
    cdef Py_ssize_t n
    cdef const char* c = p
    cdef unsigned long long m = 0
    cdef int nd = 0, frac = 0
    cdef bint neg = False
    if q == NULL:
        return NULL
    if c[0] == 45:
        neg = True
        c += 1
    while c < q and 48 <= c[0] <= 57:
        m = m * 10 + <unsigned long long>(c[0] - 48)
        nd += 1
        c += 1
    if c < q and c[0] == 46:
        c += 1
        while c < q and 48 <= c[0] <= 57:
            m = m * 10 + <unsigned long long>(c[0] - 48)
            nd += 1
            frac += 1
            c += 1
    if c == q and nd <= 15 and frac <= 22:   # 15 digits: below 2**53
        out[0] = (<double>m) / POW10[frac]
        if neg and not integral:
            out[0] = -out[0]
        elif neg and m != 0:
            out[0] = -out[0]   # "-0" is the integer 0, which converts to +0.0
        return q
    n = q - p
    for k in range(n):
        buf[k] = p[k]
    buf[n] = 0
    out[0] = PyOS_string_to_double(buf, &end, NULL)   # NULL: overflow gives inf, refused below
    if end != buf + n or not isfinite(out[0]):
        return NULL
    return q


cdef const char* skip_value(const char* p, const char* e, int depth, bint ascii) noexcept nogil:
    """Past one JSON value, checked for its grammar; NULL if it is not one."""
    cdef bint integral
    p = ws(p, e)
    if p >= e or depth > MAX_DEPTH:
        return NULL
    cdef char c = p[0]
    if c == 34:
        return skip_string(p, e, ascii)
    if c == 123 or c == 91:   # { [
        p = ws(p + 1, e)
        if p < e and p[0] == (125 if c == 123 else 93):
            return p + 1
        while True:
            if c == 123:
                if p >= e or p[0] != 34:
                    return NULL
                p = skip_string(p, e, ascii)
                if p == NULL:
                    return NULL
                p = ws(p, e)
                if p >= e or p[0] != 58:   # :
                    return NULL
                p += 1
            p = skip_value(p, e, depth + 1, ascii)
            if p == NULL:
                return NULL
            p = ws(p, e)
            if p >= e:
                return NULL
            if p[0] == 44:   # ,
                p = ws(p + 1, e)
                continue
            if p[0] == (125 if c == 123 else 93):
                return p + 1
            return NULL
    if c == 116:
        return p + 4 if e - p >= 4 and memcmp(p, b"true", 4) == 0 else NULL
    if c == 102:
        return p + 5 if e - p >= 5 and memcmp(p, b"false", 5) == 0 else NULL
    if c == 110:
        return p + 4 if e - p >= 4 and memcmp(p, b"null", 4) == 0 else NULL
    return number_token(p, e, &integral)


cdef inline bint is_null(const char* p, const char* e) noexcept nogil:
    return e - p >= 4 and memcmp(p, b"null", 4) == 0


cdef inline int digits(const char* p, int n) noexcept nogil:
    cdef int v = 0
    for k in range(n):
        if not (48 <= p[k] <= 57):
            return -1
        v = v * 10 + (p[k] - 48)
    return v


cdef int[12] MDAYS = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31]


cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    # H. Hinnant's algorithm: days since 1970-01-01 in the proleptic Gregorian calendar
    y -= m <= 2
    cdef int64_t era = (y if y >= 0 else y - 399) // 400
    cdef int64_t yoe = y - era * 400
    cdef int64_t doy = (153 * (m + (-3 if m > 2 else 9)) + 2) // 5 + d - 1
    cdef int64_t doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef bint iso_ms(const char* s, Py_ssize_t n, int64_t* out) noexcept nogil:
    """YYYY-MM-DDTHH:MM:SS[.f{1,6}][Z|+HH:MM|-HH:MM] -> epoch milliseconds,
    exactly as parse_timestamp computes them (datetime.fromisoformat, then
    round(timestamp() * 1000)); False for any other form (decode_record then
    reads it, and rejects what is not ISO 8601)."""
    cdef int y, mo, d, h, mi, sec, oh, om, frac = 0, fd = 0
    cdef int64_t us, off = 0
    cdef Py_ssize_t i = 19
    cdef int mdays
    if n < 19 or s[4] != 45 or s[7] != 45 or s[10] != 84 or s[13] != 58 or s[16] != 58:
        return False
    y = digits(s, 4); mo = digits(s + 5, 2); d = digits(s + 8, 2)
    h = digits(s + 11, 2); mi = digits(s + 14, 2); sec = digits(s + 17, 2)
    if y < 1 or mo < 1 or mo > 12 or d < 1 or h < 0 or h > 23 or mi < 0 or mi > 59 or sec < 0 or sec > 59:
        return False
    mdays = MDAYS[mo - 1]
    if mo == 2 and (y % 4 == 0 and (y % 100 != 0 or y % 400 == 0)):
        mdays = 29
    if d > mdays:
        return False
    if i < n and s[i] == 46:   # .
        i += 1
        while i < n and 48 <= s[i] <= 57:
            if fd == 6:
                return False
            frac = frac * 10 + (s[i] - 48)
            fd += 1
            i += 1
        if fd == 0:
            return False
        while fd < 6:
            frac *= 10
            fd += 1
    if i < n and s[i] == 90:   # Z
        i += 1
    elif i < n and (s[i] == 43 or s[i] == 45):
        if n - i != 6 or s[i + 3] != 58:
            return False
        oh = digits(s + i + 1, 2); om = digits(s + i + 4, 2)
        if oh < 0 or oh > 23 or om < 0 or om > 59:
            return False
        off = (oh * 3600 + om * 60) * (1 if s[i] == 43 else -1)
        i += 6
    if i != n:
        return False
    us = ((days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec) - off) * 1000000 + frac
    if us >= (<int64_t>1 << 53) or us <= -(<int64_t>1 << 53):   # a double holds it exactly
        return False
    out[0] = <int64_t>rint((<double>us / 1e6) * 1000.0)
    return True


cdef inline double py_mod360(double x) noexcept nogil:
    """Python's float x % 360.0 (the sign of the divisor; -0.0 becomes 0.0)."""
    cdef double m = fmod(x, 360.0)
    if m != 0.0:
        if m < 0:
            m += 360.0
    else:
        m = 0.0
    return m


cdef bint in_bounds(double v, double lo, double hi) noexcept nogil:
    return v >= lo and v <= hi


cdef const char* nullable_number(const char* p, const char* e, double* out, double lo, double hi):
    """null (NaN) or a number within [lo, hi]; NULL otherwise."""
    if p < e and p[0] == 110:
        if not is_null(p, e):
            return NULL
        out[0] = NAN
        return p + 4
    p = read_double(p, e, out)
    if p == NULL or not in_bounds(out[0], lo, hi):
        return NULL
    return p


cdef const char* member_key(const char* p, const char* e, const char** k, Py_ssize_t* kn) noexcept nogil:
    """p at a member's name (plain, as plain_string): past its colon and the
    whitespace after it, or NULL."""
    if p >= e or p[0] != 34:
        return NULL
    p = plain_string(p, e, k, kn)
    if p == NULL:
        return NULL
    p = ws(p, e)
    if p >= e or p[0] != 58:
        return NULL
    return ws(p + 1, e)


cdef const char* read_position(const char* p, const char* e, Rec* r):
    cdef int got = 0
    cdef const char* k
    cdef Py_ssize_t kn
    if p >= e or p[0] != 123:
        return NULL
    p = ws(p + 1, e)
    while True:
        p = member_key(p, e, &k, &kn)
        if p == NULL:
            return NULL
        if kn == 3 and memcmp(k, b"lat", 3) == 0 and not (got & 1):
            p = read_double(p, e, &r.lat)
            if p == NULL or not in_bounds(r.lat, -90.0, 90.0):
                return NULL
            got |= 1
        elif kn == 3 and memcmp(k, b"lon", 3) == 0 and not (got & 2):
            p = read_double(p, e, &r.lon)
            if p == NULL or not in_bounds(r.lon, -180.0, 180.0):
                return NULL
            got |= 2
        else:
            return NULL
        p = ws(p, e)
        if p < e and p[0] == 44:
            p = ws(p + 1, e)
            continue
        if p < e and p[0] == 125 and got == 3:
            return p + 1
        return NULL


cdef int key_bit(const char* k, Py_ssize_t n) noexcept nogil:
    if n == 10 and memcmp(k, b"vehicle_id", 10) == 0: return B_VID
    if n == 9 and memcmp(k, b"timestamp", 9) == 0: return B_TS
    if n == 8 and memcmp(k, b"position", 8) == 0: return B_POS
    if n == 5 and memcmp(k, b"speed", 5) == 0: return B_SPEED
    if n == 6 and memcmp(k, b"course", 6) == 0: return B_COURSE
    if n == 7 and memcmp(k, b"heading", 7) == 0: return B_HEADING
    if n == 6 and memcmp(k, b"status", 6) == 0: return B_STATUS
    if n == 12 and memcmp(k, b"vehicle_type", 12) == 0: return B_VTYPE
    if n == 6 and memcmp(k, b"groups", 6) == 0: return B_GROUPS
    if n == 6 and memcmp(k, b"alerts", 6) == 0: return B_ALERTS
    if n == 6 and memcmp(k, b"driver", 6) == 0: return B_DRIVER
    if n == 10 and memcmp(k, b"assignment", 10) == 0: return B_ASSIGN
    return 0


cdef int status_code(const char* s, Py_ssize_t n):
    """STATUS_CODE.get(name, ST_UNKNOWN) of a scanned name."""
    cdef int i
    cdef bytes name
    for i in range(N_STATUSES):
        name = <bytes>_STATUS_NAMES[i]
        if PyBytes_GET_SIZE(name) == n and memcmp(PyBytes_AS_STRING(name), s, n) == 0:
            return i
    return ST_UNKNOWN


cdef bint scan(const char* p, const char* e, Rec* r):
    """One JSON record value into `r`; False: let decode_record read it."""
    cdef const char* k
    cdef Py_ssize_t kn
    cdef int bit, f
    cdef bint integral
    cdef const char* q
    cdef const char* s
    cdef Py_ssize_t sn
    r.seen = 0
    r.speed = NAN
    r.course = NAN
    r.heading = NAN
    r.status = KEEP
    r.vtype_null = True
    for f in range(4):
        r.rich[f] = NULL
    p = ws(p, e)
    if p >= e or p[0] != 123:
        return False
    p = ws(p + 1, e)
    while True:
        p = member_key(p, e, &k, &kn)
        if p == NULL or p >= e:
            return False
        bit = key_bit(k, kn)
        if bit & r.seen:
            return False   # a field named twice: msgspec keeps the last, decode_record decides
        r.seen |= bit
        if bit == B_VID:
            if p[0] != 34:
                return False
            p = utf8_name(p, e, &r.vid, &r.vid_len)
            if p == NULL or r.vid_len < 1 or r.vid_len > 512:
                return False
        elif bit == B_TS:
            if p[0] == 34:
                p = plain_string(p, e, &s, &sn)
                if p == NULL or not iso_ms(s, sn, &r.ts) or r.ts < 0 or r.ts > 100000000000000:
                    return False   # out of range too: decode_record rejects it
            else:
                q = number_token(p, e, &integral)
                if q == NULL or not integral or q - p > 15 or p[0] == 45:
                    return False   # negative, fractional or huge: decode_record
                r.ts = 0
                while p < q:
                    r.ts = r.ts * 10 + (p[0] - 48)
                    p += 1
                if r.ts > 100000000000000:
                    return False
        elif bit == B_POS:
            p = read_position(p, e, r)
            if p == NULL:
                return False
        elif bit == B_SPEED:
            p = nullable_number(p, e, &r.speed, 0.0, 10000.0)
        elif bit == B_COURSE:
            p = nullable_number(p, e, &r.course, -1e12, 1e12)
        elif bit == B_HEADING:
            p = nullable_number(p, e, &r.heading, -1e12, 1e12)
        elif bit == B_STATUS:
            if is_null(p, e):
                p += 4
            else:
                if p[0] != 34:
                    return False
                p = plain_string(p, e, &s, &sn)
                if p == NULL or sn > 64:
                    return False
                r.status = status_code(s, sn)
        elif bit == B_VTYPE:
            if is_null(p, e):
                p += 4
            else:
                if p[0] != 34:
                    return False
                p = plain_string(p, e, &r.vtype, &r.vtype_len)
                if p == NULL or r.vtype_len < 1 or r.vtype_len > 64:
                    return False
                r.vtype_null = False
        elif bit == 0:
            p = skip_value(p, e, 0, True)   # a field UpdateIn does not name
        else:
            f = (R_GROUPS if bit == B_GROUPS else R_ALERTS if bit == B_ALERTS else
                 R_DRIVER if bit == B_DRIVER else R_ASSIGN)
            if is_null(p, e):
                p += 4
            else:
                if p[0] != (91 if f <= R_ALERTS else 123):   # [ for lists, { for objects
                    return False
                q = skip_value(p, e, 0, False)
                if q == NULL:
                    return False
                r.rich[f] = p
                r.rich_len[f] = q - p
                p = q
        if p == NULL:
            return False
        p = ws(p, e)
        if p < e and p[0] == 44:
            p = ws(p + 1, e)
            continue
        if p < e and p[0] == 125:
            p = ws(p + 1, e)
            return p == e and (r.seen & (B_VID | B_TS | B_POS)) == (B_VID | B_TS | B_POS)
        return False


cdef class RecordDecoder:
    """One per consumer; holds what it learned about the core's rows."""
    cdef object core
    cdef object slow            # decode_record(value, msgpack) -> UpdateIn, or raises Rejected
    cdef object rejected_type
    cdef object is_msgpack      # headers -> bool
    cdef object rich_decoders   # msgspec decoders with UpdateIn's constraints, by R_*
    cdef object finish_object   # driver/assignment checks of _finish
    cdef unordered_map[string, int] rows
    cdef unordered_map[string, int] vtypes
    cdef list memo_raw          # [field][row] -> bytes last parsed, or None
    cdef list memo_obj          # [field][row] -> what it parsed into
    cdef Py_ssize_t memo_len
    # [row] -> the poll in which a record of that vehicle carried a rich value
    # the core did not hold, or went the other way: later records of it in
    # the same poll must not say "as stored", since apply() runs them in order
    cdef vector[unsigned int] touched
    cdef unsigned int poll
    cdef long long max_ts       # this poll's bound: S.MAX_AHEAD_MS past the clock
    cdef public object stats    # counters: scanned, slow
    # a poll's new vehicles, made together once the poll is read (at start
    # that is the whole fleet): until then their records carry the row
    # NEW_ROW - k, k an index into these; made are those with a valid record
    cdef dict pending           # id -> k
    cdef list pending_ids
    cdef list pending_used
    cdef vector[string] pending_keys

    def __init__(self, core, slow, rejected_type, is_msgpack, rich_decoders, finish_object):
        self.core = core
        self.slow = slow
        self.rejected_type = rejected_type
        self.is_msgpack = is_msgpack
        self.rich_decoders = rich_decoders
        self.finish_object = finish_object
        self.memo_raw = [[], [], [], []]
        self.memo_obj = [[], [], [], []]
        self.stats = {"scanned": 0, "slow": 0}
        self.pending = {}
        self.pending_ids = []
        self.pending_used = []

    cdef int row_of_str(self, str vid, bint scanned_key) except -3:
        """A valid id's row, or the placeholder of a vehicle new in this poll."""
        cdef int k
        cdef Py_ssize_t n
        cdef const char* s
        row = self.core.id_to_row.get(vid)
        if row is not None:
            return row
        k = self.pending.get(vid, -1)
        if k < 0:
            k = len(self.pending_ids)
            self.pending[vid] = k
            self.pending_ids.append(vid)
            self.pending_used.append(0)
            s = PyUnicode_AsUTF8AndSize(vid, &n)
            self.pending_keys.push_back(string(s, n))
            self.rows[self.pending_keys.back()] = NEW_ROW - k
        return NEW_ROW - k

    cdef int row_of(self, const char* s, Py_ssize_t n) except -3:
        """The row of a scanned id (a placeholder, <= NEW_ROW, for a vehicle
        new in this poll); -1 for what is not a valid id (1..128 characters
        of UTF-8): decode_record then says why."""
        cdef string key = string(s, n)
        cdef Py_ssize_t sn
        cdef const char* stored
        cdef list ids = self.core.ids
        it = self.rows.find(key)
        if it != self.rows.end():
            row = deref(it).second
            if row <= NEW_ROW:
                if NEW_ROW - row < <int>self.pending_keys.size() and self.pending_keys[NEW_ROW - row] == key:
                    return row   # a vehicle new in this poll, seen again
            elif row < len(ids):
                stored = PyUnicode_AsUTF8AndSize(ids[row], &sn)
                if sn == n and memcmp(stored, s, n) == 0:
                    return row
        try:
            vid = PyUnicode_DecodeUTF8(s, n, "strict")
        except UnicodeDecodeError:
            return -1
        if not 1 <= PyUnicode_GET_LENGTH(vid) <= 128:
            return -1
        row = self.core.id_to_row.get(vid)
        if row is None:
            return self.row_of_str(vid, True)
        self.remember(key, row)
        return row

    cdef make_pending(self, cnp.ndarray[cnp.int32_t] rows, cnp.ndarray[cnp.uint8_t] keep):
        """The poll's new vehicles that have a valid record get their rows,
        in the order they first appeared; the placeholders become those."""
        cdef Py_ssize_t i, k, n = len(self.pending_ids)
        cdef cnp.ndarray[cnp.int32_t] made = np.full(n, -1, np.int32)
        id_to_row = self.core.id_to_row
        used = []
        for k in range(n):
            if self.pending_used[k]:
                row = id_to_row.get(self.pending_ids[k])
                if row is None:
                    used.append(k)
                else:   # made meanwhile by another way in: never twice
                    made[k] = row
        for k, row in zip(used, self.core._new_vehicles([self.pending_ids[k] for k in used])):
            made[k] = row
        self.bound()   # new ids come in here: ids that rotate (trackers renamed daily) must not pile up
        for k in range(n):
            if made[k] >= 0:
                self.rows[self.pending_keys[k]] = made[k]
            else:
                self.rows.erase(self.pending_keys[k])
        for i in range(len(rows)):
            if rows[i] <= NEW_ROW and keep[i]:
                rows[i] = made[NEW_ROW - rows[i]]
        self.pending.clear()
        self.pending_ids = []
        self.pending_used = []
        self.pending_keys.clear()

    cdef void remember(self, string key, int row):
        self.bound()
        self.rows[key] = row

    def known_ids(self) -> int:
        """How many ids the id -> row map holds (tests: it stays bounded)."""
        return self.rows.size()

    cdef void bound(self):
        """The id -> row map keeps ids of vehicles long gone (a lookup checks
        the row's id, so a stale entry is never wrong, only kept): past twice
        the fleet it starts again, and fills from the next polls."""
        if self.rows.size() > 2 * len(self.core.ids) + 4096:
            self.rows.clear()

    cdef int vtype_of(self, const char* s, Py_ssize_t n) except -1:
        cdef string key = string(s, n)
        it = self.vtypes.find(key)
        if it != self.vtypes.end():
            return deref(it).second
        code = self.core.vtype_code(PyUnicode_DecodeUTF8(s, n, "strict"))
        if self.vtypes.size() < 1024:   # codes never change; names beyond MAX_TYPES share one
            self.vtypes[key] = code
        return code

    cdef inline void _grow(self, int row):
        if row < self.memo_len:
            return
        extra = row + 1 - self.memo_len + 1024
        for f in range(4):
            (<list>self.memo_raw[f]).extend([None] * extra)
            (<list>self.memo_obj[f]).extend([None] * extra)
        self.memo_len += extra
        self.touched.resize(self.memo_len, 0)

    cdef void touch(self, int row):
        """A record of this vehicle took the other way in this poll: what it
        sets is applied before the poll's later records, so none of those may
        say "as stored". (The memo itself, raw text -> object, stays true.)"""
        self._grow(row)
        self.touched[row] = self.poll

    cdef object parse_rich(self, int f, const char* s, Py_ssize_t n):
        """A rich field's text -> its object (a tuple or a dict: never None),
        or None when msgspec refuses it under UpdateIn's constraints."""
        try:
            obj = self.rich_decoders[f](PyBytes_FromStringAndSize(s, n))
            if f >= R_DRIVER:
                obj = self.finish_object(obj, n)
        except Exception:
            return None
        return obj

    cdef int rich(self, int row, int f, const char* s, Py_ssize_t n, list stored, list out, Py_ssize_t i) except -2:
        """out[i] = the field's object, or None when the core holds an equal
        one already; -1 when msgspec refuses it (decode_record then)."""
        cdef list raws = self.memo_raw[f]
        cdef list objs = self.memo_obj[f]
        raw = raws[row]
        if raw is not None and PyBytes_GET_SIZE(raw) == n and memcmp(PyBytes_AS_STRING(raw), s, n) == 0:
            obj = objs[row]
        else:
            raw = PyBytes_FromStringAndSize(s, n)
            obj = self.parse_rich(f, s, n)
            if obj is None:
                return -1
            raws[row] = raw
            objs[row] = obj
        if self.touched[row] != self.poll and PyObject_RichCompareBool(obj, stored[row], Py_EQ):
            out[i] = None
            return 0
        out[i] = obj
        self.touched[row] = self.poll
        return 1

    def decode(self, list records):
        """-> (UpdateBatch or None, [(record, Rejected)]). The batch's rows
        are looked up (its ids are not made); `rich` marks the updates whose
        rich columns hold anything. Should anything raise part-way, the
        poll's new vehicles are forgotten, not left as placeholders."""
        try:
            return self._decode(records)
        except BaseException:
            self.drop_pending()
            raise

    cdef void drop_pending(self):
        for k in range(<Py_ssize_t>self.pending_keys.size()):
            it = self.rows.find(self.pending_keys[k])
            if it != self.rows.end() and deref(it).second <= NEW_ROW:
                self.rows.erase(it)
        self.pending.clear()
        self.pending_ids = []
        self.pending_used = []
        self.pending_keys.clear()

    cdef _decode(self, list records):
        cdef Py_ssize_t n = len(records), i, j, sn
        cdef Rec r
        cdef const char* p
        cdef int row, f, k
        cdef bint fast
        cdef cnp.ndarray[cnp.float64_t] lat = np.empty(n, np.float64)
        cdef cnp.ndarray[cnp.float64_t] lon = np.empty(n, np.float64)
        cdef cnp.ndarray[cnp.float64_t] speed = np.empty(n, np.float64)
        cdef cnp.ndarray[cnp.float64_t] course = np.empty(n, np.float64)
        cdef cnp.ndarray[cnp.uint8_t] status = np.empty(n, np.uint8)
        cdef cnp.ndarray[cnp.uint8_t] vtype = np.empty(n, np.uint8)
        cdef cnp.ndarray[cnp.int64_t] ts = np.empty(n, np.int64)
        cdef cnp.ndarray[cnp.int32_t] rows = np.empty(n, np.int32)
        cdef cnp.ndarray[cnp.uint8_t] keep = np.ones(n, np.uint8)
        cdef cnp.ndarray[cnp.uint8_t] has_rich = np.zeros(n, np.uint8)
        cdef list cols = [[None] * n, [None] * n, [None] * n, [None] * n]   # by R_*
        core = self.core
        cdef list stored = [core.carried, core.alerts, core.driver, core.assignment]   # as the updates had them
        rejected = []
        scanned = 0
        self.poll += 1
        self.max_ts = <long long>(time.time() * 1000) + S.MAX_AHEAD_MS
        if self.poll == 0:   # wrapped: no row may look touched in this poll
            for j in range(<Py_ssize_t>self.touched.size()):
                self.touched[j] = 0
            self.poll = 1
        for i in range(n):
            rec = records[i]
            value = rec.value
            headers = rec.headers
            fast = (type(value) is bytes and not (headers and self.is_msgpack(headers)))
            if fast:
                p = PyBytes_AS_STRING(value)
                fast = scan(p, p + PyBytes_GET_SIZE(value), &r) and r.ts <= self.max_ts   # else decode_record says why
            if fast:
                row = self.row_of(r.vid, r.vid_len)
                fast = row != -1
            if fast and row <= NEW_ROW:
                # a vehicle new in this poll: its rich fields parsed without
                # the memo and never "as stored" (apply compares them in order)
                for f in range(4):
                    if r.rich[f] != NULL:
                        obj = self.parse_rich(f, r.rich[f], r.rich_len[f])
                        if obj is None:
                            fast = False
                            break
                        cols[f][i] = obj
                        has_rich[i] = 1
                if fast:
                    self.pending_used[NEW_ROW - row] += 1
            elif fast:
                self._grow(row)
                for f in range(4):
                    if r.rich[f] != NULL:
                        k = self.rich(row, f, r.rich[f], r.rich_len[f], stored[f], cols[f], i)
                        if k < 0:
                            fast = False
                            break
                        if k:
                            has_rich[i] = 1
            if fast:
                scanned += 1
                rows[i] = row
                lat[i] = r.lat
                lon[i] = r.lon
                speed[i] = r.speed
                # _finish: course, else heading, in [0, 360)
                course[i] = r.course if r.course == r.course else r.heading
                if course[i] == course[i]:
                    course[i] = py_mod360(course[i])
                status[i] = r.status
                vtype[i] = KEEP if r.vtype_null else self.vtype_of(r.vtype, r.vtype_len)
                ts[i] = r.ts
                continue
            for f in range(4):
                cols[f][i] = None
            has_rich[i] = 0
            try:
                u = self.slow(value, bool(headers) and self.is_msgpack(headers))
            except self.rejected_type as e:   # the caller counts it and sends it on
                rejected.append((rec, e))
                keep[i] = 0
                rows[i] = 0
                continue
            row = self.row_of_str(u.vehicle_id, False)
            if row <= NEW_ROW:
                self.pending_used[NEW_ROW - row] += 1
            else:
                self.touch(row)
            rows[i] = row
            lat[i] = u.position.lat
            lon[i] = u.position.lon
            speed[i] = math.nan if u.speed is None else u.speed
            course[i] = math.nan if u.course is None else u.course
            status[i] = KEEP if u.status is None else STATUS_CODE.get(u.status, ST_UNKNOWN)
            vtype[i] = KEEP if u.vehicle_type is None else core.vtype_code(u.vehicle_type)
            ts[i] = u.timestamp
            for f, v in enumerate((u.groups, u.alerts, u.driver, u.assignment)):
                if v is not None:
                    cols[f][i] = tuple(v) if f <= R_ALERTS else v
                    has_rich[i] = 1
        self.stats["scanned"] += scanned
        self.stats["slow"] += n - scanned
        if self.pending_ids:
            self.make_pending(rows, keep)
        if rejected:
            if len(rejected) == n:
                return None, rejected
            sel = keep.view(np.bool_)
            idx = np.flatnonzero(sel).tolist()
            cols = [[c[j] for j in idx] for c in cols]
            lat, lon, speed, course = lat[sel], lon[sel], speed[sel], course[sel]
            status, vtype, ts, rows, has_rich = status[sel], vtype[sel], ts[sel], rows[sel], has_rich[sel]
        if n == 0:
            return None, rejected
        batch = UpdateBatch.of_rows(rows, lat, lon, speed, course, status, vtype, ts,
                                    cols[R_ALERTS], cols[R_DRIVER], cols[R_ASSIGN], cols[R_GROUPS],
                                    has_rich.view(np.bool_))
        return batch, rejected

