"""The core's state and its pure-Python API, shared by both implementations.

CoreBase owns every array (vehicle records, visibility bitsets, selections,
client table) and the bookkeeping that runs per command or per changed rich
field: id -> row, type and group interning, selection sets, alert detection.
The per-tick work -- numeric apply, routing, encoding, frame assembly -- is
done by a kernel: `realtime._core._core` (Cython) for `Core`, and
`realtime._core._reference` (numpy and plain Python) for `ReferenceCore`, the
test oracle. Both kernels read and write the same attributes, so the same tests
run against both and they cannot drift.

Lifetime: one CoreBase per worker process, owned by the hub. It does no I/O and
knows nothing of sockets or clocks (the caller passes `now`, in seconds of any
monotonic clock); a client is an integer row.
"""
from __future__ import annotations

from collections import defaultdict

import math
import time

import numpy as np

from . import _schema as S

CLIENT_DTYPE = np.dtype(
    [
        ("south", "<f8"),
        ("west", "<f8"),
        ("north", "<f8"),
        ("east", "<f8"),
        ("type_mask", "<u8"),
        ("rights_sel", "<i4"),   # -1: may see every vehicle
        ("sub_sel", "<i4"),      # -1: subscribed to every vehicle
        ("zoom", "<f4"),
        ("used", "u1"),
        ("active", "u1"),        # has a subscription
        ("fmt", "u1"),
        ("show_alerts", "u1"),
        ("contacts", "u1"),      # view_driver_contacts
        ("has_bbox", "u1"),
        ("status_mask", "u1"),
        ("clustered", "u1"),     # gets `clusters`, not per-vehicle messages
    ],
    align=True,
)


NOT_SILENCED = 255  # `silenced`: the row is not offline by silence


class TickPending(RuntimeError):
    """A command ran while updates were applied but not yet routed."""


def grid_window(south: float, west: float, north: float, east: float, cell_deg: float):
    """A viewport as the cells of the cluster grid (cells start at -90 /
    -180) that it touches: (first row, row after the last, first column,
    column after the last), or with None for the columns when it spans the
    globe's width. Nearby viewports give the same cells; a vehicle on the
    viewport's edge is in (as visibility counts it)."""
    y0 = math.floor((south + 90.0) / cell_deg)
    y1 = math.floor((north + 90.0) / cell_deg) + 1
    width = east - west if east >= west else east + 360.0 - west
    if width + cell_deg >= 360.0:
        return (y0, y1, None, None)
    x0 = math.floor((west + 180.0) / cell_deg)
    x1 = math.floor((east + 180.0) / cell_deg) + 1   # past x0 when the viewport wraps
    return (y0, y1, x0, x1)


def records(a: np.ndarray, rows) -> np.ndarray:
    """a[rows] for a structured array, as whole records: indexing a structured
    array by rows copies field by field (~250 us for 1,000 rows of
    VEHICLE_DTYPE here); taking them as opaque items of the same size is ~20x
    faster."""
    return a.view(np.dtype((np.void, a.dtype.itemsize))).take(rows).view(a.dtype)


def _words(n: int) -> int:
    return max(1, (n + 63) // 64)


class CoreBase:
    def __init__(self, vehicle_capacity: int = 1024, client_capacity: int = 64):
        vcap = _words(vehicle_capacity) * 64
        ccap = _words(client_capacity) * 64
        # vehicles
        self.cur = np.zeros(vcap, S.VEHICLE_DTYPE)
        self.sent = np.zeros(vcap, S.VEHICLE_DTYPE)
        self.dirty = np.zeros(vcap, np.uint8)
        self.n = 0
        self.ids: list[str] = []
        self.id_to_row: dict[str, int] = {}
        self.ignored_stale = 0
        self.new_alerts: list[tuple[int, str]] = []
        # row -> which rich fields changed (F_AL...), kept only where a worker
        # mirrors this core to others (mirror.Owner sets a dict; None: not kept)
        self.rich_log: dict | None = None
        # vehicle -> the groups the registry names it in (set_group_members),
        # and group -> the vehicles it names: an update's groups do not take
        # those away (_apply_rich), and the registry's next read does when it
        # no longer names them. Kept after a vehicle is forgotten: it is what
        # the registry holds for groups in use, which bounds it, and a vehicle
        # made again keeps its groups
        self.registry_of: dict[str, set] = {}
        self.registry_members: dict[str, set] = {}
        self.registry_made: set[int] = set()   # rows set_group_members made (unlisted_rows)
        # rich values per row, and their encodings as (json, msgpack) pairs
        self.alerts: list[tuple] = []
        self.driver: list = []
        self.assignment: list = []
        self.groups_of: list[tuple] = []   # carried + the registry's (what rights and subscriptions see)
        self.carried: list[tuple] = []     # the groups the latest update carried, each once
        self.enc_id: list[tuple[bytes, bytes]] = []
        self.enc_al: list[tuple[bytes, bytes]] = []
        self.enc_dr: list = []
        self.enc_drr: list = []
        self.enc_as: list = []
        # vehicle types
        self.types: list[str] = ["unknown"]
        self.types_overflowed = 0   # lookups of a type name that found no code left (vtype_code)
        self.type_code: dict[str, int] = {"unknown": 0}
        self.enc_types = [S.enc_both("unknown")]
        self.enc_statuses = [S.enc_both(s) for s in S.STATUSES]
        # groups: one bitset row per group that some vehicle carries, with the
        # count of those vehicles; a row is freed (and reused) when no vehicle
        # carries the group and no selection names it. A name that only a
        # subscription uses costs no row (PROTOCOL §3.5).
        self.group_id: dict[str, int] = {}
        self.group_bits = np.zeros((8, vcap // 64), np.uint64)
        self.group_size: list[int] = []
        self.group_free: list[int] = []
        # selections: interned (vehicles, groups) sets, one bitset row each,
        # shared by every client and token that names the same sets
        self.sel_key: dict[tuple, int] = {}
        self.sel_spec: list = []          # (frozenset ids, frozenset groups) or None when free
        self.sel_refs: list[int] = []
        self.sel_free: list[int] = []
        self.sel_epoch = 0   # bumped when a selection id is given out or freed
        self.sel_bits = np.zeros((8, vcap // 64), np.uint64)
        self.sel_by_vid: dict[str, set] = defaultdict(set)
        self.sel_by_group: dict[str, set] = defaultdict(set)
        # clients
        self.clients = np.zeros(ccap, CLIENT_DTYPE)
        self.vis = np.zeros((vcap, ccap // 64), np.uint64)  # [vehicle row, client word]
        self.client_types: dict[int, frozenset] = {}
        self.client_free: list[int] = []
        self.n_clients = 0       # high-water mark of client rows
        self.events: list = []   # pending (row, pieces(json, mp), is_alert)
        self.grid_dirty = True
        # clients whose routing inputs changed since the grid was built; a
        # command's tick routes them by brute force instead of rebuilding
        self.grid_pending: set[int] = set()
        self.kernel_state = None  # private to the kernel (the Cython grid)
        # liveness (PROTOCOL §3.3): when a row last brought news, when it was
        # last routed, and its status before silence turned it offline
        self.heard = np.zeros(vcap, np.float64)
        self.sent_at = np.zeros(vcap, np.float64)
        self.silenced = np.full(vcap, NOT_SILENCED, np.uint8)
        self.row_free: list[int] = []   # rows of forgotten (stale) vehicles, for reuse
        # idle jitter: a non-moving vehicle's position change under jitter_m
        # metres is held back until jitter_s seconds after its last send (0: off)
        self.jitter_s = 0.0
        self.jitter_m = 0.0

    # ------------------------------------------------------------------ vehicles
    @property
    def vcap(self) -> int:
        return len(self.cur)

    def vtype_code(self, name: str) -> int:
        code = self.type_code.get(name)
        if code is None:
            if len(self.types) >= S.MAX_TYPES:
                # no code left (a filter is a 64-bit mask): `unknown`, as an
                # unrecognised value is, never another type's name
                self.types_overflowed += 1
                return 0
            code = len(self.types)
            self.types.append(name)
            self.type_code[name] = code
            self.enc_types.append(S.enc_both(name))
            self._refresh_type_masks()
        return code

    def _grow_vehicles(self):
        old = self.vcap
        new = old * 2
        for name in ("cur", "sent"):
            arr = np.zeros(new, S.VEHICLE_DTYPE)
            arr[:old] = getattr(self, name)
            setattr(self, name, arr)
        for name, fill in (("dirty", 0), ("heard", 0), ("sent_at", 0), ("silenced", NOT_SILENCED)):
            a = getattr(self, name)
            b = np.full(new, fill, a.dtype)
            b[:old] = a
            setattr(self, name, b)
        vis = np.zeros((new, self.vis.shape[1]), np.uint64)
        vis[:old] = self.vis
        self.vis = vis
        for name in ("group_bits", "sel_bits"):
            a = getattr(self, name)
            b = np.zeros((a.shape[0], new // 64), np.uint64)
            b[:, : a.shape[1]] = a
            setattr(self, name, b)

    _ROW_LISTS = ("ids", "alerts", "driver", "assignment", "groups_of", "carried", "enc_id", "enc_al",
                  "enc_dr", "enc_drr", "enc_as")

    _NO_ALERTS = S.enc_both([])

    def _row_values(self, vid: str) -> tuple:
        """A fresh row's entries in _ROW_LISTS, in that order."""
        return (vid, (), None, None, (), (), S.enc_name(vid), self._NO_ALERTS, None, None, None)

    _row_lists = None   # the _ROW_LISTS objects themselves (made once; never rebound)

    def _lists(self) -> tuple:
        lists = self._row_lists
        if lists is None:
            lists = self._row_lists = tuple(getattr(self, name) for name in self._ROW_LISTS)
        return lists

    def _new_vehicle(self, vid: str) -> int:
        return self._new_vehicles([vid])[0]

    def _new_vehicles(self, vids: list) -> list:
        """Rows for vehicles not in the core (each id once): freed rows first,
        then rows appended at the end, blanked in one go. The Kafka decoder
        makes a poll's new vehicles here together: at start, the whole fleet."""
        lists = self._lists()
        rows = []
        while self.row_free and len(rows) < len(vids):
            row = self.row_free.pop()
            for lst, value in zip(lists, self._row_values(vids[len(rows)])):
                lst[row] = value
            self._blank(row)
            rows.append(row)
        rest = vids[len(rows):]
        if rest:
            while self.n + len(rest) > self.vcap:
                self._grow_vehicles()
            start, end = self.n, self.n + len(rest)
            self.n = end
            # a fresh row's entries are the same for every vehicle but its id
            # and the id's encodings: lists of those, not a tuple per vehicle
            for name, lst, value in zip(self._ROW_LISTS, lists, self._row_values("")):
                if name == "ids":
                    lst.extend(rest)
                elif name == "enc_id":
                    lst.extend(map(S.enc_name, rest))
                else:
                    lst.extend([value] * len(rest))
            self._blank(slice(start, end))
            rows.extend(range(start, end))
        self.id_to_row.update(zip(vids, rows))
        sel_by_vid = self.sel_by_vid
        for vid, row in zip(vids, rows):
            for sid in sel_by_vid.get(vid, ()):
                self._set_bit(self.sel_bits, sid, row)
        return rows

    _BLANK = np.zeros((), S.VEHICLE_DTYPE)
    _BLANK["ts"] = np.iinfo(np.int64).min
    _BLANK["status"] = S.ST_UNKNOWN

    def _blank(self, row: int) -> None:
        self.cur[row] = self._BLANK
        self.sent[row] = self._BLANK
        self.dirty[row] = 0
        self.heard[row] = 0.0
        self.sent_at[row] = 0.0
        self.silenced[row] = NOT_SILENCED

    # the 64 one-bit words and their complements made once: shifting numpy
    # scalars per call was two thirds of the time (and a Python int is not a
    # uint64 operand before numpy 2)
    _BIT = tuple(np.uint64(1) << np.uint64(i) for i in range(64))
    _NOT_BIT = tuple(~b for b in _BIT)

    @staticmethod
    def _set_bit(bits, r, col):
        bits[r, col >> 6] |= CoreBase._BIT[col & 63]

    @staticmethod
    def _clear_bit(bits, r, col):
        bits[r, col >> 6] &= CoreBase._NOT_BIT[col & 63]

    def row_of(self, vid: str) -> int:
        return self.id_to_row.get(vid, -1)

    def apply(self, batch: S.UpdateBatch, now: float = 0.0, aged_up_to=0.0):
        """Apply a columnar batch in order. Returns (rows, masks) of the updates
        that changed something; older-than-stored updates are counted in
        `ignored_stale`. New alerts land in `new_alerts` as (row, alert).

        A vehicle counts as heard `now`, or, for history (a topic read again
        after a restart, a snapshot loaded), as long before `now` as its
        update's timestamp is old by the wall clock, up to `aged_up_to`
        (seconds, or an array of them, one per update): a vehicle silent
        for an hour must not look live for another --offline-after-s
        because its last update was read again."""
        n = len(batch)
        if batch.rows is not None:   # looked up by the Kafka decoder
            rows = batch.rows
            found = None
        else:
            get = self.id_to_row.get
            found = list(map(get, batch.ids))   # no Python frame per update
            if None in found:   # new vehicles (once each; a batch may name one twice)
                found = [r if r is not None else (get(vid) if vid in self.id_to_row else self._new_vehicle(vid))
                         for r, vid in zip(found, batch.ids)]
            rows = np.array(found, np.int32)
        prev_ts = self.cur["ts"][rows]
        was_dirty = self.dirty[rows]
        silenced = self.silenced[rows]
        back = (silenced != NOT_SILENCED) & (batch.status == S.KEEP)
        if back.any():
            # offline by silence, now reporting without a status: what it was before
            batch.status = batch.status.copy()
            batch.status[back] = silenced[back]
        accepted, masks = self._k_apply(rows, batch)
        # news: a newer timestamp (a reconcile re-reading the same state is not)
        newer = accepted & (batch.ts > prev_ts)
        news = rows[newer]
        if np.ndim(aged_up_to) or aged_up_to > 0:   # a bound for each update, or one for all
            age = time.time() - batch.ts[newer] / 1000.0
            self.heard[news] = now - np.clip(age, 0.0, aged_up_to[newer] if np.ndim(aged_up_to) else aged_up_to)
        else:
            self.heard[news] = now
        self.silenced[news] = NOT_SILENCED
        if self.jitter_s > 0:
            self._hold_jitter(rows, accepted, masks, was_dirty, now)
        self.ignored_stale += int(n - accepted.sum())
        self.new_alerts = []
        # rich fields: most updates repeat what is stored (or carry none), so
        # compare here before paying for a call
        A, D, AS, G = self.alerts, self.driver, self.assignment, self.carried
        alerts, drivers, asgs, grps = batch.alerts, batch.driver, batch.assignment, batch.groups
        look = accepted if batch.rich is None else accepted & batch.rich
        for i in np.flatnonzero(look).tolist():
            r = found[i] if found is not None else int(rows[i])
            al, dr, asg, grp = alerts[i], drivers[i], asgs[i], grps[i]
            if ((al is None or al == A[r]) and (dr is None or dr == D[r])
                    and (asg is None or asg == AS[r]) and (grp is None or grp == G[r])):
                continue
            masks[i] |= self._apply_rich(r, al, dr, asg, grp)
        changed = masks != 0
        return rows[changed], masks[changed]

    def _apply_rich(self, row, al, dr, asg, grp) -> int:
        m = 0
        cur = self.cur
        if al is not None and al != self.alerts[row]:
            old = set(self.alerts[row])
            self.new_alerts.extend((row, a) for a in al if a not in old)
            self.alerts[row] = al
            self.enc_al[row] = S.enc_both(list(al))
            cur[row]["al_ver"] += 1
            cur[row]["has_alerts"] = 1 if al else 0
            m |= S.F_AL
        if dr is not None and dr != self.driver[row]:
            red_old = S.redact_driver(self.driver[row])
            self.driver[row] = dr
            self.enc_dr[row] = S.enc_both(dr)
            cur[row]["dr_ver"] += 1
            m |= S.F_DR
            red = S.redact_driver(dr)
            if red != red_old:
                self.enc_drr[row] = S.enc_both(red)
                cur[row]["drr_ver"] += 1
                m |= S.F_DRR
        if asg is not None and asg != self.assignment[row]:
            self.assignment[row] = asg
            self.enc_as[row] = S.enc_both(asg)
            cur[row]["as_ver"] += 1
            m |= S.F_AS
        if grp is not None:
            carried = grp if type(grp) is tuple and len(set(grp)) == len(grp) else tuple(dict.fromkeys(grp))
            if carried != self.carried[row] and self.rich_log is not None:
                # the other workers keep the carried groups apart from the
                # registry's too (mirror.py), even when this worker's
                # effective groups do not change (dirty: the next frame has it)
                self.rich_log[row] = self.rich_log.get(row, 0) | S.F_G
                self.dirty[row] = 1
            self.carried[row] = carried
            grp = self._effective_groups(row)
            if grp != self.groups_of[row]:
                self._set_groups(row, grp)
                m |= S.F_G
        if m:
            self.dirty[row] = 1
            if self.rich_log is not None:
                self.rich_log[row] = self.rich_log.get(row, 0) | m
        return m

    # ------------------------------------------------------------------ groups
    def _group(self, name: str) -> int:
        """The row of a group a vehicle carries, made when the first one does."""
        gid = self.group_id.get(name)
        if gid is None:
            if self.group_free:
                gid = self.group_free.pop()
                self.group_size[gid] = 0
            else:
                gid = len(self.group_size)
                self.group_size.append(0)
                if gid >= self.group_bits.shape[0]:
                    b = np.zeros((self.group_bits.shape[0] * 2, self.group_bits.shape[1]), np.uint64)
                    b[: self.group_bits.shape[0]] = self.group_bits
                    self.group_bits = b
            self.group_id[name] = gid
        return gid

    def _left_group(self, name: str) -> None:
        """A vehicle no longer carries `name`: free its row when none does
        and no selection names it."""
        gid = self.group_id.get(name)
        if gid is None:
            return
        self.group_size[gid] -= 1
        self._release_group(name)

    def _release_group(self, name: str) -> None:
        gid = self.group_id.get(name)
        if gid is not None and self.group_size[gid] <= 0 and not self.sel_by_group.get(name):
            del self.group_id[name]
            self.group_bits[gid] = 0
            self.group_free.append(gid)

    def _set_groups(self, row: int, groups: tuple):
        old = set(self.groups_of[row])
        new = set(groups)
        touched = set()
        sel_by_group = self.sel_by_group
        for g in new - old:
            gid = self._group(g)   # first: it may grow (replace) group_bits
            self._set_bit(self.group_bits, gid, row)
            self.group_size[gid] += 1
            sel = sel_by_group.get(g)
            if sel:
                touched |= sel
        for g in old - new:
            self._clear_bit(self.group_bits, self.group_id[g], row)
            sel = sel_by_group.get(g)
            if sel:
                touched |= sel
            self._left_group(g)
        # each name once: it is counted once (a tuple of distinct names is kept as it is)
        self.groups_of[row] = (groups if type(groups) is tuple and len(new) == len(groups)
                               else tuple(dict.fromkeys(groups)))
        for sid in touched:
            self._recompute_selection(sid)

    def set_group_members(self, name: str, vehicle_ids):
        """Group membership from the vehicle registry (Redis
        `group:{name}:vehicles`), all of it for this group: a vehicle it no
        longer names leaves the group (a token's group rights no longer show
        it). One whose own updates carry the group gets it back with the next."""
        members = {v for v in vehicle_ids if 0 < len(v) <= S.MAX_ID_LEN}
        registry_of = self.registry_of
        for vid in self.registry_members.get(name, set()) - members:
            kept = registry_of.get(vid)
            if kept is not None:
                kept.discard(name)
                if not kept:
                    del registry_of[vid]
            row = self.id_to_row.get(vid)
            if row is not None:
                self._registry_changed(row)
        if members:
            self.registry_members[name] = members
        else:
            self.registry_members.pop(name, None)
        for vid in members:
            registry_of.setdefault(vid, set()).add(name)
            row = self.id_to_row.get(vid)
            if row is None:
                row = self._new_vehicle(vid)
                self.registry_made.add(row)   # until it reports, or no group lists it (unlisted_rows)
            if name not in self.groups_of[row]:
                self._registry_changed(row)

    def _effective_groups(self, row: int) -> tuple:
        """What the latest update carried, then the registry's other groups."""
        carried = self.carried[row]
        kept = self.registry_of.get(self.ids[row])
        return carried + tuple(sorted(g for g in kept if g not in carried)) if kept else carried

    def _registry_changed(self, row: int) -> None:
        groups = self._effective_groups(row)
        if groups == self.groups_of[row]:
            return
        self._set_groups(row, groups)
        self.dirty[row] = 1
        if self.rich_log is not None:   # the other workers learn it from the owner's frames
            self.rich_log[row] = self.rich_log.get(row, 0) | S.F_G

    def group_members(self, name: str) -> list[str]:
        gid = self.group_id.get(name)
        if gid is None:
            return []
        rows = self._bits_to_rows(self.group_bits[gid])
        return [self.ids[r] for r in rows]

    def _bits_to_rows(self, words) -> np.ndarray:
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: self.n])

    # ------------------------------------------------------------------ selections
    def _selection(self, vehicles, groups) -> int:
        """Intern a (vehicles, groups) set; -1 when both are empty (= all)."""
        key = (frozenset(vehicles), frozenset(groups))
        if not key[0] and not key[1]:
            return -1
        sid = self.sel_key.get(key)
        if sid is not None:
            self.sel_refs[sid] += 1
            return sid
        if self.sel_free:
            sid = self.sel_free.pop()
            self.sel_spec[sid] = key
            self.sel_refs[sid] = 1
        else:
            sid = len(self.sel_spec)
            self.sel_spec.append(key)
            self.sel_refs.append(1)
            if sid >= self.sel_bits.shape[0]:
                b = np.zeros((self.sel_bits.shape[0] * 2, self.sel_bits.shape[1]), np.uint64)
                b[: self.sel_bits.shape[0]] = self.sel_bits
                self.sel_bits = b
        self.sel_key[key] = sid
        self.sel_epoch += 1   # a selection id now names another set (view_cells' memo)
        for vid in key[0]:
            self.sel_by_vid[vid].add(sid)
        for g in key[1]:
            self.sel_by_group[g].add(sid)   # no group row: a name nobody carries costs none
        self._recompute_selection(sid)
        return sid

    def _release_selection(self, sid: int):
        if sid < 0:
            return
        self.sel_refs[sid] -= 1
        if self.sel_refs[sid]:
            return
        key = self.sel_spec[sid]
        del self.sel_key[key]
        for vid in key[0]:
            s = self.sel_by_vid.get(vid)
            if s is not None:
                s.discard(sid)
                if not s:
                    del self.sel_by_vid[vid]
        for g in key[1]:
            s = self.sel_by_group.get(g)
            if s is not None:
                s.discard(sid)
                if not s:
                    del self.sel_by_group[g]
                    self._release_group(g)
                    if g in self.registry_members:
                        # nobody names it here now, so nobody reads it again:
                        # what the registry said of it would go stale, and its
                        # rows for vehicles never heard of would stay for good
                        self.set_group_members(g, ())
        self.sel_spec[sid] = None
        self.sel_bits[sid] = 0
        self.sel_free.append(sid)
        self.sel_epoch += 1

    def _recompute_selection(self, sid: int):
        vids, groups = self.sel_spec[sid]
        bits = np.zeros(self.sel_bits.shape[1], np.uint64)
        for g in groups:
            gid = self.group_id.get(g)
            if gid is not None:
                bits |= self.group_bits[gid]
        self.sel_bits[sid] = bits
        for vid in vids:
            row = self.id_to_row.get(vid)
            if row is not None:
                self._set_bit(self.sel_bits, sid, row)

    # ------------------------------------------------------------------ clients
    def _grow_clients(self):
        old = len(self.clients)
        new = old * 2
        c = np.zeros(new, CLIENT_DTYPE)
        c[:old] = self.clients
        self.clients = c
        vis = np.zeros((self.vis.shape[0], new // 64), np.uint64)
        vis[:, : self.vis.shape[1]] = self.vis
        self.vis = vis

    def add_client(self, fmt=S.FMT_JSON, view_all=True, vehicles=(), groups=(), contacts=False) -> int:
        """A new connection: no subscription yet, so it sees nothing."""
        if fmt not in (S.FMT_JSON, S.FMT_MSGPACK):
            # the compiled encoder indexes each piece's (json, msgpack) pair by it, unchecked
            raise ValueError(f"format {fmt!r}")
        if self.client_free:
            c = self.client_free.pop()
        else:
            if self.n_clients == len(self.clients):
                self._grow_clients()
            c = self.n_clients
            self.n_clients += 1
        rec = self.clients[c]
        rec["used"] = 1
        rec["active"] = 0
        rec["fmt"] = fmt
        rec["show_alerts"] = 1
        rec["contacts"] = 1 if contacts else 0
        rec["has_bbox"] = 0
        rec["status_mask"] = S.ALL_STATUS_MASK
        rec["type_mask"] = np.uint64(S.ALL_TYPES_MASK)
        rec["sub_sel"] = -1
        rec["rights_sel"] = -1 if view_all else self._selection(vehicles, groups)
        if not view_all and rec["rights_sel"] == -1:
            # a restricted token that names nothing may see nothing
            rec["rights_sel"] = self._empty_selection()
        self._grid_changed(c)
        return c

    def _empty_selection(self) -> int:
        return self._selection((), (S.NOTHING_GROUP,))

    def remove_client(self, c: int):
        rec = self.clients[c]
        self._release_selection(int(rec["rights_sel"]))
        self._release_selection(int(rec["sub_sel"]))
        self.clients[c] = np.zeros(1, CLIENT_DTYPE)[0]
        w, b = c >> 6, np.uint64(1) << np.uint64(c & 63)
        self.vis[:, w] &= ~b
        self.client_types.pop(c, None)
        self.client_free.append(c)
        self._grid_changed(c)

    def _grid_changed(self, c: int) -> None:
        self.grid_dirty = True
        self.grid_pending.add(c)

    def _check_idle(self):
        if self.dirty[: self.n].any():
            raise TickPending("call tick() before a client command")

    def set_rights(self, c: int, view_all=True, vehicles=(), groups=(), contacts=False) -> bytes | None:
        """New token rights (refresh, ACL change). Returns the diff batch body or None."""
        self._check_idle()
        rec = self.clients[c]
        old = int(rec["rights_sel"])
        new = -1 if view_all else self._selection(vehicles, groups)
        if not view_all and new == -1:
            new = self._empty_selection()
        rec["rights_sel"] = new
        self._release_selection(old)
        contacts_changed = bool(rec["contacts"]) != bool(contacts)
        rec["contacts"] = 1 if contacts else 0
        self._grid_changed(c)
        return self._k_client_diff(c, contacts_changed)

    def subscribe(self, c: int, vehicles=(), groups=(), bounds=None, zoom=None,
                  statuses=None, vehicle_types=None, show_alerts=True, full_all=False):
        """Replace the client's subscription. Returns (visible, body or None).
        The body has `full` for what came in and `leave` for what went out;
        with full_all (WebSocket's `subscribe`, PROTOCOL §3) `full` for every
        vehicle visible now.

        bounds is (south, west, north, east) or None; statuses and
        vehicle_types are iterables of names or None for no filter.
        """
        self._check_idle()
        rec = self.clients[c]
        old = int(rec["sub_sel"])
        rec["sub_sel"] = self._selection(vehicles, groups)
        self._release_selection(old)
        rec["active"] = 1
        self._set_bounds(rec, bounds, zoom)
        mask = S.ALL_STATUS_MASK
        if statuses:
            mask = 0
            for s in statuses:
                mask |= 1 << S.STATUS_CODE[s]
        rec["status_mask"] = mask
        if vehicle_types:
            self.client_types[c] = frozenset(vehicle_types)
        else:
            self.client_types.pop(c, None)
        rec["type_mask"] = np.uint64(self._type_mask(self.client_types.get(c)))
        old_alerts = bool(rec["show_alerts"])
        rec["show_alerts"] = 1 if show_alerts else 0
        self._grid_changed(c)
        body = self._k_client_diff(c, full_all or old_alerts != bool(show_alerts))
        return self.visible_count(c), body

    def set_viewport(self, c: int, bounds, zoom=None) -> bytes | None:
        self._check_idle()
        rec = self.clients[c]
        if not rec["active"]:
            # a map that sends its viewport first subscribes to everything in it
            return self.subscribe(c, bounds=bounds, zoom=zoom)[1]
        self._set_bounds(rec, bounds, zoom)
        self._grid_changed(c)
        return self._k_client_diff(c, False)

    def unsubscribe(self, c: int) -> bytes | None:
        self._check_idle()
        rec = self.clients[c]
        rec["active"] = 0
        self._grid_changed(c)
        return self._k_client_diff(c, False)

    @staticmethod
    def _set_bounds(rec, bounds, zoom):
        if bounds is None:
            rec["has_bbox"] = 0
        else:
            s, w, n, e = bounds
            rec["south"], rec["west"], rec["north"], rec["east"] = s, w, n, e
            rec["has_bbox"] = 1
        rec["zoom"] = -1.0 if zoom is None else zoom

    def _type_mask(self, names) -> int:
        if not names:
            return S.ALL_TYPES_MASK
        m = 0
        for name in names:
            code = self.type_code.get(name)
            if code is not None:
                m |= 1 << code
        return m

    def _refresh_type_masks(self):
        for c, names in self.client_types.items():
            self.clients[c]["type_mask"] = np.uint64(self._type_mask(names))

    def set_clustered(self, c: int, on: bool) -> bytes | None:
        """Switch a client between individual vehicles and `clusters`.

        While clustered, visibility is still tracked (events still flow), but
        no full/pos/delta/leave is produced for it. Switching back returns the
        body of `full` for every visible vehicle; switching on returns None."""
        self._check_idle()
        rec = self.clients[c]
        if bool(rec["clustered"]) == bool(on):
            return None
        rec["clustered"] = 1 if on else 0
        if on:
            return None
        return self._k_client_diff(c, True)

    def cluster_cells(self, c: int, cell_deg: float) -> list:
        """[[lat, lon, count], …] of the client's visible vehicles on a grid of
        cell_deg degrees: the mean position of each occupied cell."""
        rows = self.visible_rows(c)
        if len(rows) == 0:
            return []
        lat = self.cur["lat"][rows]
        lon = self.cur["lon"][rows]
        key = (np.floor((lat + 90.0) / cell_deg).astype(np.int64) << 32) | \
            np.floor((lon + 180.0) / cell_deg).astype(np.int64)
        uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
        mlat = np.bincount(inv, lat) / counts
        mlon = np.bincount(inv, lon) / counts
        return [[round(float(a), 6), round(float(b), 6), int(n)] for a, b, n in zip(mlat, mlon, counts)]

    # ------------------------------------------------------------------ shared cluster views
    def view_key(self, c: int, cell_deg: float):
        """What client c's `clusters` show, as a key: rights, subscription,
        filters, cell size, and the viewport snapped outward to the cell grid
        (None: no viewport). Clients with the same key get the same cells, so
        they are computed and encoded once per key (issue 14): nearby
        viewports of one zoom share a key. None for a client with no
        subscription (no cells)."""
        rec = self.clients[c]
        if not rec["active"]:
            return None
        window = None
        if rec["has_bbox"]:
            window = grid_window(float(rec["south"]), float(rec["west"]), float(rec["north"]),
                                 float(rec["east"]), cell_deg)
        return (int(rec["rights_sel"]), int(rec["sub_sel"]), int(rec["status_mask"]),
                int(rec["type_mask"]), float(cell_deg), window)

    def view_cells(self, key, memo: dict | None = None) -> list:
        """[[lat, lon, count, [moving, idle, stopped, offline]], …] of a
        view_key: the mean position of each occupied cell, its number of
        vehicles, and how many of them are in each status. The cells of the
        vehicles that pass a view's rights, subscription and filters are
        aggregated once per those and the cell size (kept in `memo` for one
        refresh); a view then only picks the cells inside its window, which
        holds whole cells since it is snapped to the grid."""
        rights, sub, smask, tmask, cell_deg, window = key
        base = key[:5]
        agg = memo.get(base) if memo is not None else None
        if agg is None:
            agg = self._view_aggregate(rights, sub, smask, tmask, cell_deg)
            if memo is not None:
                memo[base] = agg
        iy, ix, counts, mlat, mlon, by = agg
        if window is not None and len(iy):
            y0, y1, x0, x1 = window
            m = (iy >= y0) & (iy < y1)
            if x0 is not None:   # x0 >= x1: the viewport goes over the antimeridian
                m &= ((ix >= x0) & (ix < x1)) if x0 < x1 else ((ix >= x0) | (ix < x1))
            counts, mlat, mlon, by = counts[m], mlat[m], mlon[m], by[m]
        return [[a, b, n, row] for a, b, n, row in
                zip(mlat.tolist(), mlon.tolist(), counts.tolist(), by.tolist())]

    def _view_aggregate(self, rights: int, sub: int, smask: int, tmask: int, cell_deg: float):
        """Per occupied cell of the vehicles a client with these rights,
        subscription and filters may see, wherever they are (the predicate of
        visibility without the viewport, see _reference._predicate): its grid
        row and column, count, mean position (rounded to 1e-6) and status
        counts (moving, idle, stopped, offline)."""
        n = self.n
        cur = self.cur[:n]
        m = cur["version"] > 0
        for sid in (rights, sub):
            if sid != -1:
                bits = np.unpackbits(self.sel_bits[sid].view(np.uint8), bitorder="little")[:n]
                m &= bits.astype(bool)
        m &= ((np.int64(smask) >> cur["status"].astype(np.int64)) & 1).astype(bool)
        m &= ((np.uint64(tmask) >> cur["vtype"].astype(np.uint64)) & np.uint64(1)).astype(bool)
        rows = np.flatnonzero(m)
        lat = cur["lat"][rows].astype(np.float64)
        lon = cur["lon"][rows].astype(np.float64)
        iy = np.floor((lat + 90.0) / cell_deg).astype(np.int64)
        ix = np.floor((lon + 180.0) / cell_deg).astype(np.int64)
        uniq, inv, counts = np.unique((iy << 32) | ix, return_inverse=True, return_counts=True)
        k = len(uniq)
        status = cur["status"][rows]
        by = np.stack([np.bincount(inv, status == code, minlength=k) for code in
                       (S.ST_MOVING, S.ST_IDLE, S.ST_STOPPED, S.ST_OFFLINE)], axis=1).astype(np.int64)
        return (uniq >> 32, uniq & 0xFFFFFFFF, counts.astype(np.int64),
                np.round(np.bincount(inv, lat, minlength=k) / np.maximum(counts, 1), 6),
                np.round(np.bincount(inv, lon, minlength=k) / np.maximum(counts, 1), 6), by)

    def visible_count(self, c: int) -> int:
        w, b = c >> 6, np.uint64(1) << np.uint64(c & 63)
        return int(np.count_nonzero(self.vis[: self.n, w] & b))

    def visible_rows(self, c: int) -> np.ndarray:
        w, b = c >> 6, np.uint64(1) << np.uint64(c & 63)
        return np.flatnonzero(self.vis[: self.n, w] & b)

    def may_see(self, c: int, row: int) -> bool:
        """Token rights only (for `get` and the HTTP long form)."""
        sid = int(self.clients[c]["rights_sel"])
        if sid == -1:
            return True
        return bool((int(self.sel_bits[sid, row >> 6]) >> (row & 63)) & 1)

    # ------------------------------------------------------------------ liveness
    def _hold_jitter(self, rows, accepted, masks, was_dirty, now: float) -> None:
        """PROTOCOL §3.3: an idle vehicle's position jitter is sent at most every
        jitter_s. Such a row stays out of the next tick (not dirty); `sent`
        keeps what clients have, so the change goes out with the next real one."""
        small = (accepted & (was_dirty == 0) & ((masks & ~(S.F_P | S.F_C | S.F_TS)) == 0)
                 & (self.cur["status"][rows] != S.ST_MOVING))
        if not small.any():   # the common case: moving vehicles are always sent
            return
        r = rows[small]
        cur, sent = records(self.cur, r), records(self.sent, r)
        dy = (cur["lat"] - sent["lat"]) * 111_320.0
        dx = (cur["lon"] - sent["lon"]) * 111_320.0 * np.cos(np.radians(cur["lat"]))
        hold = ((sent["version"] > 0) & (dx * dx + dy * dy < self.jitter_m ** 2)
                & (now - self.sent_at[r] < self.jitter_s))
        if not hold.any():
            return
        held = np.zeros_like(small)   # by position in the batch
        held[small] = hold
        self.dirty[rows[held]] = 0
        # a row with another, real change in the same batch is sent
        self.dirty[rows[accepted & ~held]] = 1

    def unlisted_rows(self) -> list[int]:
        """Rows the registry made (set_group_members) for vehicles that never
        reported, which no registry group lists any more. A row that
        reported since, or was freed, is no longer the registry's."""
        ids, reg, where, version = self.ids, self.registry_of, self.id_to_row, self.cur["version"]
        out = []
        for r in list(self.registry_made):
            if where.get(ids[r]) != r or version[r] != 0:
                self.registry_made.discard(r)
            elif ids[r] not in reg:
                self.registry_made.discard(r)
                out.append(r)
        return out

    def silent_rows(self, since: float) -> np.ndarray:
        """Known vehicles that brought no news after `since`."""
        n = self.n
        live = self.cur["version"][:n] > 0
        return np.flatnonzero(live & (self.heard[:n] < since)).astype(np.int32)

    def mark_offline(self, rows, limit: int | None = None) -> np.ndarray:
        """PROTOCOL §3.3: silent vehicles turn `offline`, which the next tick
        sends as a `delta` with `st`. Not news: `heard` stays. Returns the rows
        that changed: at most `limit` of them (the rest stay for a later call)."""
        rows = np.asarray(rows, np.int32)
        rows = rows[(self.cur["status"][rows] != S.ST_OFFLINE) & (self.cur["version"][rows] > 0)]
        if limit is not None:
            rows = rows[:limit]
        if len(rows) == 0:
            return rows
        prev = self.cur["status"][rows]
        cur = records(self.cur, rows)
        n = len(rows)
        nan = np.full(n, np.nan)
        b = S.UpdateBatch([self.ids[r] for r in rows], cur["lat"], cur["lon"], nan, nan,
                          np.full(n, S.ST_OFFLINE, np.uint8), np.full(n, S.KEEP, np.uint8),
                          cur["ts"], None, None, None, None)
        self._k_apply(rows, b)
        self.silenced[rows] = prev
        return rows

    def forget(self, rows) -> list:
        """PROTOCOL §3.3: vehicles silent past --stale-after-s get `leave` with
        `r: stale` and are dropped from memory; their rows are reused. Needs no
        pending tick. Returns [(body, [client rows])] like tick()."""
        self._check_idle()
        rows = [r for r in dict.fromkeys(int(x) for x in rows) if self.id_to_row.get(self.ids[r]) == r]
        if not rows:
            return []
        out = self._leave_bodies(rows)
        for r in rows:
            vid = self.ids[r]
            self.vis[r] = 0
            for bits in (self.group_bits, self.sel_bits):
                bits[:, r >> 6] &= ~(np.uint64(1) << np.uint64(r & 63))
            for g in set(self.groups_of[r]):
                self._left_group(g)
            del self.id_to_row[vid]
            for name, value in zip(self._ROW_LISTS, self._row_values("")):
                getattr(self, name)[r] = value
            self._blank(r)
            self.row_free.append(r)
        return out

    def _leave_bodies(self, rows: list[int]) -> list:
        """[(body, [client rows])] of `leave` (r: stale) for `rows`: clients
        that see the same of these rows, in the same format, share one body.
        Vectorised: (rows x clients) bits, not a Python step per pair (20k
        vehicles x 500 clients took 7 s that way)."""
        nc = self.n_clients
        seen = np.unpackbits(self.vis[np.asarray(rows, np.int64)].view(np.uint8), axis=1,
                             bitorder="little")[:, :nc]
        watchers = np.flatnonzero(seen.any(axis=0))
        if not len(watchers):
            return []
        signature = np.packbits(seen[:, watchers], axis=0).T   # one row of bytes per watching client
        fmts = self.clients["fmt"][watchers]
        same: dict[tuple, list] = {}
        for i, c in enumerate(watchers.tolist()):
            same.setdefault((signature[i].tobytes(), int(fmts[i])), []).append(c)
        pieces = [S.enc_both({"t": "leave", "v": self.ids[r], "r": "stale"}) for r in rows]
        out: dict[bytes, list] = {}
        for (_, fmt), clients in same.items():
            mask = seen[:, clients[0]]
            body = self.body_of(fmt, [pieces[i][fmt] for i in np.flatnonzero(mask).tolist()])
            out.setdefault(body, []).extend(clients)
        return list(out.items())

    def resync(self, c: int, known_rows) -> bytes:
        """A client that skipped ticks (a slow connection, conflated) last saw
        `known_rows`: `full` for every vehicle it sees now, `leave` (with its
        reason) for each known one it no longer sees. The latest state wins."""
        self._check_idle()
        w, bit = c >> 6, np.uint64(1) << np.uint64(c & 63)
        self.vis[:, w] &= ~bit
        self.vis[np.asarray(known_rows, np.int64), w] |= bit
        return self._k_client_diff(c, True)

    def _bits_to_clients(self, words) -> np.ndarray:
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")
        return np.flatnonzero(bits[: self.n_clients])

    # ------------------------------------------------------------------ events
    def add_event(self, vid: str, etype: str, body, eid: str, ts: int, is_alert=False) -> bool:
        """Queue an instant event for the clients that see the vehicle at the
        next tick. Returns False for a vehicle this core does not know."""
        row = self.id_to_row.get(vid)
        if row is None:
            return False
        self.events.append((row, *self.event_pieces(row, etype, body, eid, ts), bool(is_alert)))
        return True

    def event_pieces(self, row: int, etype: str, body, eid: str, ts: int) -> tuple[bytes, bytes]:
        """An `event` message as (json, msgpack) pieces; encoded once, sent to many."""
        j = S.enc_json(etype), S.enc_json(body), S.enc_json(eid)
        m = S.enc_msgpack(etype), S.enc_msgpack(body), S.enc_msgpack(eid)
        json_piece = b'{"t":"event","v":%s,"e":%s,"d":%s,"eid":%s,"ts":%d}' % (
            self.enc_id[row][0], j[0], j[1], j[2], ts)
        mp_piece = (b"\x86\xa1t\xa5event\xa1v" + self.enc_id[row][1] + b"\xa1e" + m[0]
                    + b"\xa1d" + m[1] + b"\xa3eid" + m[2] + b"\xa2ts" + S.enc_msgpack(ts))
        return json_piece, mp_piece

    body_of = staticmethod(S.body_of)   # a batch body from encoded pieces

    def tick(self, rebuild: bool = True, now: float = 0.0, rows: np.ndarray | None = None):
        """Route every change since the last tick. Returns [(body, [client rows])]:
        clients that get identical messages share one body.

        rebuild=False (a client command's flush) keeps the spatial index as it
        is and checks the clients changed since it was built one by one, so a
        burst of subscriptions does not rebuild it once per command.
        `rows`: dirty_rows() when the caller has just taken them (the owner
        worker's frame, mirror.py), so that they are not taken twice."""
        if rows is None:
            rows = self.dirty_rows()
        if self.jitter_s > 0:
            self.sent_at[rows] = now
        return self._k_tick(rebuild, rows)

    # the numbers a follower worker copies from the owner's rows (mirror.py);
    # the type code is mapped; the versions of rich fields and has_alerts are
    # the follower's own (its _apply_rich keeps them). k_mirror copies the same.
    MIRRORED = ("lat", "lon", "speed", "course", "ts", "status", "version")

    def mirror_rows(self, xlate: np.ndarray, orows: np.ndarray, recs: np.ndarray, types: np.ndarray):
        """A follower's copy of the owner's rows: owner row -> ours through
        `xlate` (-1: not known here, skipped), numbers copied, type code
        mapped through `types`, the row dirty. Returns (our rows, skipped)."""
        local = np.full(len(orows), -1, np.int64)
        inside = orows < len(xlate)
        local[inside] = xlate[orows[inside]]
        ok = local >= 0
        skipped = int(len(ok) - ok.sum())
        local, recs = local[ok], recs[ok]
        # never back in time (the compiled k_mirror says why)
        newer = (self.cur["version"][local] == 0) | (recs["ts"] >= self.cur["ts"][local])
        local, recs = local[newer], recs[newer]
        for name in self.MIRRORED:
            self.cur[name][local] = recs[name]
        self.cur["vtype"][local] = types[recs["vtype"]]
        self.dirty[local] = 1
        return local, skipped

    def dirty_rows(self) -> np.ndarray:
        """The rows the next tick routes, ascending, as int32. Read as bool:
        nonzero() over uint8 compares byte by byte, ~9x slower than its bool
        path at a tick's usual 5% of rows."""
        return np.flatnonzero(self.dirty[: self.n].view(bool)).astype(np.int32)

    # ------------------------------------------------------------------ frames
    @staticmethod
    def envelope(fmt: int, batch_id: bytes, seq: int, req_id=None, more: bool = False) -> tuple[bytes, bytes]:
        """The per-connection `batch` envelope (PROTOCOL §3) around a shared
        body, as (prefix, suffix). more: a part of a body split in several
        batches (§3.4) that is not the last (docs/protocol.md)."""
        if fmt == S.FMT_JSON:
            rid = b"" if req_id is None else b',"id":' + S.enc_json(req_id)
            return b'{"type":"batch","batch_id":"%s","seq":%d%s%s,"messages":' % (
                batch_id, seq, rid, b',"more":true' if more else b""), b"}"
        rid = b"" if req_id is None else b"\xa2id" + S.enc_msgpack(req_id)
        head = 0x84 + (req_id is not None) + bool(more)
        return (bytes((head,)) + b"\xa4type\xa5batch\xa8batch_id" + S.enc_msgpack(batch_id.decode())
                + b"\xa3seq" + S.enc_msgpack(seq) + rid + (b"\xa4more\xc3" if more else b"")
                + b"\xa8messages"), b""

    @staticmethod
    def empty_body(fmt: int) -> bytes:
        return b"[]" if fmt == S.FMT_JSON else b"\x90"

    # ------------------------------------------------------------------ long form
    def long_form(self, vid: str, contacts: bool) -> dict | None:
        """PROTOCOL §3.2, for `get` and GET /api/vehicles/{id}."""
        row = self.id_to_row.get(vid)
        if row is None or self.cur[row]["version"] == 0:
            return None
        rec = self.cur[row]
        driver = self.driver[row] if contacts else S.redact_driver(self.driver[row])
        return {
            "type": "vehicle_update",
            "vehicle_id": vid,
            "position": {"lat": float(rec["lat"]), "lon": float(rec["lon"])},
            "speed": float(S.fmt_num(rec["speed"], S.SPEED_DECIMALS)),
            "course": float(S.fmt_num(rec["course"], S.COURSE_DECIMALS)),
            "status": S.STATUSES[rec["status"]],
            "vehicle_type": self.types[rec["vtype"]],
            "groups": list(self.groups_of[row]),
            "driver": driver,
            "assignment": self.assignment[row],
            "alerts": list(self.alerts[row]),
            "timestamp": int(rec["ts"]),
        }
