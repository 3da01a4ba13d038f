"""The one definition of the core's record layout, codes and wire pieces.

Both the compiled core (_core.pyx) and the numpy reference (_reference.py)
import from here, so the two cannot disagree on a dtype, a status code or how a
rich field (driver, assignment, alerts, event body) is encoded. Nothing here is
on the per-delivery hot path: rich fields are encoded once when they change.
"""
from __future__ import annotations

import json

import msgpack
import msgspec
import numpy as np

# --- vehicle record -------------------------------------------------------
# The cdef struct VehicleRec in _core.pyx mirrors this dtype field for field;
# tests/test_core.py checks that sizes and offsets agree.
VEHICLE_DTYPE = np.dtype(
    [
        ("lat", "<f8"),
        ("lon", "<f8"),
        ("speed", "<f8"),
        ("course", "<f8"),
        ("ts", "<i8"),          # epoch milliseconds of the applied update
        ("al_ver", "<u4"),      # bumped whenever the alerts list changes
        ("dr_ver", "<u4"),      # driver (full, with phone) changed
        ("drr_ver", "<u4"),     # driver as seen without view_driver_contacts changed
        ("as_ver", "<u4"),      # assignment changed
        ("version", "<u4"),     # number of updates applied
        ("status", "u1"),
        ("vtype", "u1"),
        ("has_alerts", "u1"),
        ("_pad", "u1"),
    ],
    align=True,
)

# --- codes ----------------------------------------------------------------
STATUSES = ("moving", "idle", "stopped", "offline", "unknown")
STATUS_CODE = {s: i for i, s in enumerate(STATUSES)}
ST_MOVING, ST_IDLE, ST_STOPPED, ST_OFFLINE, ST_UNKNOWN = range(5)
ALL_STATUS_MASK = (1 << len(STATUSES)) - 1
KEEP = 255  # "field absent from this update, keep the stored value" for status/vtype
MAX_ID_LEN = 128  # a vehicle id or group name, in characters (ingest's Name)
# The group of the selection that matches nothing (a restricted token that
# names nothing): longer than any group name an update, a relay or a hash
# may carry (MAX_ID_LEN), so no data can put a vehicle in it ("\x00nothing"
# could be carried, and every client granted nothing then saw that vehicle).
NOTHING_GROUP = "\x00nothing:" + "-" * MAX_ID_LEN
# An update's timestamp may be at most this far ahead of the server's clock:
# one from 2099 was taken, and every true update after it was older, so the
# vehicle froze (offline while it reported, then forgotten)
MAX_AHEAD_MS = 3_600_000

MAX_TYPES = 64  # vehicle_type codes fit a uint64 filter mask
ALL_TYPES_MASK = (1 << 64) - 1

# Field bits of a change mask (apply() returns them; the tick derives pos vs delta).
F_P, F_S, F_C, F_ST, F_VT, F_AL, F_DR, F_DRR, F_AS, F_G, F_TS = (1 << i for i in range(11))
POS_FIELDS = F_P | F_S | F_C

# Message kinds inside a batch. The five leave kinds carry their reason.
K_FULL, K_POS, K_DELTA, K_LEAVE_VIEWPORT, K_LEAVE_FILTER, K_LEAVE_SUBSCRIPTION, \
    K_LEAVE_PERMISSION, K_LEAVE_STALE = range(8)
N_KINDS = 8
LEAVE_REASONS = {
    K_LEAVE_VIEWPORT: "viewport",
    K_LEAVE_FILTER: "filter",
    K_LEAVE_SUBSCRIPTION: "subscription",
    K_LEAVE_PERMISSION: "permission",
    K_LEAVE_STALE: "stale",
}

# Client output formats.
FMT_JSON, FMT_MSGPACK = 0, 1

# Priority lanes inside a batch (PROTOCOL §3: events and alerts, then moving
# vehicles, then idle vehicles and service messages).
LANE_EVENT, LANE_MOVING, LANE_OTHER = 0, 1, 2


def variant(fmt: int, show_alerts: bool, contacts: bool) -> int:
    """The encoding variant of a client: which bytes of a vehicle it may get."""
    return (fmt << 2) | (int(bool(show_alerts)) << 1) | int(bool(contacts))


# --- encoding of rich values (done once per change, never per delivery) ----
def enc_json(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def msgpack_array_head(n: int) -> bytes:
    """The msgpack header of an array of n elements (a batch body's)."""
    if n < 16:
        return bytes([0x90 | n])
    return b"\xdc" + n.to_bytes(2, "big") if n < 65536 else b"\xdd" + n.to_bytes(4, "big")


def msgpack_items(body: bytes) -> tuple[int, bytes]:
    """An encoded msgpack array body as (its length, its items' bytes)."""
    h = body[0]
    if h & 0xF0 == 0x90:
        return h & 0x0F, body[1:]
    if h == 0xDC:
        return int.from_bytes(body[1:3], "big"), body[3:]
    return int.from_bytes(body[1:5], "big"), body[5:]   # 0xdd


def body_of(fmt: int, pieces: list[bytes]) -> bytes:
    """A batch body (the `messages` array) from encoded pieces."""
    if fmt == FMT_JSON:
        return b"[" + b",".join(pieces) + b"]"
    return msgpack_array_head(len(pieces)) + b"".join(pieces)


def enc_msgpack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def enc_both(obj) -> tuple[bytes, bytes]:
    return enc_json(obj), enc_msgpack(obj)


def enc_name(name: str) -> tuple[bytes, bytes]:
    """enc_both of a string, without json.dumps for the usual id (printable
    ASCII, nothing to escape: its JSON is itself in quotes). A new vehicle
    pays this once; 20k at start were 1.7 us each."""
    if name.isascii() and name.isprintable() and '"' not in name and "\\" not in name:
        # msgspec writes a str as msgpack.packb does (fixstr, str8, str16, str32)
        return b'"' + name.encode() + b'"', _mp_str(name)
    return enc_both(name)


_mp_str = msgspec.msgpack.Encoder().encode


def redact_driver(driver):
    """What a client without view_driver_contacts may see of a driver."""
    if not isinstance(driver, dict):
        return driver
    if "phone" not in driver:
        return driver
    return {k: v for k, v in driver.items() if k != "phone"}


def fmt_num(x: float, decimals: int) -> str:
    """Shortest fixed-point text with at most `decimals` decimals.

    The compiled core (_core.pyx fmt_num) writes the same text from the
    integer llround(x * 10**decimals), digit by digit. The two agree for the
    values the core holds, already rounded to `decimals` by UpdateBatch (on a
    tie such as 0.125 at 2 decimals printf gives 0.12, llround 0.13), so JSON
    and msgpack (which packs float(text)) agree.
    """
    s = "%.*f" % (decimals, x)
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s == "-0":
        s = "0"
    return s


LAT_DECIMALS = 6
SPEED_DECIMALS = 2
COURSE_DECIMALS = 1


class UpdateBatch:
    """A columnar batch of validated vehicle updates, the input of apply().

    Numeric columns are numpy arrays; NaN (speed, course) or KEEP (status,
    vtype) means the update did not carry the field and the stored value stays.
    Rich columns are lists whose None means the same.
    """

    __slots__ = ("ids", "lat", "lon", "speed", "course", "status", "vtype", "ts",
                 "alerts", "driver", "assignment", "groups", "ingest_ns", "rows", "rich")

    def __init__(self, ids, lat, lon, speed, course, status, vtype, ts,
                 alerts, driver, assignment, groups, ingest_ns=0):
        n = len(ids)
        self.ids = list(ids)
        # Coordinates carry at most 6 decimals (PROTOCOL §3.1); rounding here
        # once means neither core rounds and both see the same doubles.
        self.lat = np.round(np.ascontiguousarray(lat, dtype=np.float64), LAT_DECIMALS)
        self.lon = np.round(np.ascontiguousarray(lon, dtype=np.float64), LAT_DECIMALS)
        # Speed and course too are stored as sent (2 and 1 decimals), so that
        # the compiled encoder can format them as scaled integers, exactly.
        self.speed = np.round(np.ascontiguousarray(speed, dtype=np.float64), SPEED_DECIMALS)
        self.course = np.round(np.ascontiguousarray(course, dtype=np.float64), COURSE_DECIMALS)
        # 359.95 rounds to 360.0, which is 0 (course is in [0, 360), and a
        # worker receiving the relay refuses 360); NaN stays NaN
        self.course[self.course >= 360.0] -= 360.0
        self.status = np.ascontiguousarray(status, dtype=np.uint8)
        self.vtype = np.ascontiguousarray(vtype, dtype=np.uint8)
        self.ts = np.ascontiguousarray(ts, dtype=np.int64)
        self.alerts = list(alerts) if alerts is not None else [None] * n
        self.driver = list(driver) if driver is not None else [None] * n
        self.assignment = list(assignment) if assignment is not None else [None] * n
        self.groups = list(groups) if groups is not None else [None] * n
        self.ingest_ns = ingest_ns
        self.rows = None   # the core's rows, when the decoder looked them up (of_rows)
        self.rich = None   # which updates carry a rich field; None: any may
        for col in (self.lat, self.lon, self.speed, self.course, self.status,
                    self.vtype, self.ts, self.alerts, self.driver, self.assignment,
                    self.groups):
            if len(col) != n:
                raise ValueError("UpdateBatch columns differ in length")

    @classmethod
    def of_rows(cls, rows, lat, lon, speed, course, status, vtype, ts,
                alerts, driver, assignment, groups, rich):
        """A batch whose rows the Kafka decoder (_ingest.pyx) looked up: no
        id string is made per update. `rich` marks the updates whose rich
        columns hold anything, so that apply() looks at those only."""
        b = cls([None] * len(rows), lat, lon, speed, course, status, vtype, ts,
                alerts, driver, assignment, groups)
        b.ids = None
        b.rows = rows
        b.rich = rich
        return b

    def __len__(self):
        return len(self.ts)
